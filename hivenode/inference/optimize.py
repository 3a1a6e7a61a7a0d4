"""Faster variants of a served torch model, measured before one is served: dynamic int8
quantisation of its Linear layers, and an ONNX export run by onnxruntime.

Each variant is timed on a batch and compared with the model as loaded on a held-out batch
(the caller's, else random inputs of the model's shape): the share of samples whose top
class agrees, and the largest output difference. The fastest variant whose disagreement
stays within the accuracy budget wins; the model as loaded is always a candidate.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from hivenode.inference.errors import Code, InferenceError
from hivenode.inference.runtime import LoadedModel, NDArray

log = logging.getLogger(__name__)

TIMED_CALLS = 50
HELD_OUT_SAMPLES = 256
FREE_AXIS = 8


@dataclass(frozen=True)
class Trial:
    """One variant, as measured."""

    variant: str
    model: LoadedModel | None
    latency_ms: float | None
    """Median of TIMED_CALLS calls on a batch of `batch` samples."""
    agreement: float | None
    """Share of held-out samples whose top class matches the model as loaded."""
    max_abs_diff: float | None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 4),
            "agreement": self.agreement,
            "max_abs_diff": self.max_abs_diff,
            "error": self.error,
        }


Maker = Callable[[LoadedModel], LoadedModel]


def trials(model: LoadedModel, batch: int = 32, held_out: NDArray | None = None) -> list[Trial]:
    """Every variant of `model` this node can make, measured; blocking (run in a thread)."""
    if model.module is None or model.framework != "torch":
        raise InferenceError(
            Code.UNSUPPORTED_MODEL, f"{model.spec}: variants are made of torch zoo models only"
        )
    inputs = model.prepare(held_out) if held_out is not None else _random_inputs(model)
    reference = model.predict(inputs)[0]
    timing = (
        inputs[:batch] if len(inputs) >= batch else np.resize(inputs, (batch, *inputs.shape[1:]))
    )
    made: list[Trial] = [_measure(model, "as loaded", inputs, timing, reference)]
    makers: dict[str, Maker] = {"int8": _int8, "onnx": _onnx}
    for name, make in makers.items():
        try:
            variant = make(model)
        except Exception as exc:  # a variant that cannot be made is reported, not fatal
            log.info("%s: no %s variant: %r", model.spec, name, exc)
            made.append(Trial(name, None, None, None, None, error=f"{type(exc).__name__}: {exc}"))
            continue
        made.append(_measure(variant, name, inputs, timing, reference))
    return made


def best(found: list[Trial], accuracy_budget: float) -> Trial:
    """The fastest trial that disagrees with the model as loaded on at most
    `accuracy_budget` of the held-out samples."""
    allowed = [
        t
        for t in found
        if t.model is not None
        and t.latency_ms is not None
        and t.agreement is not None
        and 1 - t.agreement <= accuracy_budget
    ]
    return min(allowed, key=lambda t: t.latency_ms or 0.0)


def _measure(
    model: LoadedModel, name: str, inputs: NDArray, timing: NDArray, reference: NDArray
) -> Trial:
    outputs = model.predict(inputs)[0]
    agreement = float(np.mean(outputs.argmax(axis=1) == reference.argmax(axis=1)))
    diff = float(np.max(np.abs(outputs.astype(np.float64) - reference)))
    for _ in range(5):
        model.predict(timing)
    times = []
    for _ in range(TIMED_CALLS):
        started = time.perf_counter()
        model.predict(timing)
        times.append((time.perf_counter() - started) * 1000)
    return Trial(name, model, statistics.median(times), agreement, diff)


def _random_inputs(model: LoadedModel) -> NDArray:
    shape = tuple(FREE_AXIS if d is None else d for d in model.signature.shape)
    rng = np.random.default_rng(0)
    return rng.normal(size=(HELD_OUT_SAMPLES, *shape)).astype(model.signature.dtype)


def _int8(model: LoadedModel) -> LoadedModel:
    import torch
    from torch import nn

    with warnings.catch_warnings():  # torch announces a successor API; this one still works
        warnings.simplefilter("ignore")
        quantize: Any = torch.ao.quantization.quantize_dynamic
        quantised = quantize(model.module, {nn.Linear}, dtype=torch.qint8)

    def predict(batch: NDArray) -> tuple[NDArray, ...]:
        with torch.inference_mode():
            return (quantised(torch.from_numpy(batch)).numpy(),)

    return replace(model, predict=predict, module=quantised, variant="int8")


def _onnx(model: LoadedModel) -> LoadedModel:
    import onnxruntime as ort  # type: ignore[import-untyped]
    import torch

    shape = tuple(FREE_AXIS if d is None else d for d in model.signature.shape)
    example = (torch.zeros((1, *shape), dtype=torch.float32),)
    with tempfile.TemporaryDirectory(prefix="hivenode-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model.module,
                example,
                str(path),
                dynamo=False,
                input_names=["x"],
                dynamic_axes={"x": {0: "batch"}},
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3
        session = ort.InferenceSession(
            path.read_bytes(), sess_options=options, providers=["CPUExecutionProvider"]
        )

    def predict(batch: NDArray) -> tuple[NDArray, ...]:
        return (np.asarray(session.run(None, {"x": batch})[0]),)

    return replace(model, predict=predict, module=None, framework="onnx", variant="onnx")
