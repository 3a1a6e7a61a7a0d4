"""The router: sends each inference request to the worker expected to answer fastest, and
retries once on another worker when that is safe."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from hivenode.agent.errors import RpcError
from hivenode.agent.node import Node
from hivenode.agent.rpc import StreamPool
from hivenode.inference.choice import Candidate, choose, ewma
from hivenode.inference.errors import Code, InferenceError
from hivenode.inference.metrics import OK, InferenceMetrics
from hivenode.inference.runtime import NDArray
from hivenode.inference.settings import InferenceSettings
from hivenode.inference.wire import (
    INFER_LIMITS,
    INFER_METHOD,
    INFER_PROTOCOL,
    InferReply,
    matches_spec,
    name_of,
)
from hivenode.inference.wire import InferRequest as WireRequest
from hivenode.inference.worker import QUEUE_FIELD, InferenceWorker

log = logging.getLogger(__name__)

LATENCY_FRESH_S = 2.0
"""A latency EWMA not refreshed for this long is forgotten: the worker is priced as a new
one, so a worker that was slow once (a GC pause, a burst) is tried again, not starved."""
QUEUE_FRESH_S = 2.0
"""A queue length a worker reported in a reply stands for this long; then its advert's."""
MAX_DOWN_S = 60.0
"""However often a worker failed, the router tries it again after at most this long."""
ALWAYS_RETRYABLE = frozenset({Code.BUSY, Code.UNKNOWN_MODEL})
"""Refusals before any work: safe to send elsewhere even when the request is not idempotent."""
RETRYABLE_IF_IDEMPOTENT = frozenset({Code.TIMEOUT, Code.UNREACHABLE})
"""The worker may have computed it: only an idempotent request goes elsewhere."""


@dataclass(frozen=True)
class InferResult:
    outputs: tuple[NDArray, ...]
    model: str
    """NAME@VERSION of the model that answered."""
    worker: str
    latency_s: float
    attempts: int
    batch: int
    """Samples in the batch the worker computed this request in."""

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "worker": self.worker,
            "latency_ms": round(self.latency_s * 1000, 3),
            "attempts": self.attempts,
            "batch": self.batch,
        }


@dataclass
class _WorkerState:
    in_flight: int = 0
    latency_ewma_s: float | None = None
    latency_at: float = 0.0
    queue: int = 0
    queue_at: float = 0.0
    failures: int = 0
    down_until: float = 0.0
    lane_users: dict[int, int] = field(default_factory=dict)
    """Requests on each stream slot to this worker now."""


