"""Registry blobs to `LoadedModel`s, in safe formats only (see "Models are data" in DESIGN.md).

- safetensors written by a job (`hivenode-model` metadata holds the `ModelSpec`): torch zoo
  architectures and Hugging Face classifiers, built with code this node has, then the
  weights loaded;
- skops archives (scikit-learn), whose every type must be on the pickle allow-list;
- ONNX graphs, run by onnxruntime on the CPU.

Pickles, TorchScript, Keras and SavedModel files are not served. Every framework is imported
here, lazily, when a model of it is loaded; loading blocks, so callers run it in a thread.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from hivenode.inference.errors import Code, InferenceError
from hivenode.inference.runtime import LoadedModel, NDArray, Predict, Signature
from hivenode.models.registry import ModelVersion
from hivenode.models.training.backend import INPUT_SHAPE_KEY, NUM_CLASSES_KEY
from hivenode.models.training.backend import MODEL_SPEC_KEY as SPEC_KEY

ZOO_POOLING = 4
"""The zoo's cnn halves the image twice: its head sees (H // 4) × (W // 4) per channel."""
_FEATURE_WEIGHT = re.compile(r"features\.(\d+)\.weight")
_ONNX_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def load_model(version: ModelVersion, path: Path) -> LoadedModel:
    """`version` (whose blob is at `path`) ready to serve; InferenceError(unsupported_model)
    for a format or framework this node does not serve."""
    fmt = version.info.format
    if version.kind == "file" and fmt == "safetensors":
        return _load_safetensors(version, path)
    if version.kind == "file" and fmt == "skops":
        return _load_skops(version, path)
    if version.kind == "file" and fmt == "onnx":
        return _load_onnx(version, path)
    raise InferenceError(
        Code.UNSUPPORTED_MODEL,
        f"{version.spec} is {fmt} ({version.framework}); served formats: safetensors written "
        "by a hivenode job (torch zoo, hf), skops, onnx",
    )


# --- safetensors from jobs ---------------------------------------------------------------


def _load_safetensors(version: ModelVersion, path: Path) -> LoadedModel:
    from hivenode.models.identify_safetensors import read_header
    from hivenode.models.training.backend import ModelSpec, TrainingError

    _, metadata = read_header(path)
    raw = metadata.get(SPEC_KEY)
    if raw is None:
        raise InferenceError(
            Code.UNSUPPORTED_MODEL,
            f"{version.spec}: safetensors without {SPEC_KEY!r} metadata: no architecture "
            "to load the weights into",
        )
    try:
        fields = json.loads(raw)
        spec = ModelSpec(fields["framework"], fields["name"], fields.get("options") or {})
    except (ValueError, KeyError, TypeError, TrainingError) as exc:
        raise InferenceError(
            Code.UNSUPPORTED_MODEL, f"{version.spec}: unreadable {SPEC_KEY}: {exc}"
        ) from exc
    try:
        if spec.framework == "torch":
            return _load_zoo(version, path, spec, metadata)
        if spec.framework == "hf":
            return _load_hf(version, path, spec)
    except TrainingError as exc:
        raise InferenceError(Code.UNSUPPORTED_MODEL, f"{version.spec}: {exc}") from exc
    raise InferenceError(
        Code.UNSUPPORTED_MODEL,
        f"{version.spec}: {spec.framework} job models are not served yet (torch, hf are)",
    )


