"""Inference in the daemon: the worker role (when the node has it) and the router, with
their control-API routes.

- `POST /v1/infer` `{"model", "inputs", "idempotent"?, "timeout"?}` → the outputs and who
  answered (routed to the best worker, this node's own included);
- `GET /v1/inference`: the models this node serves;
- `POST /v1/inference/serve` / `.../unserve` `{"model": NAME[@VERSION]}` (mutating): on
  this node's own worker;
- `POST /v1/inference/deploy` `{"model", "replicas"}` / `.../undeploy` `{"model"}`
  (mutating): placed on the swarm's workers (see deploy.py);
- `POST /v1/inference/optimize` `{"model", "accuracy_budget"?, "apply"?}` (mutating): this
  worker's variants of a served model measured, the fastest within budget served on apply;
- `GET /v1/inference/stats/{name}`: requests, success rate, p50/p95/p99, throughput, per
  worker and together.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from hivenode.agent.control import ApiError, ControlApi, Request
from hivenode.agent.node import Node
from hivenode.inference.deploy import DeployHandler, deploy, undeploy
from hivenode.inference.errors import Code, InferenceError
from hivenode.inference.metrics import InferenceMetrics
from hivenode.inference.router import Router
from hivenode.inference.settings import InferenceSettings
from hivenode.inference.tensor_json import tensor_from_json, tensor_to_json
from hivenode.inference.worker import InferenceWorker
from hivenode.protocol.advert import Role

log = logging.getLogger(__name__)

DEFAULT_ACCURACY_BUDGET = 0.01
"""Share of held-out samples whose top class a served variant may change."""

HTTP_STATUS = {
    Code.BAD_INPUT: 400,
    Code.UNKNOWN_MODEL: 404,
    Code.NO_WORKER: 404,
    Code.UNSUPPORTED_MODEL: 422,
    Code.FAILED: 502,
    Code.UNREACHABLE: 502,
    Code.BUSY: 503,
    Code.TIMEOUT: 504,
    Code.INSUFFICIENT_MEMORY: 507,
}
"""The control API's status for each failure; the message keeps the code as its prefix."""


class InferenceService:
    """The inference role in the daemon (a `DaemonService`)."""

    def __init__(self, settings: InferenceSettings | None = None) -> None:
        self._settings = settings
        self.worker: InferenceWorker | None = None
        self._deployments: DeployHandler | None = None
        self._router: Router | None = None
        self._node: Node | None = None
        self._state_dir = Path()

    @property
    def router(self) -> Router:
        if self._router is None:
            raise RuntimeError("the inference service is not installed")
        return self._router

    def install(self, node: Node, api: ControlApi, state_dir: Path) -> None:
        settings = self._settings or _settings_of(node)
        metrics = InferenceMetrics(node.metrics.registry)
        self._node, self._state_dir = node, state_dir
        if Role.INFERENCE in node.settings.roles:
            self.worker = InferenceWorker(node, state_dir, settings, metrics)
            self.worker.install()
            self._deployments = DeployHandler(self.worker)
            self._deployments.install()
        self._router = Router(node, settings, metrics, local=self.worker)
        api.route("POST", "/v1/infer", self._infer)
        api.route("GET", "/v1/inference", self._list)
        api.route("POST", "/v1/inference/serve", self._serve, mutating=True)
        api.route("POST", "/v1/inference/unserve", self._unserve, mutating=True)
        api.route("POST", "/v1/inference/deploy", self._deploy, mutating=True)
        api.route("POST", "/v1/inference/undeploy", self._undeploy, mutating=True)
        api.route("POST", "/v1/inference/optimize", self._optimize, mutating=True)
        api.route("GET", "/v1/inference/stats/{name}", self._stats)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            if self.worker is None or self._deployments is None:
                task_status.started()
                await trio.sleep_forever()
                return
            async with trio.open_nursery() as nursery:
                await nursery.start(self.worker.run)
                task_status.started()
                await self._deployments.restore()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self.router.aclose()

    # --- routes ------------------------------------------------------------------------------

    async def _infer(self, request: Request, params: dict[str, str]) -> Any:
        body = _json_body(request)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "give the model to run: {'model': NAME[@VERSION], 'inputs': ...}")
        timeout = body.get("timeout")
        if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
            raise ApiError(400, "timeout must be a positive number of seconds")
        with _as_api_errors():
            inputs = tensor_from_json(body.get("inputs"))
            result = await self.router.infer(
                model,
                inputs,
                idempotent=bool(body.get("idempotent", True)),
                timeout=float(timeout) if timeout is not None else None,
            )
        return {**result.as_json(), "outputs": [tensor_to_json(o) for o in result.outputs]}

    async def _list(self, request: Request, params: dict[str, str]) -> Any:
        return {
            "worker": self.worker is not None,
            "serving": self.worker.served() if self.worker else [],
        }

    async def _serve(self, request: Request, params: dict[str, str]) -> Any:
        worker = self._require_worker()
        with _as_api_errors():
            return await worker.serve(_model_of(_json_body(request)))

    async def _unserve(self, request: Request, params: dict[str, str]) -> Any:
        worker = self._require_worker()
        model = _model_of(_json_body(request))
        with _as_api_errors():
            worker.unserve(model)
        return {"unserved": model}

    async def _deploy(self, request: Request, params: dict[str, str]) -> Any:
        assert self._node is not None
        body = _json_body(request)
        replicas = body.get("replicas", 1)
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
            raise ApiError(400, "replicas must be a positive integer")
        with _as_api_errors():
            return await deploy(self._node, self.worker, self._state_dir, _model_of(body), replicas)

    async def _undeploy(self, request: Request, params: dict[str, str]) -> Any:
        assert self._node is not None
        with _as_api_errors():
            return await undeploy(self._node, self.worker, _model_of(_json_body(request)))

    async def _optimize(self, request: Request, params: dict[str, str]) -> Any:
        worker = self._require_worker()
        body = _json_body(request)
        budget = body.get("accuracy_budget", DEFAULT_ACCURACY_BUDGET)
        if not isinstance(budget, int | float) or not 0 <= budget <= 1:
            raise ApiError(400, "accuracy_budget is a share of samples, from 0 to 1")
        with _as_api_errors():
            return await worker.optimize(
                _model_of(body), float(budget), apply=bool(body.get("apply", False))
            )

    async def _stats(self, request: Request, params: dict[str, str]) -> Any:
        name = params["name"]
        metrics = self.router.metrics
        return {
            "model": name,
            "all": metrics.summary(name).as_json(),
            "workers": {w: metrics.summary(name, w).as_json() for w in metrics.workers_of(name)},
        }

    def _require_worker(self) -> InferenceWorker:
        if self.worker is None:
            raise ApiError(409, "this node does not have the inference role")
        return self.worker


@contextmanager
def _as_api_errors() -> Iterator[None]:
    """InferenceError → ApiError with the status that fits its code."""
    try:
        yield
    except InferenceError as exc:
        status = HTTP_STATUS.get(exc.kind, 502) if exc.kind else 502
        raise ApiError(status, str(exc)) from exc


def _settings_of(node: Node) -> InferenceSettings:
    found = getattr(node.settings, "inference", None)
    if found is None:
        return InferenceSettings()
    if isinstance(found, InferenceSettings):
        return found
    return InferenceSettings.model_validate(found.model_dump())


def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(request.body or b"{}")
    except ValueError as exc:
        raise ApiError(400, f"the body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _model_of(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "give the model: {'model': NAME[@VERSION]}")
    return model
