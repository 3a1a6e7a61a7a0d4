"""Dynamic batching for one served model: a bounded queue, batches of up to `max_batch`
samples formed within `max_wait`, at most `slots` batches computing at once per worker."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from hivenode.inference.errors import Code, InferenceError
from hivenode.inference.runtime import LoadedModel, NDArray

log = logging.getLogger(__name__)

GAP_ALPHA = 0.1
"""Weight of the newest gap between two requests in their running mean."""
INLINE_COMPUTE_S = 0.001
"""A batch expected to compute in less runs on the event loop instead of a thread. The
thread hand-off costs two GIL switches, and under load each can wait out the interpreter's
5 ms switch interval (`sys.getswitchinterval`) behind the loop's own work: for a 60 µs MLP
call that was most of the latency a request added. Blocking the loop for under a
millisecond costs the other requests less than that."""
COMPUTE_ALPHA = 0.2
"""Weight of the newest batch in the running mean of compute seconds per sample."""


@dataclass(frozen=True)
class BatchResult:
    """One request's share of a batch: its outputs, and how the batch went."""

    outputs: tuple[NDArray, ...]
    batch_samples: int
    compute_s: float
    queued_s: float


@dataclass(eq=False)
class _Pending:
    inputs: NDArray
    arrived: float
    done: trio.Event = field(default_factory=trio.Event)
    result: BatchResult | None = None
    error: InferenceError | None = None
    abandoned: bool = False

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])


