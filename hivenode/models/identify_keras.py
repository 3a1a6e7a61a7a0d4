"""Keras models: `.keras` archives (config.json + model.weights.h5 in a zip) and legacy `.h5`
files (a `model_config` attribute + `model_weights`). The JSON config is read as data, never
deserialised; the HDF5 weights are read for their shapes only (h5py, no tensor data)."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from hivenode.models.classify import classify
from hivenode.models.errors import ModelError
from hivenode.models.info import Framework, LayerSummary, ModelInfo
from hivenode.models.weights import Tensor, count, dtype_name, dtypes

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_NOT_WEIGHTS = ("optimizer", "optimizer_weights", "compile_metrics", "metrics", "loss")
_CLASSIFYING_ACTIVATIONS = ("softmax", "sigmoid")
_GUESSED_KINDS = {2: "Dense", 3: "Conv1D", 4: "Conv2D", 5: "Conv3D"}
"""A weights-only file names no layer classes: the main weight's rank is the best hint."""


def is_keras_zip(names: set[str]) -> bool:
    return "config.json" in names and ("model.weights.h5" in names or "metadata.json" in names)


def identify_keras_zip(archive: zipfile.ZipFile) -> ModelInfo:
    try:
        config = json.loads(archive.read("config.json"))
        metadata = (
            json.loads(archive.read("metadata.json"))
            if "metadata.json" in set(archive.namelist())
            else {}
        )
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f".keras archive has an unreadable config.json: {exc}") from exc
    tensors: list[Tensor] = []
    if "model.weights.h5" in set(archive.namelist()):
        with archive.open("model.weights.h5") as handle:
            tensors = _h5_tensors(handle, root="")
    details = {
        "keras_version": metadata.get("keras_version") if isinstance(metadata, dict) else None
    }
    return _info("keras", config, tensors, details)


def identify_keras_h5(path: Path) -> ModelInfo:
    h5py = _h5py()
    with path.open("rb") as handle, h5py.File(handle, "r") as h5:
        raw_config = h5.attrs.get("model_config")
        # Keras 2 weight files list layer_names; Keras 3 ones (.weights.h5) hold `layers/`.
        has_weights = "model_weights" in h5 or "layer_names" in h5.attrs or "layers" in h5
        if raw_config is None and not has_weights:
            raise ModelError("HDF5 file holds no Keras model (no model_config, no weights)")
        version = h5.attrs.get("keras_version")
    with path.open("rb") as handle:
        tensors = _h5_tensors(handle, root="model_weights" if raw_config is not None else "")
    config: Any = None
    if raw_config is not None:
        text = raw_config.decode() if isinstance(raw_config, bytes) else str(raw_config)
        try:
            config = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(f"HDF5 model_config is not JSON: {exc}") from exc
    if isinstance(version, bytes):
        version = version.decode()
    details: dict[str, Any] = {"keras_version": str(version) if version is not None else None}
    if config is None:
        details["weights_only"] = True
    return _info("keras_h5", config, tensors, details)


def _h5py() -> Any:
    try:
        import h5py  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - h5py comes with keras/tensorflow
        raise ModelError("reading HDF5 models needs h5py (pip install hivenode[tf])") from exc
    return h5py


def _h5_tensors(handle: IO[bytes], root: str) -> list[Tensor]:
    """Every weight dataset's path, shape and dtype; optimizer and metric state left out."""
    h5py = _h5py()
    tensors: list[Tensor] = []
    with h5py.File(handle, "r") as h5:
        start = h5[root] if root else h5

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset) and name.split("/", 1)[0] not in _NOT_WEIGHTS:
                tensors.append(Tensor(name, tuple(int(d) for d in obj.shape), _np_name(obj.dtype)))

        start.visititems(visit)
    return tensors


def _np_name(dtype: Any) -> str:
    return dtype_name(str(dtype.name))


def _layer_configs(config: Any) -> Iterator[dict[str, Any]]:
    """The layers of a Sequential or Functional config, nested models flattened."""
    inner = config.get("config") if isinstance(config, dict) else None
    layers = inner.get("layers") if isinstance(inner, dict) else None
    for layer in layers if isinstance(layers, list) else ():
        if not isinstance(layer, dict):
            continue
        yield layer
        if isinstance(layer.get("config"), dict) and "layers" in layer["config"]:
            yield from _layer_configs(layer)


