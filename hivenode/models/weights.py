"""Named weight tensors from any format: dtype names, parameter counts and layer summaries.

Parameters are counted the way each framework counts its own: buffers are not parameters
(torch's `model.parameters()`, Hugging Face's `num_parameters()`), and a tensor shared by two
names (tied embeddings) counts once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from hivenode.models.info import LayerSummary

_DTYPE_ALIASES = {
    # safetensors codes
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "C64": "complex64",
    "C128": "complex128",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "F4": "float4_e2m1fn_x2",
    # torch storage classes
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "QInt8Storage": "qint8",
    "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32",
    # other spellings
    "half": "float16",
    "float": "float32",
    "double": "float64",
}

SAFETENSORS_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "C64": 8, "C128": 16,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}  # fmt: skip

_WEIGHT_DTYPES = re.compile(r"(b?float|complex|q?u?int8$|qint)")
"""Dtypes whose tensors can be learned weights (quantised int8 weights included); integer and
bool tensors are counters, ids and masks: buffers."""

BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked", "inv_freq", "masked_bias")
"""Tensors that are saved with the weights but are not parameters (torch buffers)."""


def dtype_name(code: str) -> str:
    """One spelling for every format's dtype names: float32, bfloat16, int64, ..."""
    return _DTYPE_ALIASES.get(code, code.lower())


@dataclass(frozen=True)
class Tensor:
    """One named weight: its shape, its dtype and, when known, what storage it lives in."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    storage: Hashable | None = None
    """Tensors with equal non-None `storage` are views of one buffer: counted once."""
    buffer: bool | None = None
    """True/False when the file says; None to decide by name and dtype."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_buffer(self) -> bool:
        if self.buffer is not None:
            return self.buffer
        leaf = self.name.rsplit(".", 1)[-1].rsplit("/", 1)[-1]
        return leaf in BUFFER_SUFFIXES or _WEIGHT_DTYPES.match(self.dtype) is None


@dataclass(frozen=True)
class Counts:
    parameters: int
    buffers: int
    """How many buffer tensors (BatchNorm statistics, position ids, masks, ...)."""
    buffer_elements: int


def count(tensors: Iterable[Tensor]) -> Counts:
    """Parameters (each shared storage view once) and buffers."""
    seen: set[Hashable] = set()
    parameters = buffers = buffer_elements = 0
    for tensor in tensors:
        if tensor.storage is not None:
            if tensor.storage in seen:
                continue
            seen.add(tensor.storage)
        if tensor.is_buffer:
            buffers += 1
            buffer_elements += tensor.numel
        else:
            parameters += tensor.numel
    return Counts(parameters, buffers, buffer_elements)


def dtypes(tensors: Iterable[Tensor]) -> tuple[str, ...]:
    return tuple(sorted({tensor.dtype for tensor in tensors}))


def split_name(name: str) -> tuple[str, str]:
    """`encoder.layer.0.attention.self.query.weight` → (`…query`, `weight`); also `a/b/kernel`."""
    for sep in (".", "/"):
        if sep in name:
            prefix, _, leaf = name.rpartition(sep)
            return prefix, leaf
    return "", name


def layer_summary(
    tensors: Sequence[Tensor], kinds: Mapping[str, str] | None = None
) -> tuple[LayerSummary, ...]:
    """One entry per module (the tensors' common name prefix), in file order.

    `kinds` maps a module name to its class when the file says (pickled modules, Keras
    configs); otherwise the kind is read from the tensors' names and shapes.
    """
    groups: dict[str, dict[str, Tensor]] = {}
    for tensor in tensors:
        prefix, leaf = split_name(tensor.name)
        groups.setdefault(prefix, {})[leaf] = tensor
    seen: set[Hashable] = set()
    layers: list[LayerSummary] = []
    for prefix, members in groups.items():
        parameters = 0
        for tensor in members.values():
            if tensor.is_buffer or (tensor.storage is not None and tensor.storage in seen):
                continue
            if tensor.storage is not None:
                seen.add(tensor.storage)
            parameters += tensor.numel
        kind = (kinds or {}).get(prefix) or guess_kind(prefix, members)
        main = _main_weight(members)
        layers.append(
            LayerSummary(
                name=prefix or "(root)",
                kind=kind,
                parameters=parameters,
                shape=main.shape if main is not None else None,
            )
        )
    return tuple(layers)


def _main_weight(members: Mapping[str, Tensor]) -> Tensor | None:
    for leaf in ("weight", "kernel", "embeddings", "weight_ih_l0", "in_proj_weight", "gamma"):
        if leaf in members:
            return members[leaf]
    params = [t for t in members.values() if not t.is_buffer]
    return max(params, key=lambda t: t.numel) if params else None


_EMBEDDING_NAMES = re.compile(r"(emb|wte|wpe|embed_tokens|shared$|tok_embeddings)", re.I)
_NORM_NAMES = re.compile(r"(norm|^ln|_ln|ln_|layernorm|\bln\d*)", re.I)


def guess_kind(prefix: str, members: Mapping[str, Tensor]) -> str:
    """A layer class name from the names and shapes of its tensors."""
    last = prefix.replace("/", ".").rsplit(".", 1)[-1]
    recurrent = members.get("weight_hh_l0") or members.get("recurrent_kernel")
    if recurrent is not None and len(recurrent.shape) == 2:
        rows, cols = recurrent.shape
        gates = rows // cols if "weight_hh_l0" in members else cols // max(rows, 1)
        return {4: "LSTM", 3: "GRU"}.get(gates, "RNN")
    if "in_proj_weight" in members:
        return "MultiheadAttention"
    if "running_mean" in members or "moving_mean" in members:
        return "BatchNorm"
    weight = members.get("weight") or members.get("kernel")
    if weight is not None:
        rank = len(weight.shape)
        if rank in (3, 4, 5):
            return f"Conv{rank - 2}d"
        if rank == 2:
            return "Embedding" if _EMBEDDING_NAMES.search(last) else "Linear"
        if rank == 1:
            return "LayerNorm" if _NORM_NAMES.search(last) else "Norm"
    if "embeddings" in members or (_EMBEDDING_NAMES.search(last) and len(members) == 1):
        return "Embedding"
    if "gamma" in members:
        return "LayerNorm"
    return "Tensor"