class Batcher:
    """Collects requests for one model into batches; `run` computes them until cancelled.

    A request waits in a queue of at most `max_queue`; a request that finds it full is
    refused at once with `busy` (backpressure, not an unbounded queue). A batch starts once a
    compute slot is free, with what is waiting then; while it holds fewer than `max_batch`
    samples and requests come more often than one per `max_wait`, it waits up to
    `max_wait` after its oldest request arrived for more. Only requests of
    the same per-sample shape share a batch; one larger than `max_batch` runs alone.
    """

    def __init__(
        self,
        model: LoadedModel,
        slots: trio.Semaphore,
        max_batch: int,
        max_wait: float,
        max_queue: int,
    ) -> None:
        self.model = model
        self._slots = slots
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_queue = max_queue
        self._waiting: deque[_Pending] = deque()
        self._arrival = trio.Event()
        self.running = 0
        """Batches computing now."""
        self._closed = False
        self._retiring = False
        self._last_arrival: float | None = None
        self._arrival_gap_s: float | None = None
        """Mean seconds between requests lately (an EWMA)."""
        self._sample_s: float | None = None
        """Compute seconds per sample lately (an EWMA, measured inside the call)."""

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    async def submit(self, inputs: NDArray, deadline: float) -> BatchResult:
        """Queue prepared `inputs` and wait for their outputs until `deadline` (trio time)."""
        if self._closed:
            raise self._closing_error()
        if len(self._waiting) >= self.max_queue:
            raise InferenceError(
                Code.BUSY,
                f"{self.model.spec}: {len(self._waiting)} requests already waiting "
                f"(max_queue {self.max_queue}); try another worker",
            )
        item = _Pending(inputs, time.perf_counter())
        if self._last_arrival is not None:
            gap = item.arrived - self._last_arrival
            previous = self._arrival_gap_s
            self._arrival_gap_s = (
                gap if previous is None else previous + GAP_ALPHA * (gap - previous)
            )
        self._last_arrival = item.arrived
        self._waiting.append(item)
        self._arrival.set()
        try:
            with trio.move_on_at(deadline):
                await item.done.wait()
        finally:
            if not item.done.is_set():
                item.abandoned = True
                self._discard(item)
        if item.error is not None:
            raise item.error
        if item.result is None:
            waited = time.perf_counter() - item.arrived
            raise InferenceError(
                Code.TIMEOUT, f"{self.model.spec}: no result within {waited:.3g} s at the worker"
            )
        return item.result

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                while not self._live():
                    if self._retiring and self.running == 0:
                        return
                    self._arrival = trio.Event()
                    await self._arrival.wait()
                await self._slots.acquire()
                try:
                    await self._fill()
                    batch = self._take()
                except BaseException:
                    self._slots.release()
                    raise
                if batch:
                    self.running += 1
                    nursery.start_soon(self._compute, batch)
                else:
                    self._slots.release()

    def _live(self) -> bool:
        while self._waiting and self._waiting[0].abandoned:
            self._waiting.popleft()
        return bool(self._waiting)

    async def _fill(self) -> None:
        """Wait up to `max_wait` after the oldest request arrived for a full batch, when
        requests have lately come faster than one per `max_wait`: then another is likely
        to join and save a batch (a thread hand-off and a model call). When they come
        slower, lingering would only add latency, so the batch starts at once."""
        if not self._waiting or self.max_wait <= 0:
            return
        if self._arrival_gap_s is None or self._arrival_gap_s > self.max_wait:
            return
        remaining = self._waiting[0].arrived + self.max_wait - time.perf_counter()
        with trio.move_on_after(max(0.0, remaining)):
            while self._samples_like(self._waiting[0]) < self.max_batch:
                self._arrival = trio.Event()
                await self._arrival.wait()
                if not self._live():
                    return

    def _samples_like(self, first: _Pending) -> int:
        shape = first.sample_shape
        return sum(len(p.inputs) for p in self._waiting if p.sample_shape == shape)

    def _take(self) -> list[_Pending]:
        """The oldest live request, then later ones of its shape while the batch has room."""
        if not self._live():
            return []
        first = self._waiting[0]
        taken: list[_Pending] = []
        kept: deque[_Pending] = deque()
        samples = 0
        for item in self._waiting:
            if item.abandoned:
                continue
            fits = samples + len(item.inputs) <= self.max_batch
            if item is first or (item.sample_shape == first.sample_shape and fits):
                taken.append(item)
                samples += len(item.inputs)
            else:
                kept.append(item)
        self._waiting = kept
        return taken

    def _discard(self, item: _Pending) -> None:
        # not waiting any more: already taken into a batch, whose result for it is dropped
        with contextlib.suppress(ValueError):
            self._waiting.remove(item)

    async def _compute(self, batch: list[_Pending]) -> None:
        try:
            parts = [p.inputs for p in batch]
            inputs = parts[0] if len(parts) == 1 else np.concatenate(parts)
            started = time.perf_counter()
            try:
                if self._inline(len(inputs)):
                    outputs, took = self._timed_predict(inputs)
                else:
                    outputs, took = await trio.to_thread.run_sync(self._timed_predict, inputs)
                self._learn_compute(took, len(inputs))
                _check_outputs(self.model.spec, outputs, len(inputs))
            except InferenceError as exc:
                self._fail(batch, exc)
                return
            except Exception as exc:  # the model's own failure answers its requests, no more
                log.exception("%s failed on a batch of %d", self.model.spec, len(inputs))
                self._fail(batch, InferenceError(Code.FAILED, f"{self.model.spec}: {exc!r}"))
                return
            finished = time.perf_counter()
            offset = 0
            for item in batch:
                end = offset + len(item.inputs)
                item.result = BatchResult(
                    outputs=tuple(out[offset:end] for out in outputs),
                    batch_samples=len(inputs),
                    compute_s=finished - started,
                    queued_s=started - item.arrived,
                )
                item.done.set()
                offset = end
        finally:
            self.running -= 1
            self._slots.release()
            self._arrival.set()  # a retiring batcher checks whether it is done
            # cancelled (the model is being dropped): nobody may wait for a result that
            # will never come
            self._fail([p for p in batch if not p.done.is_set()], self._closing_error())

    def _inline(self, samples: int) -> bool:
        """Whether a batch of `samples` is expected to compute within INLINE_COMPUTE_S (the
        first batch goes to a thread: nothing is known of the model yet)."""
        return self._sample_s is not None and self._sample_s * samples < INLINE_COMPUTE_S

    def _timed_predict(self, inputs: NDArray) -> tuple[Any, float]:
        started = time.perf_counter()
        outputs = self.model.predict(inputs)
        return outputs, time.perf_counter() - started

    def _learn_compute(self, seconds: float, samples: int) -> None:
        per_sample = seconds / max(1, samples)
        previous = self._sample_s
        self._sample_s = (
            per_sample if previous is None else previous + COMPUTE_ALPHA * (per_sample - previous)
        )

    def retire(self) -> None:
        """Take no more requests (the caller routes new ones elsewhere), finish those
        waiting and computing, then let `run` return."""
        self._retiring = True
        self._arrival.set()

    def close(self) -> None:
        """Answer every waiting request: the model is no longer served. `run` is cancelled
        by the owner; batches computing then answer the same way."""
        self._closed = True
        waiting, self._waiting = list(self._waiting), deque()
        self._fail(waiting, self._closing_error())

    def _closing_error(self) -> InferenceError:
        return InferenceError(Code.UNKNOWN_MODEL, f"{self.model.spec} is no longer served here")

    @staticmethod
    def _fail(batch: list[_Pending], error: InferenceError) -> None:
        for item in batch:
            item.error = error
            item.done.set()


def _check_outputs(spec: str, outputs: Any, samples: int) -> None:
    if not isinstance(outputs, tuple) or not outputs:
        raise InferenceError(Code.FAILED, f"{spec} returned no outputs")
    for index, out in enumerate(outputs):
        if not isinstance(out, np.ndarray) or out.ndim < 1 or len(out) != samples:
            shape = getattr(out, "shape", None)
            raise InferenceError(
                Code.FAILED,
                f"{spec}: output {index} has shape {shape}, not batch-first for {samples} samples",
            )
