"""identify() on real files built by the frameworks: exact parameter counts against the
frameworks' own counts, the right framework/family/architecture, hostile and broken files."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hivenode.models.errors import ModelError
from hivenode.models.identify import identify
from hivenode.models.info import Family, Framework

RESNET18_PARAMETERS = 11_689_512
"""torchvision's resnet18 (1000 classes), the published figure."""
Built = Any  # conftest.Built: .path, .parameters, .facts


@dataclass(frozen=True)
class Case:
    fixture: str
    key: str
    format: str
    framework: Framework
    family: Family
    architecture: str
    subtype: str | None = None


CASES = [
    Case("torch_models", "resnet18_state_dict", "torch_state_dict", Framework.TORCH,
         Family.COMPUTER_VISION, "resnet", "classification"),
    Case("torch_models", "resnet18_module", "torch_pickled_module", Framework.TORCH,
         Family.COMPUTER_VISION, "resnet", "classification"),
    Case("torch_models", "resnet18_torchscript", "torchscript", Framework.TORCH,
         Family.COMPUTER_VISION, "resnet", "classification"),
    Case("torch_models", "resnet18_safetensors", "safetensors", Framework.SAFETENSORS,
         Family.COMPUTER_VISION, "resnet", "classification"),
    Case("torch_models", "lstm_state_dict", "torch_state_dict", Framework.TORCH, Family.NLP,
         "rnn", "classification"),
    Case("torch_models", "lstm_module", "torch_pickled_module", Framework.TORCH, Family.NLP,
         "rnn", "classification"),
    Case("torch_models", "dqn_state_dict", "torch_state_dict", Framework.TORCH,
         Family.REINFORCEMENT_LEARNING, "mlp", "q_learning"),
    Case("torch_models", "dqn_checkpoint", "torch_state_dict", Framework.TORCH,
         Family.REINFORCEMENT_LEARNING, "mlp", "q_learning"),
    Case("torch_models", "dqn_legacy", "torch_state_dict", Framework.TORCH,
         Family.REINFORCEMENT_LEARNING, "mlp", "q_learning"),
    Case("torch_models", "tied_state_dict", "torch_state_dict", Framework.TORCH,
         Family.UNKNOWN, "mlp"),
    Case("torch_models", "cnn_onnx", "onnx", Framework.ONNX, Family.COMPUTER_VISION, "cnn",
         "classification"),
    Case("hf_models", "bert", "hf_directory", Framework.TRANSFORMERS, Family.NLP,
         "transformer", "classification"),
    Case("hf_models", "gpt2", "hf_directory", Framework.TRANSFORMERS, Family.NLP,
         "transformer", "generation"),
    Case("hf_models", "gpt2_bin", "hf_directory", Framework.TRANSFORMERS, Family.NLP,
         "transformer", "generation"),
    Case("keras_models", "keras", "keras", Framework.KERAS, Family.COMPUTER_VISION, "cnn",
         "classification"),
    Case("keras_models", "keras_h5", "keras_h5", Framework.KERAS, Family.COMPUTER_VISION,
         "cnn", "classification"),
    Case("keras_models", "savedmodel", "tf_savedmodel", Framework.TENSORFLOW,
         Family.COMPUTER_VISION, "cnn", "classification"),
    Case("sklearn_models", "forest_pickle", "sklearn_pickle", Framework.SKLEARN,
         Family.TABULAR, "tree_based", "classification"),
    Case("sklearn_models", "forest_joblib", "joblib", Framework.SKLEARN, Family.TABULAR,
         "tree_based", "classification"),
    Case("sklearn_models", "forest_joblib_compressed", "joblib", Framework.SKLEARN,
         Family.TABULAR, "tree_based", "classification"),
    Case("sklearn_models", "forest_skops", "skops", Framework.SKLEARN, Family.TABULAR,
         "tree_based", "classification"),
    Case("sklearn_models", "pipeline_joblib", "joblib", Framework.SKLEARN, Family.TABULAR,
         "linear", "classification"),
]  # fmt: skip


def built(request: pytest.FixtureRequest, case: Case) -> Built:
    models: dict[str, Built] = request.getfixturevalue(case.fixture)
    return models[case.key]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.key)
