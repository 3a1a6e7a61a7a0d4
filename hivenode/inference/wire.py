"""`/hivenode/infer/1.0.0`: one inference request and its reply, as protocol Messages.

Request: method `infer`, body `{"model": NAME[@VERSION], "timeout_ms": budget}`, the input
as raw tensor frames (one tensor, batch first). Reply: body `{"model": NAME@VERSION,
"queue": requests waiting at the worker, "compute_ms", "batch": samples in the batch it
ran in}`, the outputs as tensor frames (batch first). Errors are the rpc error reply with an
`inference.errors.Code`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hivenode.inference.errors import Code, InferenceError
from hivenode.protocol.ids import DEPLOY_PROTOCOL as DEPLOY_PROTOCOL
from hivenode.protocol.ids import INFER_PROTOCOL as INFER_PROTOCOL
from hivenode.protocol.limits import Limits
from hivenode.protocol.message import Message

INFER_METHOD = "infer"
INFER_LIMITS = Limits(max_header_bytes=64 * 1024, max_tensors=16, max_total_bytes=64 * 1024**2)
"""An input or output of up to 64 MiB: a batch of images, not a dataset."""
MAX_TIMEOUT_MS = 600_000


@dataclass(frozen=True)
class InferRequest:
    """What a worker reads from a request: the model wanted and the caller's time budget."""

    model: str
    timeout_s: float | None

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model}
        if self.timeout_s is not None:
            body["timeout_ms"] = max(1, round(self.timeout_s * 1000))
        return body

    @classmethod
    def from_message(cls, message: Message) -> InferRequest:
        if message.type != INFER_METHOD:
            raise InferenceError(Code.BAD_INPUT, f"expected method {INFER_METHOD!r}")
        model = message.body.get("model")
        if not isinstance(model, str) or not model:
            raise InferenceError(Code.BAD_INPUT, "the request names no model (body 'model')")
        timeout_ms = message.body.get("timeout_ms")
        if timeout_ms is None:
            return cls(model, None)
        if not isinstance(timeout_ms, int) or isinstance(timeout_ms, bool) or timeout_ms < 1:
            raise InferenceError(Code.BAD_INPUT, "timeout_ms must be a positive integer")
        return cls(model, min(timeout_ms, MAX_TIMEOUT_MS) / 1000)


@dataclass(frozen=True)
class InferReply:
    """What a worker says besides the outputs: the exact version, its queue, the batch."""

    model: str
    queue: int
    compute_ms: float
    batch: int

    def to_body(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "queue": self.queue,
            "compute_ms": round(self.compute_ms, 3),
            "batch": self.batch,
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> InferReply:
        def number(key: str) -> float:
            # a worker's figures are advisory: anything not a finite number counts as 0
            value = body.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int | float):
                return 0.0
            value = float(value)
            return value if math.isfinite(value) and abs(value) < 2**53 else 0.0

        return cls(
            model=str(body.get("model", "")),
            queue=int(number("queue")),
            compute_ms=number("compute_ms"),
            batch=int(number("batch")),
        )


def name_of(model: str) -> str:
    """`mlp@2` → `mlp`."""
    return model.partition("@")[0]


def matches_spec(requested: str, spec: str) -> bool:
    """Does a served NAME@VERSION answer a request for `requested`? `mlp` asks for whatever
    version is served, `mlp@2` for that version only."""
    if "@" in requested:
        return requested == spec
    return name_of(spec) == requested


DEPLOY_METHOD = "deploy"
UNDEPLOY_METHOD = "undeploy"
