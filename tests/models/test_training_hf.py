"""The "hf" adapter: a tiny BERT learns a token task, arrays round-trip through the state_dict
(tied weights included), and nothing outside transformers' own architectures is built."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import transformers

from hivenode.models.training import hf_backend, torch_backend
from hivenode.models.training.backend import (
    LocalData,
    ModelSpec,
    ScaffoldState,
    TrainingError,
    TrainSettings,
    backend_for,
)

NDArray = np.ndarray[Any, Any]
BACKEND = backend_for("hf")
TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "vocab_size": 50,
    "max_position_embeddings": 16,
}
SPEC = ModelSpec("hf", "AutoModelForSequenceClassification", {"config": TINY_BERT})


@pytest.fixture(scope="module")
def tokens() -> LocalData:
    """Sequences of 8 tokens: a marker token that names the class, then 7 random ones."""
    rng = np.random.default_rng(0)
    y = np.arange(150) % 3
    x = rng.integers(10, 50, size=(150, 8))
    x[:, 0] = y + 1
    return LocalData(x[:120], y[:120], x[120:], y[120:], 3)


@pytest.fixture(scope="module")
def arrays(tokens: LocalData) -> dict[str, NDArray]:
    return BACKEND.init_arrays(SPEC, tokens.feature_shape, tokens.num_classes, 0)


def test_tiny_bert_learns_a_token_task(tokens: LocalData, arrays: dict[str, NDArray]) -> None:
    before = BACKEND.evaluate(SPEC, arrays, tokens.x_train, tokens.y_train)
    outcome = BACKEND.train(
        SPEC, arrays, tokens, TrainSettings(lr=0.3, local_epochs=6, batch_size=16)
    )
    after = BACKEND.evaluate(SPEC, outcome.arrays, tokens.x_train, tokens.y_train)
    assert after.loss < 0.5 * before.loss
    assert after.accuracy > 0.9
    assert (outcome.epochs_completed, outcome.local_steps) == (6, 6 * 8)


def test_training_replays_exactly_despite_dropout(
    tokens: LocalData, arrays: dict[str, NDArray]
) -> None:
    run = TrainSettings(lr=0.1, local_epochs=1, batch_size=32, seed=3)
    first, second = (BACKEND.train(SPEC, arrays, tokens, run) for _ in range(2))
    assert all(np.array_equal(first.arrays[k], second.arrays[k]) for k in arrays)


def test_arrays_round_trip_through_the_state_dict(
    tokens: LocalData, arrays: dict[str, NDArray]
) -> None:
    model = hf_backend.build_model(SPEC, 3, seed=9)
    assert list(arrays) == list(model.state_dict())
    torch_backend.load_arrays(model, arrays)  # strict
    exported = torch_backend.export_arrays(model, arrays)
    assert all(np.array_equal(exported[k], arrays[k]) for k in arrays)
    assert arrays["classifier.weight"].shape == (3, 16)


def test_tied_weights_keep_both_names() -> None:
    config = transformers.AutoConfig.for_model(**TINY_BERT)
    model = transformers.AutoModelForMaskedLM.from_config(config)
    arrays = torch_backend.state_arrays(model)
    tied = ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight")
    assert set(tied) <= set(arrays)
    arrays = {k: v + 1.0 for k, v in arrays.items()}
    torch_backend.load_arrays(model, arrays)
    exported = torch_backend.export_arrays(model, arrays)
    assert list(exported) == list(arrays)
    assert all(np.array_equal(exported[k], arrays[k]) for k in tied)


def test_scaffold_corrects_a_tied_parameter_once(tokens: LocalData) -> None:
    """A constant correction with no loss gradient moves every parameter by −lr·c per step,
    a tied one included (not twice, although it has two keys)."""
    config = transformers.AutoConfig.for_model(**TINY_BERT)
    model = transformers.AutoModelForMaskedLM.from_config(config)
    arrays = torch_backend.state_arrays(model)
    control = [np.full_like(v, 0.5) for v in arrays.values()]
    zeros = [np.zeros_like(v) for v in arrays.values()]
    # a loss whose gradient is zero: logits fixed at zero, still attached to the graph
    frozen = torch_backend.TorchModel(
        model, lambda ids: model.bert.embeddings.word_embeddings(ids)[:, 0, :3] * 0, torch.long
    )
    outcome = torch_backend.train_model(
        frozen,
        arrays,
        tokens,
        TrainSettings(lr=0.1, local_epochs=1, batch_size=120),
        ScaffoldState(control=control, client_control=zeros),
    )
    key = "cls.predictions.decoder.weight"
    np.testing.assert_allclose(outcome.arrays[key], arrays[key] - 0.05, atol=1e-6)


def test_only_allow_listed_auto_classes_are_built() -> None:
    with pytest.raises(TrainingError, match="AutoModelForSequenceClassification"):
        hf_backend.build_model(ModelSpec("hf", "AutoModelForCausalLM", {"config": TINY_BERT}), 2)


def test_remote_code_in_a_config_is_refused() -> None:
    config = {**TINY_BERT, "auto_map": {"AutoModel": "evil.Model"}}
    with pytest.raises(TrainingError, match="remote code"):
        hf_backend.build_model(ModelSpec("hf", SPEC.name, {"config": config}), 2)


def test_token_ids_outside_the_vocabulary_are_refused(
    tokens: LocalData, arrays: dict[str, NDArray]
) -> None:
    bad = LocalData(tokens.x_train + 50, tokens.y_train, tokens.x_test, tokens.y_test, 3)
    with pytest.raises(TrainingError, match="vocabulary has 50"):
        BACKEND.train(SPEC, arrays, bad, TrainSettings(lr=0.1, local_epochs=1, batch_size=8))