def test_identify_reports_exact_parameters_and_kind(
    request: pytest.FixtureRequest, case: Case
) -> None:
    model = built(request, case)
    info = identify(model.path)
    assert info.parameters == model.parameters
    assert (info.format, info.framework, info.family, info.architecture, info.subtype) == (
        case.format, case.framework, case.family, case.architecture, case.subtype,
    )  # fmt: skip
    assert "float32" in info.dtypes or info.framework is Framework.SKLEARN
    assert info.size_bytes > 0 and len(info.sha256) == 64
    assert info.layers or info.framework is Framework.SKLEARN
    json.dumps(info.as_json())  # the CLI's --json must serialise


def test_resnet18_is_exactly_the_published_count(torch_models: dict[str, Built]) -> None:
    assert torch_models["resnet18_state_dict"].parameters == RESNET18_PARAMETERS
    info = identify(torch_models["resnet18_state_dict"].path)
    assert info.parameters == RESNET18_PARAMETERS
    # BatchNorm running statistics are buffers: reported apart, not counted as parameters.
    assert info.details["buffers"] == 3 * 20
    fc = next(layer for layer in info.layers if layer.name == "fc")
    assert (fc.kind, fc.parameters, fc.shape) == ("Linear", 512 * 1000 + 1000, (1000, 512))


def test_pickled_module_reports_module_classes(torch_models: dict[str, Built]) -> None:
    info = identify(torch_models["resnet18_module"].path)
    kinds = {layer.name: layer.kind for layer in info.layers}
    assert kinds["conv1"] == "Conv2d" and kinds["layer1.0.bn1"] == "BatchNorm2d"
    assert kinds["fc"] == "Linear"


def test_pickled_module_with_a_custom_class_needs_trust(torch_models: dict[str, Built]) -> None:
    """Loading a whole pickled module imports the user's class: not safe without --trust."""
    info = identify(torch_models["lstm_module"].path)
    assert not info.safe
    assert info.unsafe_globals == (f"{torch_models['lstm_module'].facts['class']}.LSTMClassifier",)
    assert {layer.kind for layer in info.layers} == {"Embedding", "LSTM", "Linear"}


def test_torchscript_counts_parameters_not_buffers(torch_models: dict[str, Built]) -> None:
    info = identify(torch_models["resnet18_torchscript"].path)
    assert info.safe and info.details["executable_code"] is True
    assert info.details["buffers"] == 3 * 20


def test_state_dict_is_safe_and_names_its_layers(torch_models: dict[str, Built]) -> None:
    info = identify(torch_models["lstm_state_dict"].path)
    assert info.safe and info.unsafe_globals == ()
    lstm = next(layer for layer in info.layers if layer.name == "lstm")
    assert lstm.kind == "LSTM" and lstm.shape == (4 * 32, 16)


def test_onnx_reports_declared_input_shape(torch_models: dict[str, Built]) -> None:
    info = identify(torch_models["cnn_onnx"].path)
    assert info.input_shape == (None, 1, 28, 28)
    assert [layer.kind for layer in info.layers] == ["Conv", "Conv", "Gemm"]


def test_sklearn_details(request: pytest.FixtureRequest, sklearn_models: dict[str, Built]) -> None:
    for key in ("forest_pickle", "forest_joblib", "forest_joblib_compressed", "forest_skops"):
        model = sklearn_models[key]
        info = identify(model.path)
        assert info.details["estimator"] == "sklearn.ensemble._forest.RandomForestClassifier"
        for fact, value in model.facts.items():
            assert info.details[fact] == value, (key, fact)
        assert info.details["classes"] == [0, 1, 2]
        assert info.input_shape == (None, 6)
        assert info.safe, info.unsafe_globals


def test_sklearn_pipeline_reports_final_estimator(sklearn_models: dict[str, Built]) -> None:
    model = sklearn_models["pipeline_joblib"]
    info = identify(model.path)
    assert info.details["estimator"] == "sklearn.linear_model._logistic.LogisticRegression"
    assert info.details["pipeline"] == ["Pipeline", "StandardScaler"]
    assert info.details["coefficients"]["coef_"] == model.facts["coef_"]


def test_keras_reports_input_shape_and_layers(keras_models: dict[str, Built]) -> None:
    for key in ("keras", "keras_h5"):
        info = identify(keras_models[key].path)
        assert info.input_shape == (None, 28, 28, 1)
        assert [layer.kind for layer in info.layers][:2] == ["Conv2D", "BatchNormalization"]
        assert info.safe
    weights_only = identify(keras_models["keras_weights"].path)
    assert weights_only.details["weights_only"] is True
    assert weights_only.parameters == keras_models["keras_weights"].parameters
    saved = identify(keras_models["savedmodel"].path)
    assert saved.input_shape == (None, 28, 28, 1)


