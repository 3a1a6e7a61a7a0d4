"""The inference worker role: models from the node's registry, served on
`/hivenode/infer/1.0.0` with dynamic batching, and named in the node's adverts."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trio

from hivenode.agent.node import Node
from hivenode.agent.rpc import Reply
from hivenode.inference.batcher import Batcher
from hivenode.inference.errors import Code, InferenceError
from hivenode.inference.loaders import load_model
from hivenode.inference.memory import available_ram, check_memory
from hivenode.inference.metrics import OK, InferenceMetrics
from hivenode.inference.runtime import LoadedModel, NDArray
from hivenode.inference.settings import InferenceSettings
from hivenode.inference.wire import (
    INFER_LIMITS,
    INFER_PROTOCOL,
    InferReply,
    InferRequest,
    matches_spec,
    name_of,
)
from hivenode.models.errors import ModelError
from hivenode.models.registry import ModelVersion, parse_spec
from hivenode.protocol.advert import Advert, Hardware, Load
from hivenode.protocol.message import Message

log = logging.getLogger(__name__)

REPLY_SHARE = 0.9
"""Of a caller's time budget, the share a request may spend at the worker: the rest carries
the answer back before the caller gives up."""
HANDLER_MARGIN_S = 1.0
"""The stream handler outlives the worker's own request timeout by this, so a late request
is answered `timeout` instead of dropped."""
WARMUP_SEQUENCE = 8
"""Size given to free axes (a sequence's length) of the warm-up input."""
QUEUE_FIELD = "inference_queue"
"""The Load field the lead adds for the queue length; written once it exists."""


@dataclass
class Served:
    """A model this worker serves, and its batcher's lifetime."""

    name: str
    model: LoadedModel
    batcher: Batcher
    memory_bytes: int
    loaded_at: float
    scope: trio.CancelScope

    def view(self) -> dict[str, Any]:
        return {
            "model": self.model.spec,
            "framework": self.model.framework,
            "variant": self.model.variant,
            "input": self.model.signature.as_json(),
            "queue": self.batcher.queue_length,
            "running": self.batcher.running,
            "memory_bytes": self.memory_bytes,
            "loaded_at": self.loaded_at,
        }


class InferenceWorker:
    """Serves registry models to the swarm. `install` before the node runs; `run` beside it."""

    def __init__(
        self,
        node: Node,
        state_dir: Path,
        settings: InferenceSettings | None = None,
        metrics: InferenceMetrics | None = None,
        available_memory: Callable[[], int] = available_ram,
    ) -> None:
        self.node = node
        self.state_dir = state_dir
        self.settings = settings or InferenceSettings()
        self.metrics = metrics or InferenceMetrics(node.metrics.registry)
        self._available_memory = available_memory
        self._served: dict[str, Served] = {}
        self._slots = trio.Semaphore(self.settings.concurrency)
        self._loading = trio.Lock()
        self._nursery: trio.Nursery | None = None

    def install(self) -> None:
        self.node.add_handler(
            INFER_PROTOCOL,
            self.handle,
            INFER_LIMITS,
            self.settings.request_timeout + HANDLER_MARGIN_S,
            session=True,
        )
        self.node.advert_hooks.append(self.advert_hook)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Load the configured models, then keep the batchers running until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            for spec in self.settings.serve:
                try:
                    await self.serve(spec)
                except InferenceError as exc:
                    log.error("not serving %s: %s", spec, exc.message)
            await trio.sleep_forever()

    # --- what is served ------------------------------------------------------------------

    @property
    def models(self) -> tuple[str, ...]:
        """NAME@VERSION of every served model, sorted."""
        return tuple(sorted(s.model.spec for s in self._served.values()))

    @property
    def queue_length(self) -> int:
        return sum(s.batcher.queue_length for s in self._served.values())

    def served(self) -> list[dict[str, Any]]:
        return [self._served[name].view() for name in sorted(self._served)]

    async def serve(self, spec: str) -> dict[str, Any]:
        """Load `spec` (NAME[@VERSION], latest when no version) from the registry, check it
        fits, warm it up and serve it, replacing another version of the same name."""
        self._require_running()
        async with self._loading:  # one load at a time: each sees the memory the last took
            version, path = await trio.to_thread.run_sync(self._resolve, spec)
            held = self._served.get(version.name)
            if held is not None and held.model.spec == version.spec:
                return held.view()
            hardware = await self._hardware()
            need = check_memory(
                version,
                hardware,
                self._available_memory(),
                self.settings.max_batch,
                self.settings.memory_reserve_bytes,
            )
            model = await trio.to_thread.run_sync(_load, version, path)
            if self.settings.warmup:
                await trio.to_thread.run_sync(warm_up, model, self.settings.max_batch)
            return self.serve_loaded(version.name, model, need)

    def serve_loaded(self, name: str, model: LoadedModel, memory_bytes: int = 0) -> dict[str, Any]:
        """Serve a model already in memory under `name` (a variant made here, such as an
        optimised one), replacing what was served under that name."""
        nursery = self._require_running()
        batcher = Batcher(
            model,
            self._slots,
            self.settings.max_batch,
            self.settings.max_batch_wait,
            self.settings.max_queue,
        )
        served = Served(name, model, batcher, memory_bytes, time.time(), trio.CancelScope())
        nursery.start_soon(_run_batcher, served)
        held = self._served.get(name)
        self._served[name] = served
        if held is not None:
            held.batcher.retire()  # what it holds is answered; new requests reach `served`
        self.node.advertise_soon()
        log.info("serving %s (%s, input %s)", model.spec, model.framework, model.signature)
        return served.view()

    def unserve(self, name: str) -> None:
        """Stop serving `name`; requests waiting for it are answered unknown_model."""
        held = self._served.pop(parse_spec(name)[0], None)
        if held is None:
            raise InferenceError(Code.UNKNOWN_MODEL, self._not_served(name))
        _stop(held)
        self.node.advertise_soon()

    async def optimize(
        self, name: str, accuracy_budget: float, apply: bool, held_out: NDArray | None = None
    ) -> dict[str, Any]:
        """Measure `name`'s variants (optimize.py); with `apply`, serve the fastest within
        `accuracy_budget` (a share of held-out samples whose top class may change)."""
        from hivenode.inference.optimize import best, trials

        held = self._served.get(name_of(name))
        if held is None:
            raise InferenceError(Code.UNKNOWN_MODEL, self._not_served(name))
        base = held.model
        if base.variant != "as loaded":  # compare with the registry's model, not a variant
            base = await trio.to_thread.run_sync(self._reload, base.spec)
        found = await trio.to_thread.run_sync(trials, base, self.settings.max_batch, held_out)
        chosen = best(found, accuracy_budget)
        if apply and chosen.model is not None and chosen.model.variant != held.model.variant:
            self.serve_loaded(held.name, chosen.model, held.memory_bytes)
        return {
            "model": base.spec,
            "accuracy_budget": accuracy_budget,
            "chosen": chosen.variant,
            "serving": self._served[held.name].model.variant,
            "variants": [t.as_json() for t in found],
        }

    def advert_hook(self, advert: Advert) -> Advert:
        update: dict[str, Any] = {"models": self.models}
        if QUEUE_FIELD in Load.model_fields:
            update["load"] = advert.load.model_copy(update={QUEUE_FIELD: self.queue_length})
        return advert.model_copy(update=update)

    # --- requests ------------------------------------------------------------------------

    async def handle(self, request: Message, caller: str) -> Reply:
        """The `/hivenode/infer/1.0.0` handler."""
        wanted = InferRequest.from_message(request)
        reply, outputs = await self.infer(wanted.model, request.tensors, wanted.timeout_s)
        return Reply(body=reply.to_body(), tensors=outputs)

    async def infer(
        self, model: str, inputs: tuple[NDArray, ...], timeout_s: float | None = None
    ) -> tuple[InferReply, tuple[NDArray, ...]]:
        """Compute `model` on one input tensor within `timeout_s` (capped by the worker's
        request_timeout); InferenceError with a distinct code for each way it can fail."""
        started = time.perf_counter()
        served = self._served.get(name_of(model))
        if served is None or not matches_spec(model, served.model.spec):
            self.metrics.record_served("unknown", Code.UNKNOWN_MODEL)
            raise InferenceError(Code.UNKNOWN_MODEL, self._not_served(model))
        label = served.model.spec
        try:
            if len(inputs) != 1:
                raise InferenceError(
                    Code.BAD_INPUT, f"{label} takes 1 input tensor, the request has {len(inputs)}"
                )
            batch = served.model.prepare(inputs[0])
            budget = min(timeout_s or self.settings.request_timeout, self.settings.request_timeout)
            result = await served.batcher.submit(batch, trio.current_time() + budget * REPLY_SHARE)
        except InferenceError as exc:
            self.metrics.record_served(label, exc.code)
            raise
        self.metrics.record_served(label, OK, time.perf_counter() - started)
        self.metrics.batch_samples.labels(model=label).observe(result.batch_samples)
        self.metrics.queue.labels(model=label).set(served.batcher.queue_length)
        reply = InferReply(
            model=label,
            queue=self.queue_length,
            compute_ms=result.compute_s * 1000,
            batch=result.batch_samples,
        )
        return reply, result.outputs

    # --- internals -----------------------------------------------------------------------

    def _reload(self, spec: str) -> LoadedModel:
        version, path = self._resolve(spec)
        return _load(version, path)

    def _require_running(self) -> trio.Nursery:
        if self._nursery is None:
            raise InferenceError(Code.UNSUPPORTED_MODEL, "the inference worker is not running")
        return self._nursery

    def _not_served(self, model: str) -> str:
        served = ", ".join(self.models) or "nothing"
        return f"this worker does not serve {model!r}; it serves {served}"

    def _resolve(self, spec: str) -> tuple[ModelVersion, Path]:
        from hivenode.models.registry import Registry

        try:
            with Registry(self.state_dir) as registry:
                version = registry.resolve(spec)
                path = registry.blob_path(version.sha256)
        except ModelError as exc:
            raise InferenceError(Code.UNKNOWN_MODEL, str(exc)) from exc
        if not path.exists():
            raise InferenceError(
                Code.UNKNOWN_MODEL, f"{version.spec}: its blob {version.sha256} is missing"
            )
        return version, path

    async def _hardware(self) -> Hardware:
        if self.node.hardware is not None:
            return self.node.hardware
        return await trio.to_thread.run_sync(self.node.probe.refresh)


def warm_up(model: LoadedModel, max_batch: int) -> None:
    """Run a sample and a full batch once, so the first requests do not pay for lazy
    initialisation (allocator growth, kernel selection, graph optimisation)."""
    shape = tuple(WARMUP_SEQUENCE if d is None else d for d in model.signature.shape)
    for size in sorted({1, max_batch}):
        model.predict(np.zeros((size, *shape), model.signature.dtype))


def _load(version: ModelVersion, path: Path) -> LoadedModel:
    try:
        return load_model(version, path)
    except InferenceError:
        raise
    except (ModelError, OSError, ValueError, RuntimeError) as exc:
        raise InferenceError(
            Code.UNSUPPORTED_MODEL, f"cannot load {version.spec}: {type(exc).__name__}: {exc}"
        ) from exc


async def _run_batcher(served: Served) -> None:
    with served.scope:
        await served.batcher.run()


def _stop(served: Served) -> None:
    served.batcher.close()
    served.scope.cancel()
