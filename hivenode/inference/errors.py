"""The inference part's one exception type, and the codes that tell its failures apart."""

from __future__ import annotations

from enum import StrEnum

from hivenode.agent.errors import RpcError


class Code(StrEnum):
    """Why an inference request or a model load failed; each is its own wire error code."""

    UNKNOWN_MODEL = "unknown_model"
    """The worker does not serve the model (or no worker in the swarm does)."""
    BAD_INPUT = "bad_input"
    """The input tensors do not match the model's input: count, shape or dtype."""
    BUSY = "busy"
    """The worker's queue is full: it refused at once rather than queue without bound."""
    TIMEOUT = "timeout"
    """No answer within the request's time budget."""
    INSUFFICIENT_MEMORY = "insufficient_memory"
    """The model does not fit this node's memory; the message carries the numbers."""
    UNSUPPORTED_MODEL = "unsupported_model"
    """The model's format or framework cannot be served safely here."""
    UNREACHABLE = "unreachable"
    """The worker could not be reached, or its stream broke mid-request."""
    NO_WORKER = "no_worker"
    """No worker in the peer table advertises the model."""
    FAILED = "failed"
    """The model raised while computing; the message says what it said."""


RETRYABLE = frozenset({Code.BUSY, Code.TIMEOUT, Code.UNREACHABLE, Code.UNKNOWN_MODEL})
"""Failures another worker may not share; an idempotent request is retried once on those.
(A stale advert makes a worker look like it serves a model it has dropped: another may.)"""


class InferenceError(RpcError):
    """An inference request or model load failed. An RpcError, so a handler that raises it
    answers the caller with its code; the router turns remote ones back into it."""

    def __init__(self, code: Code | str, message: str) -> None:
        super().__init__(str(code), message)

    @property
    def kind(self) -> Code | None:
        """The code as a `Code`, None when a peer sent one this node does not know."""
        try:
            return Code(self.code)
        except ValueError:
            return None

    @classmethod
    def of(cls, exc: RpcError) -> InferenceError:
        """A peer's RpcError (or ours) as an InferenceError with the same code and message."""
        if isinstance(exc, InferenceError):
            return exc
        code = {"bad_reply": Code.UNREACHABLE, "bad_request": Code.BAD_INPUT}.get(exc.code)
        return cls(code or exc.code, exc.message)