def test_keras_lambda_carries_code_and_is_unsafe(keras_models: dict[str, Built]) -> None:
    model = keras_models["lambda"]
    info = identify(model.path)
    assert not info.safe and "keras.layers.Lambda" in info.unsafe_globals
    assert info.parameters == model.parameters


def test_tied_weights_count_once(hf_models: dict[str, Built]) -> None:
    """pytorch_model.bin keeps lm_head.weight and wte.weight as one storage."""
    info = identify(hf_models["gpt2_bin"].path)
    assert info.details["tensors"] == identify(hf_models["gpt2"].path).details["tensors"] + 1
    assert info.parameters == hf_models["gpt2"].parameters


def test_directory_hash_depends_on_content_not_location(
    hf_models: dict[str, Built], tmp_path: Path
) -> None:
    copy = tmp_path / "elsewhere"
    shutil.copytree(hf_models["bert"].path, copy)
    assert identify(copy).sha256 == identify(hf_models["bert"].path).sha256
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert identify(copy).sha256 != identify(hf_models["bert"].path).sha256


def test_sha256_matches_hashlib(torch_models: dict[str, Built]) -> None:
    path = torch_models["dqn_state_dict"].path
    assert identify(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert identify(path, hash=False).sha256 == ""


def test_content_decides_not_the_extension(torch_models: dict[str, Built], tmp_path: Path) -> None:
    renamed = tmp_path / "weights.onnx"
    shutil.copy(torch_models["resnet18_safetensors"].path, renamed)
    info = identify(renamed)
    assert info.format == "safetensors" and info.parameters == RESNET18_PARAMETERS
    assert "extension suggests onnx" in info.details["extension_hint"]


# --- reading little ------------------------------------------------------------------------


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_gigabyte_safetensors_is_identified_from_its_header(tmp_path: Path) -> None:
    elements = 256 * 1024 * 1024  # 1 GiB of float32, as a sparse file: no disk needed
    header = json.dumps(
        {"model.embed.weight": {"dtype": "F32", "shape": [elements // 1024, 1024],
                                "data_offsets": [0, elements * 4]}}
    ).encode()  # fmt: skip
    path = tmp_path / "big.safetensors"
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        handle.truncate(8 + len(header) + elements * 4)
    before = _bytes_read()
    info = identify(path, hash=False)
    assert _bytes_read() - before < 1024 * 1024
    assert info.parameters == elements and info.size_bytes == path.stat().st_size


def test_identifying_imports_no_framework(
    torch_models: dict[str, Built], hf_models: dict[str, Built], sklearn_models: dict[str, Built]
) -> None:
    """The daemon identifies files without torch, transformers, sklearn or onnx in memory."""
    paths = [
        torch_models[key].path
        for key in ("resnet18_state_dict", "lstm_module", "resnet18_torchscript", "cnn_onnx")
    ] + [hf_models["gpt2_bin"].path, sklearn_models["forest_joblib"].path]
    script = (
        "import sys\nfrom hivenode.models.identify import identify\n"
        f"for p in {[str(p) for p in paths]!r}: identify(p)\n"
        "heavy = ('torch', 'tensorflow', 'transformers', 'sklearn', 'onnx', 'keras', 'joblib')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --- hostile files: nothing runs -----------------------------------------------------------


@pytest.mark.parametrize("protocol", [0, 2, pickle.DEFAULT_PROTOCOL, 5])
def test_malicious_pickle_is_reported_and_never_run(
    tmp_path: Path, protocol: int, malicious_pickle: Callable[..., bytes]
) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "model.pkl"
    path.write_bytes(malicious_pickle(marker, protocol))
    info = identify(path)
    assert not marker.exists()
    assert not info.safe
    assert {"os.system", "posix.system"} & set(info.unsafe_globals)


def test_malicious_pickle_under_an_innocent_name(
    tmp_path: Path, malicious_pickle: Callable[..., bytes]
) -> None:
    """Content decides: a protocol-0 pickle named notes.txt is still scanned and flagged."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "notes.txt"
    path.write_bytes(malicious_pickle(marker, 0))
    info = identify(path)
    assert not marker.exists()
    assert info.format == "pickle" and "posix.system" in info.unsafe_globals


def test_malicious_data_pkl_in_a_torch_archive(
    torch_models: dict[str, Built],
    tmp_path: Path,
    malicious_pickle: Callable[..., bytes],
    replace_member: Callable[[Path, Path, str, bytes], None],
) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "model.pt"
    replace_member(torch_models["dqn_state_dict"].path, path, "/data.pkl", malicious_pickle(marker))
    info = identify(path)
    assert not marker.exists()
    assert info.framework is Framework.TORCH and info.format == "torch_pickle"
    assert not info.safe and "posix.system" in info.unsafe_globals


def test_malicious_key_hidden_in_a_state_dict(tmp_path: Path, system_call: Any) -> None:
    """A real state dict with one poisoned entry still counts, and is still unsafe."""
    import torch

    marker = tmp_path / "MARKER"
    path = tmp_path / "poisoned.pt"
    torch.save({"fc.weight": torch.zeros(2, 3), "x": system_call(f"touch {marker}")}, path)
    info = identify(path)
    assert not marker.exists()
    assert not info.safe and "posix.system" in info.unsafe_globals
    assert info.parameters == 6


@pytest.mark.parametrize(
    ("callable_", "expected"),
    [("eval", "builtins.eval"), ("exec", "builtins.exec"), ("getattr", "builtins.getattr")],
)
def test_dangerous_builtins_are_unsafe(tmp_path: Path, callable_: str, expected: str) -> None:
    marker = tmp_path / "MARKER"
    code = f"open({str(marker)!r}, 'w').close()"
    payload = (
        b"\x80\x04c" + b"builtins\n" + callable_.encode() + b"\n"
        + pickle.dumps((code,), protocol=4)[2:-1] + b"R."
    )  # fmt: skip
    path = tmp_path / "payload.pkl"
    path.write_bytes(payload)
    info = identify(path)
    assert not marker.exists()
    assert expected in info.unsafe_globals and not info.safe


def test_malicious_joblib_is_unsafe(tmp_path: Path) -> None:
    import subprocess as subprocess_module

    class Popen:
        def __reduce__(self) -> tuple[object, tuple[list[str]]]:
            return (subprocess_module.Popen, (["touch", str(tmp_path / "MARKER")],))

    path = tmp_path / "model.joblib"
    path.write_bytes(pickle.dumps({"model": Popen()}))
    info = identify(path)
    assert not (tmp_path / "MARKER").exists()
    assert info.format == "joblib" and "subprocess.Popen" in info.unsafe_globals


# --- bad input: one clear ModelError line ---------------------------------------------------


def _expect_error(path: Path, *words: str) -> str:
    with pytest.raises(ModelError) as caught:
        identify(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    for word in words:
        assert word in message, message
    return message


def test_missing_file(tmp_path: Path) -> None:
    _expect_error(tmp_path / "nope.pt", "no such file")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    path.touch()
    _expect_error(path, "empty")


def test_garbage(tmp_path: Path) -> None:
    path = tmp_path / "garbage.bin"
    path.write_bytes(os.urandom(4096).replace(b"PK", b"pk").replace(b"\x80", b"\x81"))
    _expect_error(path, "unrecognised content")


def test_text_with_a_model_extension(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_text("these are not the weights you are looking for\n")
    _expect_error(path, "unrecognised content", ".pt extension is only a hint")


def test_garbage_named_onnx(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x08\x07" + os.urandom(200))
    _expect_error(path, "ONNX")


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    _expect_error(tmp_path, "neither config.json", "saved_model.pb")


def test_hf_directory_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    _expect_error(tmp_path, "no weights")


@pytest.mark.parametrize(
    ("fixture", "key"),
    [
        ("torch_models", "resnet18_safetensors"),
        ("torch_models", "resnet18_state_dict"),
        ("torch_models", "cnn_onnx"),
        ("torch_models", "dqn_legacy"),
        ("sklearn_models", "forest_pickle"),
        ("sklearn_models", "forest_joblib"),
        ("keras_models", "keras_h5"),
    ],
)
def test_truncated_files(
    request: pytest.FixtureRequest, tmp_path: Path, fixture: str, key: str
) -> None:
    source: Path = request.getfixturevalue(fixture)[key].path
    path = tmp_path / source.name
    data = source.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    _expect_error(path)


def test_zip_that_is_no_model(tmp_path: Path) -> None:
    path = tmp_path / "archive.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    _expect_error(path, "zip archive is not a model")
