"""A model loaded for serving: what input it takes, and the call that computes a batch."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from hivenode.inference.errors import Code, InferenceError

NDArray = npt.NDArray[Any]
Predict = Callable[[NDArray], tuple[NDArray, ...]]
"""A batch (batch first, in the signature's dtype) → the outputs (batch first); blocking."""


@dataclass(frozen=True)
class Signature:
    """The input a model takes, per sample.

    `shape`: sizes per sample, None where any size goes (an ONNX symbolic axis, a sequence);
    `flat`: any per-sample shape with as many elements goes (zoo models flatten first, so an
    8×8 digit and its 64 values are the same input); `dtype`: what the model computes in
    (inputs are cast to it); `integers`: the model takes ids (token ids), so float inputs
    must hold whole numbers.
    """

    shape: tuple[int | None, ...]
    dtype: np.dtype[Any]
    flat: bool = False
    integers: bool = False

    def describe(self) -> str:
        dims = ", ".join("*" if d is None else str(d) for d in self.shape)
        return f"(n, {dims}) {self.dtype.name}" if dims else f"(n,) {self.dtype.name}"

    def as_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype.name, "flat": self.flat}


@dataclass(frozen=True)
class LoadedModel:
    """One model in memory, ready to compute batches."""

    spec: str
    """NAME@VERSION in the registry it came from."""
    framework: str
    signature: Signature
    predict: Predict
    validate: Callable[[NDArray], None] | None = None
    """Model-specific checks on a prepared input (token ids within the vocabulary...)."""
    weights_bytes: int = 0
    module: Any = None
    """The framework's own model object (a torch module), for variants made from it."""
    variant: str = "as loaded"
    """How this copy differs from the registry's: `as loaded`, `int8`, `onnx`."""

    def prepare(self, array: NDArray) -> NDArray:
        """`array` checked against the signature and cast to its dtype: a batch the model
        can compute, in memory of its own (inputs arrive as read-only views of the wire)."""
        sig = self.signature
        expected = sig.describe()
        if array.ndim < 1 or array.shape[0] < 1:
            raise InferenceError(
                Code.BAD_INPUT, f"input shape {list(array.shape)}: expected {expected}"
            )
        if array.dtype.kind not in "biuf":
            raise InferenceError(
                Code.BAD_INPUT, f"input dtype {array.dtype.name}: expected numbers ({expected})"
            )
        if not _shape_matches(tuple(array.shape[1:]), sig):
            raise InferenceError(
                Code.BAD_INPUT,
                f"input shape {list(array.shape)} does not match the model's {expected}",
            )
        if sig.integers and array.dtype.kind == "f" and not np.all(np.mod(array, 1) == 0):
            raise InferenceError(Code.BAD_INPUT, f"the model takes whole numbers ({expected})")
        batch = np.array(array, dtype=sig.dtype, order="C", copy=True)
        if sig.flat and sig.shape and batch.shape[1:] != sig.shape:
            batch = batch.reshape((len(batch), *(d or 1 for d in sig.shape)))
        if self.validate is not None:
            self.validate(batch)
        return batch


def _shape_matches(sample: tuple[int, ...], sig: Signature) -> bool:
    if sig.flat and None not in sig.shape:
        known = [d for d in sig.shape if d is not None]
        return math.prod(sample) == math.prod(known)
    if len(sample) != len(sig.shape):
        return False
    return all(want is None or want == got for want, got in zip(sig.shape, sample, strict=True))
