"""A Python client of the local daemon's inference routes: numpy in, numpy out.

    from hivenode.inference.client import InferenceClient
    outputs = InferenceClient().infer("digits", x).outputs

It talks to the control socket with the stdlib (no libp2p, no ML framework imported), so
scripts and notebooks start fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hivenode.agent.control_client import ControlError, call
from hivenode.inference.errors import Code, InferenceError
from hivenode.inference.runtime import NDArray
from hivenode.inference.tensor_json import tensor_from_json, tensor_to_json

HTTP_MARGIN_S = 5.0
"""The HTTP call waits this much longer than the request's own budget."""


@dataclass(frozen=True)
class ClientResult:
    outputs: tuple[NDArray, ...]
    model: str
    worker: str
    latency_ms: float
    attempts: int


class InferenceClient:
    """Inference through the daemon at `socket_path` (default: where `hivenode run` puts it,
    as `hivenode status` finds it)."""

    def __init__(
        self,
        socket_path: Path | None = None,
        config: Path | None = None,
        runtime_dir: Path | None = None,
    ) -> None:
        if socket_path is None:
            from hivenode.agent.paths import client_socket_path

            socket_path = client_socket_path(config, runtime_dir)
        self.socket_path = socket_path

    def infer(
        self,
        model: str,
        inputs: NDArray | list[Any],
        *,
        idempotent: bool = True,
        timeout: float = 10.0,
    ) -> ClientResult:
        """`model`'s outputs for `inputs` (batch first); InferenceError with the swarm's code
        (unknown_model, bad_input, busy, timeout, ...) when it fails."""
        import numpy as np

        tensor = tensor_to_json(np.asarray(inputs))
        body = {"model": model, "inputs": tensor, "idempotent": idempotent, "timeout": timeout}
        reply = self._call("POST", "/v1/infer", body, timeout + HTTP_MARGIN_S)
        return ClientResult(
            outputs=tuple(tensor_from_json(raw) for raw in reply["outputs"]),
            model=str(reply["model"]),
            worker=str(reply["worker"]),
            latency_ms=float(reply["latency_ms"]),
            attempts=int(reply["attempts"]),
        )

    def serve(self, model: str) -> dict[str, Any]:
        """Load `model` (NAME[@VERSION]) from the daemon's registry and serve it."""
        result: dict[str, Any] = self._call("POST", "/v1/inference/serve", {"model": model}, 120)
        return result

    def stats(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/inference/stats/{name}", None, 10)
        return result

    def _call(self, method: str, path: str, body: Any, timeout: float) -> Any:
        try:
            return call(self.socket_path, method, path, timeout, body)
        except ControlError as exc:
            raise _as_inference_error(exc) from exc


def _as_inference_error(exc: ControlError) -> InferenceError:
    """The daemon's message is `code: text` for inference failures; others keep their text."""
    code, sep, text = str(exc).partition(": ")
    if sep and code in Code.__members__.values():
        return InferenceError(code, text)
    return InferenceError(Code.UNREACHABLE, str(exc))