def _input_shape(config: Any, layers: list[dict[str, Any]]) -> tuple[int | None, ...] | None:
    candidates: list[Any] = []
    for layer in layers:
        layer_config = layer.get("config") or {}
        if layer.get("class_name") == "InputLayer":
            candidates += [layer_config.get("batch_shape"), layer_config.get("batch_input_shape")]
        candidates.append(layer_config.get("batch_input_shape"))
        candidates.append((layer.get("build_config") or {}).get("input_shape"))
    if isinstance(config, dict):
        candidates.append((config.get("build_config") or {}).get("input_shape"))
    for shape in candidates:
        if isinstance(shape, list) and all(d is None or isinstance(d, int) for d in shape):
            return tuple(shape)
    return None


def unsafe_keras_layers(config: Any) -> list[str]:
    """Layers whose config carries Python code (Lambda's marshalled bytecode)."""
    found: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("class_name") == "Lambda":
                found.append("keras.layers.Lambda")
            if node.get("class_name") == "__lambda__" or node.get("function_type") == "lambda":
                found.append("python lambda (marshalled bytecode)")
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(config)
    return sorted(set(found))


def _layer_of(tensor_name: str) -> str:
    """`layers/conv2d/vars/0` → conv2d; `dense/sequential/dense/kernel` (h5) → dense."""
    parts = tensor_name.split("/")
    if parts[0] == "layers" and len(parts) > 1:
        return parts[1]
    return parts[0]


def _info(fmt: str, config: Any, tensors: list[Tensor], details: dict[str, Any]) -> ModelInfo:
    layers_config = list(_layer_configs(config))
    per_layer: dict[str, list[Tensor]] = {}
    for tensor in tensors:
        per_layer.setdefault(_layer_of(tensor.name), []).append(tensor)
    summaries: list[LayerSummary] = []
    listed: set[str] = set()
    for layer in layers_config:
        name = str((layer.get("config") or {}).get("name") or layer.get("name") or "")
        class_name = str(layer.get("class_name") or "Layer")
        if class_name == "InputLayer":
            continue
        listed.add(name)
        weights = per_layer.get(name, [])
        main = max(weights, key=lambda t: len(t.shape), default=None)
        summaries.append(
            LayerSummary(
                name=name,
                kind=class_name,
                parameters=sum(t.numel for t in weights),
                shape=main.shape if main is not None else None,
            )
        )
    for name, weights in per_layer.items():
        if name not in listed:  # weights-only files, or weights of unlisted nested layers
            main = max(weights, key=lambda t: len(t.shape))
            summaries.append(
                LayerSummary(
                    name=name,
                    kind=_GUESSED_KINDS.get(len(main.shape), "Layer"),
                    parameters=sum(t.numel for t in weights),
                    shape=main.shape,
                )
            )
    kind = classify(summaries, [layer.name for layer in summaries])
    subtype = kind.subtype
    last_dense = [layer for layer in layers_config if layer.get("class_name") == "Dense"]
    if last_dense and (last_dense[-1].get("config") or {}).get("activation") in (
        _CLASSIFYING_ACTIVATIONS
    ):
        subtype = "classification"
    unsafe = unsafe_keras_layers(config)
    details["class_name"] = config.get("class_name") if isinstance(config, dict) else None
    details["tensors"] = len(tensors)
    # Keras counts every weight, BatchNorm statistics included (model.count_params()).
    counts = count(Tensor(t.name, t.shape, t.dtype, buffer=False) for t in tensors)
    return ModelInfo(
        format=fmt,
        framework=Framework.KERAS,
        family=kind.family,
        subtype=subtype,
        architecture=kind.architecture,
        parameters=counts.parameters if tensors or config is not None else None,
        input_shape=_input_shape(config, layers_config),
        dtypes=dtypes(tensors),
        safe=not unsafe,
        unsafe_globals=tuple(unsafe),
        layers=tuple(summaries),
        details=details,
    )
