"""Dtype names as the frameworks spell them, and how many bytes one element takes."""

from __future__ import annotations

DTYPE_BYTES: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e8m0fnu": 1,
    "complex128": 16,
    "complex64": 8,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint64": 8,
    "uint32": 4,
    "uint16": 2,
    "uint8": 1,
    "qint32": 4,
    "qint8": 1,
    "quint8": 1,
    "bool": 1,
}

_DTYPE_ALIASES: dict[str, str] = {
    "f64": "float64",
    "double": "float64",
    "f32": "float32",
    "float": "float32",
    "f16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "f8_e4m3": "float8_e4m3fn",
    "f8_e4m3fn": "float8_e4m3fn",
    "f8_e5m2": "float8_e5m2",
    "i64": "int64",
    "long": "int64",
    "i32": "int32",
    "int": "int32",
    "i16": "int16",
    "i8": "int8",
    "u8": "uint8",
    "bool_": "bool",
}

DEFAULT_DTYPE = "float32"
"""Assumed when identification found no floating dtype."""


def normalize_dtype(name: str) -> str | None:
    """Canonical name: `torch.float16`, `F16`, `half` → `float16`; `FLOAT` (ONNX) →
    `float32`; None when not known."""
    key = name.strip().lower().removeprefix("torch.").removeprefix("tf.").removeprefix("np.")
    key = _DTYPE_ALIASES.get(key, key)
    return key if key in DTYPE_BYTES else None


def parameter_dtype(dtypes: tuple[str, ...]) -> str:
    """The dtype parameters are priced at: the widest floating dtype in `dtypes` (integer
    tensors such as BatchNorm's num_batches_tracked are buffers, not trained parameters),
    else the widest known dtype, else DEFAULT_DTYPE."""
    known = [d for d in (normalize_dtype(name) for name in dtypes) if d is not None]
    floating = [d for d in known if d.startswith(("float", "bfloat"))]
    pool = floating or known
    if not pool:
        return DEFAULT_DTYPE
    return max(pool, key=lambda d: DTYPE_BYTES[d])