class Router:
    """Routes requests for models over the workers that advertise them.

    Each attempt goes to the better of two random workers by expected latency
    (`choice.expected_latency`: its latency EWMA here, the requests ahead of ours, its RTT);
    a worker that could not be reached or timed out is left alone for `down_for` seconds,
    doubling while it keeps failing. Streams are kept open, `streams_per_worker` per
    worker, so concurrent requests reach a worker together and it can batch them.
    """

    def __init__(
        self,
        node: Node,
        settings: InferenceSettings | None = None,
        metrics: InferenceMetrics | None = None,
        local: InferenceWorker | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.node = node
        self.settings = settings or InferenceSettings()
        if metrics is None:
            metrics = local.metrics if local else InferenceMetrics(node.metrics.registry)
        self.metrics = metrics
        self.local = local
        self._rng = rng or random.Random()
        self._workers: dict[str, _WorkerState] = {}
        self._lanes: list[StreamPool] = []
        self._dialable: set[str] = set()
        self._not_serving: dict[tuple[str, str], int] = {}
        """(worker, model) → the advert seq that claimed it, when the worker said it does
        not serve it: ignored until a newer advert."""

    async def aclose(self) -> None:
        for lane in self._lanes:
            await lane.aclose()

    # --- candidates ----------------------------------------------------------------------

    def workers_for(self, model: str) -> list[str]:
        """Peers whose adverts say they serve `model` (NAME: any version; NAME@V: that one),
        this node first when its own worker serves it."""
        found = []
        if self.local is not None and any(matches_spec(model, s) for s in self.local.models):
            found.append(self.node.peer_id)
        for entry in self.node.peer_table.entries():
            if not any(matches_spec(model, spec) for spec in entry.advert.models):
                continue
            if self._not_serving.get((entry.peer_id, model), -1) >= entry.advert.seq:
                continue
            found.append(entry.peer_id)
        return found

    def candidates(self, model: str, exclude: set[str]) -> list[Candidate]:
        """What `choice.choose` needs of each worker serving `model`, minus `exclude`; the
        workers resting after failures only when nothing else is left."""
        now = time.monotonic()
        peers = [p for p in self.workers_for(model) if p not in exclude]
        awake = [p for p in peers if self._state(p).down_until <= now]
        return [self._candidate(p, now) for p in (awake or peers)]

    def _candidate(self, peer_id: str, now: float) -> Candidate:
        state = self._state(peer_id)
        entry = self.node.peer_table.get(peer_id)
        queue = state.queue
        if now - state.queue_at > QUEUE_FRESH_S:
            queue = int(getattr(entry.advert.load, QUEUE_FIELD, 0)) if entry else 0
        if peer_id == self.node.peer_id and self.local is not None:
            queue = self.local.queue_length
        fresh = now - state.latency_at <= LATENCY_FRESH_S
        return Candidate(
            peer_id=peer_id,
            in_flight=state.in_flight,
            latency_ewma_s=state.latency_ewma_s if fresh else None,
            queue=queue,
            rtt_s=entry.rtt_s if entry else None,
        )

    def _state(self, peer_id: str) -> _WorkerState:
        return self._workers.setdefault(peer_id, _WorkerState())

    # --- requests ------------------------------------------------------------------------

    async def infer(
        self,
        model: str,
        inputs: NDArray | Sequence[NDArray],
        *,
        idempotent: bool = True,
        timeout: float | None = None,
        workers: Collection[str] | None = None,
    ) -> InferResult:
        """`model`'s outputs for `inputs` (batch first) from the best worker (of `workers`
        only, when given); one retry on another worker when the first refused (busy, not
        served) or, for an idempotent request, failed (unreachable, timeout).
        InferenceError otherwise."""
        tensors = (inputs,) if isinstance(inputs, np.ndarray) else tuple(inputs)
        started = time.monotonic()
        deadline = started + (timeout or self.settings.route_timeout)
        tried: set[str] = set()
        if workers is not None:
            tried = set(self.workers_for(model)) - set(workers)  # as if tried: never chosen
        last: InferenceError | None = None
        for attempt in (1, 2):
            candidates = self.candidates(model, tried)
            remaining = deadline - time.monotonic()
            if not candidates or remaining <= 0:
                break
            pick = choose(candidates, self._rng)
            tried.add(pick.peer_id)
            # an idempotent request that may retry keeps half its budget for the retry
            share = 0.5 if attempt == 1 and idempotent and len(candidates) > 1 else 1.0
            try:
                return await self._attempt(pick.peer_id, model, tensors, remaining * share, attempt)
            except InferenceError as exc:
                last = exc
                if not _may_retry(exc, idempotent):
                    raise
                log.info("%s on %s failed (%s); trying another worker", model, pick.peer_id, exc)
        if last is not None:
            raise last
        if candidates:  # workers there were, time there was not
            raise InferenceError(Code.TIMEOUT, f"{model}: no time left to send the request")
        raise InferenceError(Code.NO_WORKER, f"no worker in the peer table serves {model!r}")

    async def _attempt(
        self, peer_id: str, model: str, tensors: tuple[NDArray, ...], budget: float, attempt: int
    ) -> InferResult:
        state = self._state(peer_id)
        label = name_of(model)
        state.in_flight += 1
        started = time.perf_counter()
        try:
            if peer_id == self.node.peer_id and self.local is not None:
                reply, outputs = await self._ask_local(model, tensors, budget)
            else:
                reply, outputs = await self._ask_remote(peer_id, state, model, tensors, budget)
        except RpcError as exc:
            error = InferenceError.of(exc)
            self.metrics.record_request(label, peer_id, error.code, time.perf_counter() - started)
            self._note_failure(peer_id, state, model, error)
            raise error from None
        finally:
            state.in_flight -= 1
        latency = time.perf_counter() - started
        if time.monotonic() - state.latency_at > LATENCY_FRESH_S:
            state.latency_ewma_s = None  # stale: start again from this sample
        state.latency_ewma_s = ewma(state.latency_ewma_s, latency, self.settings.latency_ewma_alpha)
        state.latency_at = time.monotonic()
        state.queue, state.queue_at = reply.queue, time.monotonic()
        state.failures = 0
        self.metrics.record_request(label, peer_id, OK, latency)
        return InferResult(outputs, reply.model, peer_id, latency, attempt, reply.batch)

    async def _ask_local(
        self, model: str, tensors: tuple[NDArray, ...], budget: float
    ) -> tuple[InferReply, tuple[NDArray, ...]]:
        assert self.local is not None
        with trio.move_on_after(budget):
            return await self.local.infer(model, tensors, budget)
        raise InferenceError(Code.TIMEOUT, f"{model}: no answer within {budget:.3g} s")

    async def _ask_remote(
        self,
        peer_id: str,
        state: _WorkerState,
        model: str,
        tensors: tuple[NDArray, ...],
        budget: float,
    ) -> tuple[InferReply, tuple[NDArray, ...]]:
        if peer_id not in self._dialable:
            self.node.make_dialable(peer_id)
            self._dialable.add(peer_id)
        lane = self._lane(state)
        try:
            reply = await self._lanes[lane].request(
                peer_id,
                INFER_METHOD,
                WireRequest(model, budget).to_body(),
                timeout=budget,
                tensors=tensors,
            )
        finally:
            state.lane_users[lane] -= 1
        return InferReply.from_body(reply.body), reply.tensors

    def _lane(self, state: _WorkerState) -> int:
        """The stream slot to the worker with the fewest requests on it (beyond
        `streams_per_worker` in flight, requests queue on a slot's stream)."""
        if not self._lanes:
            host = self.node.swarm.host
            count = self.settings.streams_per_worker
            self._lanes = [StreamPool(host, INFER_PROTOCOL, INFER_LIMITS) for _ in range(count)]
        lane = min(range(len(self._lanes)), key=lambda i: state.lane_users.get(i, 0))
        state.lane_users[lane] = state.lane_users.get(lane, 0) + 1
        return lane

    def _note_failure(
        self, peer_id: str, state: _WorkerState, model: str, error: InferenceError
    ) -> None:
        if error.kind in (Code.UNREACHABLE, Code.TIMEOUT):  # dead, hung or swamped: rest it
            state.failures += 1
            rest = min(MAX_DOWN_S, self.settings.down_for * 2 ** (state.failures - 1))
            state.down_until = time.monotonic() + rest
            self._dialable.discard(peer_id)
        elif error.kind is Code.UNKNOWN_MODEL:
            entry = self.node.peer_table.get(peer_id)
            self._not_serving[(peer_id, model)] = entry.advert.seq if entry else 0


def _may_retry(error: InferenceError, idempotent: bool) -> bool:
    kind = error.kind
    return kind in ALWAYS_RETRYABLE or (idempotent and kind in RETRYABLE_IF_IDEMPOTENT)