def zoo_shapes(
    name: str, arrays: dict[str, NDArray], metadata: dict[str, str]
) -> tuple[tuple[int, ...], int]:
    """(per-sample input shape, class count) of a zoo model's weights: from the metadata
    when the job wrote them, else from the weights (a cnn's image is then taken square)."""
    from hivenode.models.training.backend import TrainingError

    head = arrays.get("head.weight")
    if head is None or head.ndim != 2:
        raise TrainingError("the weights have no 2-D 'head.weight': not a zoo model")
    num_classes = int(head.shape[0])
    if NUM_CLASSES_KEY in metadata:
        num_classes = int(metadata[NUM_CLASSES_KEY])
    if INPUT_SHAPE_KEY in metadata:
        shape = tuple(int(d) for d in json.loads(metadata[INPUT_SHAPE_KEY]))
        return shape, num_classes
    indexed = [(int(m.group(1)), k) for k in arrays if (m := _FEATURE_WEIGHT.fullmatch(k))]
    first = arrays[min(indexed)[1]] if indexed else head
    if first.ndim == 2:  # logreg, mlp: Flatten then Linear(features, ...)
        return (int(first.shape[1]),), num_classes
    if name != "cnn" or first.ndim != 4:
        raise TrainingError(f"cannot tell the input shape of {name}: store {INPUT_SHAPE_KEY}")
    last = arrays[max(indexed)[1]]
    cells, remainder = divmod(int(head.shape[1]), int(last.shape[0]))
    side = math.isqrt(cells)
    if remainder or side * side != cells:
        raise TrainingError(f"cnn image is not square: store {INPUT_SHAPE_KEY} with the weights")
    return (int(first.shape[1]), side * ZOO_POOLING, side * ZOO_POOLING), num_classes


def _load_zoo(
    version: ModelVersion, path: Path, spec: Any, metadata: dict[str, str]
) -> LoadedModel:
    import torch
    from safetensors.numpy import load_file

    from hivenode.models.training import zoo
    from hivenode.models.training.torch_backend import load_arrays

    arrays = load_file(str(path))
    feature_shape, num_classes = zoo_shapes(spec.name, arrays, metadata)
    module = zoo.build_model(spec.name, spec.options, feature_shape, num_classes)
    load_arrays(module, arrays)
    module.eval()  # safe: nn.Module.eval() switches to inference mode; nothing is evaluated

    def predict(batch: NDArray) -> tuple[NDArray, ...]:
        with torch.inference_mode():
            return (module(torch.from_numpy(batch)).numpy(),)

    return LoadedModel(
        spec=version.spec,
        framework="torch",
        signature=Signature(feature_shape, np.dtype(np.float32), flat=True),
        predict=predict,
        weights_bytes=sum(a.nbytes for a in arrays.values()),
        module=module,
    )


def _load_hf(version: ModelVersion, path: Path, spec: Any) -> LoadedModel:
    import torch
    from safetensors.numpy import load_file

    from hivenode.models.training.hf_backend import build_model
    from hivenode.models.training.torch_backend import infer_num_classes, load_arrays

    arrays = load_file(str(path))
    num_classes = infer_num_classes(lambda n: build_model(spec, n), arrays, version.spec)
    module = build_model(spec, num_classes)
    load_arrays(module, arrays)
    module.eval()  # safe: nn.Module.eval() switches to inference mode; nothing is evaluated
    config: Any = module.config
    vocab = int(config.vocab_size)
    positions = getattr(config, "max_position_embeddings", None)

    def validate(batch: NDArray) -> None:
        if batch.size and (int(batch.min()) < 0 or int(batch.max()) >= vocab):
            raise InferenceError(
                Code.BAD_INPUT, f"token ids must lie in 0..{vocab - 1} (the vocabulary)"
            )
        if positions is not None and batch.shape[1] > positions:
            raise InferenceError(
                Code.BAD_INPUT, f"sequences of {batch.shape[1]} tokens: at most {positions}"
            )

    def predict(batch: NDArray) -> tuple[NDArray, ...]:
        ids = torch.from_numpy(batch)
        with torch.inference_mode():
            out: Any = module(input_ids=ids, attention_mask=torch.ones_like(ids))
            return (out.logits.numpy(),)

    return LoadedModel(
        spec=version.spec,
        framework="hf",
        signature=Signature((None,), np.dtype(np.int64), integers=True),
        predict=predict,
        validate=validate,
        weights_bytes=sum(a.nbytes for a in arrays.values()),
    )


# --- scikit-learn through skops ----------------------------------------------------------


