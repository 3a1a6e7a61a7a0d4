"""Registry blobs loaded for serving, each checked against its framework run directly."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from inference_support import register, save_zoo_model

from hivenode.inference.errors import Code, InferenceError
from hivenode.inference.loaders import load_model
from hivenode.inference.runtime import LoadedModel
from hivenode.models.registry import Registry

TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "vocab_size": 50,
    "max_position_embeddings": 16,
}


def loaded(tmp_path: Path, path: Path, name: str = "m") -> LoadedModel:
    state = tmp_path / "state"
    version = register(state, path, name)
    with Registry(state) as registry:
        blob = registry.blob_path(version.sha256)
    return load_model(version, blob)


def run(model: LoadedModel, x: np.ndarray) -> np.ndarray:
    return model.predict(model.prepare(x))[0]


def test_a_zoo_cnn_without_shape_metadata_takes_its_square_image(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "cnn.safetensors"
    spec = {"framework": "torch", "name": "cnn", "options": {}}
    module = save_zoo_model(path, spec, feature_shape=(1, 8, 8), num_classes=4)
    model = loaded(tmp_path, path)
    assert model.signature.shape == (1, 8, 8) and model.signature.flat
    x = np.random.default_rng(0).normal(size=(3, 8, 8)).astype(np.float32)  # (H, W) also goes
    with torch.inference_mode():
        expected = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run(model, x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(InferenceError) as caught:
        model.prepare(np.zeros((1, 9, 9), np.float32))
    assert caught.value.kind is Code.BAD_INPUT and "(n, 1, 8, 8)" in caught.value.message


def test_stored_input_shape_metadata_wins(tmp_path: Path) -> None:
    path = tmp_path / "cnn.safetensors"
    spec = {"framework": "torch", "name": "cnn", "options": {}}
    meta = {"hivenode-input-shape": json.dumps([9, 9]), "hivenode-num-classes": "2"}
    save_zoo_model(path, spec, feature_shape=(9, 9), num_classes=2, metadata=meta)
    model = loaded(tmp_path, path)
    assert model.signature.shape == (9, 9)
    assert run(model, np.zeros((2, 81), np.float32)).shape == (2, 2)


def test_an_hf_classifier_takes_token_ids_within_its_vocabulary(tmp_path: Path) -> None:
    import torch
    from safetensors.numpy import save_file

    from hivenode.models.training.backend import ModelSpec
    from hivenode.models.training.hf_backend import build_model
    from hivenode.models.training.torch_backend import state_arrays

    spec = ModelSpec("hf", "AutoModelForSequenceClassification", {"config": TINY_BERT})
    module = build_model(spec, 3, seed=0).eval()
    path = tmp_path / "bert.safetensors"
    raw = {"framework": "hf", "name": spec.name, "options": dict(spec.options)}
    save_file(state_arrays(module), str(path), metadata={"hivenode-model": json.dumps(raw)})
    model = loaded(tmp_path, path)
    ids = np.random.default_rng(0).integers(0, 50, size=(2, 6))
    with torch.inference_mode():
        tensor = torch.from_numpy(ids)
        expected = module(input_ids=tensor, attention_mask=torch.ones_like(tensor)).logits
    np.testing.assert_allclose(run(model, ids), expected.numpy(), rtol=1e-4, atol=1e-5)
    for bad in (np.full((1, 4), 50), np.zeros((1, 17), np.int64), np.full((1, 4), 0.5)):
        with pytest.raises(InferenceError) as caught:
            model.prepare(bad)
        assert caught.value.kind is Code.BAD_INPUT


def test_a_skops_estimator_predicts_probabilities(tmp_path: Path) -> None:
    skops_io = pytest.importorskip("skops.io")
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 5)), rng.integers(0, 3, size=60)
    estimator = LogisticRegression(max_iter=200).fit(x, y)
    path = tmp_path / "logreg.skops"
    skops_io.dump(estimator, path)
    model = loaded(tmp_path, path)
    assert model.framework == "sklearn" and model.signature.shape == (5,)
    np.testing.assert_allclose(run(model, x[:4]), estimator.predict_proba(x[:4]), rtol=1e-12)


def test_an_onnx_graph_runs_in_onnxruntime_even_with_a_fixed_batch(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh()).eval()
    dynamic, fixed = tmp_path / "dynamic.onnx", tmp_path / "fixed.onnx"
    example = (torch.zeros(1, 6),)
    torch.onnx.export(
        net, example, str(dynamic), dynamo=False,
        input_names=["x"], dynamic_axes={"x": {0: "batch"}},
    )  # fmt: skip
    torch.onnx.export(net, example, str(fixed), dynamo=False, input_names=["x"])
    x = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    with torch.inference_mode():
        expected = net(torch.from_numpy(x)).numpy()
    for index, path in enumerate((dynamic, fixed)):
        model = loaded(tmp_path / str(index), path)
        assert model.framework == "onnx" and model.signature.shape == (6,)
        np.testing.assert_allclose(run(model, x), expected, rtol=1e-5, atol=1e-6)


def test_pickles_and_bare_safetensors_are_not_served(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    cases = {
        "state.pkl": lambda p: p.write_bytes(pickle.dumps({"w": [1.0, 2.0]})),
        "bare.safetensors": lambda p: save_file({"w": np.zeros(3, np.float32)}, str(p)),
    }
    for index, (name, write) in enumerate(cases.items()):
        path = tmp_path / name
        write(path)
        with pytest.raises(InferenceError) as caught:
            loaded(tmp_path / str(index), path)
        assert caught.value.kind is Code.UNSUPPORTED_MODEL


def test_job_models_of_unserved_frameworks_say_which_are_served(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "sgd.safetensors"
    spec: dict[str, Any] = {"framework": "sklearn", "name": "SGDClassifier", "options": {}}
    save_file(
        {"coef": np.zeros((3, 4), np.float32)},
        str(path),
        metadata={"hivenode-model": json.dumps(spec)},
    )
    with pytest.raises(InferenceError) as caught:
        loaded(tmp_path, path)
    assert "torch, hf are" in caught.value.message