def _load_skops(version: ModelVersion, path: Path) -> LoadedModel:
    try:
        import skops.io as sio  # type: ignore[import-untyped]
    except ImportError as exc:
        raise InferenceError(
            Code.UNSUPPORTED_MODEL, "serving skops models needs skops (hivenode[sklearn])"
        ) from exc
    from hivenode.models.pickle_allowlist import is_allowed

    untrusted = sio.get_untrusted_types(file=path)
    refused = sorted(t for t in untrusted if not is_allowed(t))
    if refused:
        raise InferenceError(
            Code.UNSUPPORTED_MODEL,
            f"{version.spec}: skops archive uses types outside the allow-list: "
            f"{', '.join(refused[:5])}",
        )
    estimator = sio.load(path, trusted=untrusted)
    features = getattr(estimator, "n_features_in_", None)
    if not isinstance(features, int):
        raise InferenceError(
            Code.UNSUPPORTED_MODEL, f"{version.spec}: not a fitted estimator (no n_features_in_)"
        )
    method = getattr(estimator, "predict_proba", None) or estimator.predict

    def predict(batch: NDArray) -> tuple[NDArray, ...]:
        return (np.asarray(method(batch)),)

    return LoadedModel(
        spec=version.spec,
        framework="sklearn",
        signature=Signature((features,), np.dtype(np.float64), flat=True),
        predict=predict,
        weights_bytes=version.size_bytes,
    )


# --- ONNX through onnxruntime ------------------------------------------------------------


def _load_onnx(version: ModelVersion, path: Path) -> LoadedModel:
    try:
        import onnxruntime as ort  # type: ignore[import-untyped]
    except ImportError as exc:
        raise InferenceError(
            Code.UNSUPPORTED_MODEL, "serving ONNX models needs onnxruntime (hivenode[onnx])"
        ) from exc
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own zoo for bad graphs
        raise InferenceError(
            Code.UNSUPPORTED_MODEL, f"{version.spec}: onnxruntime cannot load it: {exc}"
        ) from exc
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise InferenceError(
            Code.UNSUPPORTED_MODEL, f"{version.spec}: {len(inputs)} inputs ({names}); one is served"
        )
    graph_input = inputs[0]
    dtype = _ONNX_DTYPES.get(graph_input.type)
    if dtype is None or not graph_input.shape:
        raise InferenceError(
            Code.UNSUPPORTED_MODEL,
            f"{version.spec}: input {graph_input.name} is {graph_input.type} "
            f"{graph_input.shape}; a batch-first numeric tensor is served",
        )
    batch_dim, *sample = graph_input.shape
    shape = tuple(d if isinstance(d, int) and d > 0 else None for d in sample)
    name = graph_input.name

    def run(batch: NDArray) -> tuple[NDArray, ...]:
        return tuple(np.asarray(out) for out in session.run(None, {name: batch}))

    fixed = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
    return LoadedModel(
        spec=version.spec,
        framework="onnx",
        signature=Signature(shape, np.dtype(dtype), integers=np.dtype(dtype).kind in "iu"),
        predict=run if fixed is None else _in_fixed_batches(run, fixed),
        weights_bytes=version.size_bytes,
    )


def _in_fixed_batches(run: Predict, size: int) -> Predict:
    """`run` for a graph exported with a fixed batch of `size`: any batch goes through in
    chunks of `size`, the last padded with zeros and its padding cut from the outputs."""

    def predict(batch: NDArray) -> tuple[NDArray, ...]:
        parts: list[tuple[NDArray, ...]] = []
        for start in range(0, len(batch), size):
            chunk = batch[start : start + size]
            short = size - len(chunk)
            if short:
                padding = np.zeros((short, *chunk.shape[1:]), chunk.dtype)
                chunk = np.concatenate([chunk, padding])
            outputs = run(chunk)
            parts.append(tuple(out[: size - short] for out in outputs))
        return tuple(np.concatenate(column) for column in zip(*parts, strict=True))

    return predict
