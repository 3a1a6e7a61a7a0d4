"""Dynamic batching without a network: batches fill, keep to their size and shape, and a
full queue refuses at once."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import trio

from hivenode.inference.batcher import Batcher
from hivenode.inference.errors import Code, InferenceError
from hivenode.inference.runtime import LoadedModel, NDArray, Signature


class Recorder:
    """A model that sums each sample and records the size of every batch it computed."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.sizes: list[int] = []
        self.gate = gate

    def model(self, shape: tuple[int | None, ...] = (3,)) -> LoadedModel:
        def predict(batch: NDArray) -> tuple[NDArray, ...]:
            if self.gate is not None:
                self.gate.wait(10)
            self.sizes.append(len(batch))
            return (batch.reshape(len(batch), -1).sum(axis=1),)

        return LoadedModel("sum@1", "test", Signature(shape, np.dtype(np.float32)), predict)


async def submit_all(batcher: Batcher, inputs: list[NDArray]) -> list[NDArray]:
    results: list[NDArray] = [np.empty(0)] * len(inputs)

    async def one(index: int) -> None:
        result = await batcher.submit(inputs[index], trio.current_time() + 5)
        results[index] = result.outputs[0]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run)
        async with trio.open_nursery() as clients:
            for index in range(len(inputs)):
                clients.start_soon(one, index)
        nursery.cancel_scope.cancel()
    return results


async def test_concurrent_requests_share_batches_and_get_their_own_rows() -> None:
    recorder = Recorder()
    batcher = Batcher(recorder.model(), trio.Semaphore(1), 8, 0.05, 64)
    inputs = [np.full((2, 3), i, np.float32) for i in range(12)]
    results = await submit_all(batcher, inputs)
    for i, out in enumerate(results):
        np.testing.assert_array_equal(out, [3 * i, 3 * i])
    assert sum(recorder.sizes) == 24 and max(recorder.sizes) <= 8
    assert len(recorder.sizes) <= 4  # 24 samples in batches of at most 8: 3, give or take one


async def test_only_requests_of_one_shape_share_a_batch() -> None:
    recorder = Recorder()
    batcher = Batcher(recorder.model((None,)), trio.Semaphore(1), 64, 0.05, 64)
    inputs = [np.ones((1, 2 + i % 2), np.float32) for i in range(6)]
    results = await submit_all(batcher, inputs)
    assert [float(r[0]) for r in results] == [2, 3, 2, 3, 2, 3]
    assert sorted(recorder.sizes) == [3, 3]


async def test_a_full_queue_answers_busy_at_once() -> None:
    gate = threading.Event()
    batcher = Batcher(Recorder(gate).model(), trio.Semaphore(1), 1, 0.0, 2)
    one = np.ones((1, 3), np.float32)
    outcomes: list[str] = []

    async def one_request() -> None:
        try:
            await batcher.submit(one, trio.current_time() + 5)
            outcomes.append("ok")
        except InferenceError as exc:
            outcomes.append(exc.code)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run)
        nursery.start_soon(one_request)
        await trio.sleep(0.05)  # the first is computing, behind the gate
        for _ in range(3):
            nursery.start_soon(one_request)
        with trio.fail_after(1):
            while outcomes.count(Code.BUSY) < 1:
                await trio.sleep(0.01)
        assert batcher.queue_length == 2
        gate.set()
        with trio.fail_after(5):
            while len(outcomes) < 4:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert sorted(outcomes) == sorted(["ok", "ok", "ok", Code.BUSY])


async def test_a_request_past_its_deadline_times_out_and_leaves_the_queue() -> None:
    gate = threading.Event()
    batcher = Batcher(Recorder(gate).model(), trio.Semaphore(1), 1, 0.0, 8)
    one = np.ones((1, 3), np.float32)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run)
        nursery.start_soon(batcher.submit, one, trio.current_time() + 5)
        await trio.sleep(0.05)
        with pytest.raises(InferenceError) as caught:
            await batcher.submit(one, trio.current_time() + 0.1)
        assert caught.value.kind is Code.TIMEOUT and batcher.queue_length == 0
        gate.set()
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


async def test_a_model_that_raises_fails_only_its_batch() -> None:
    def predict(batch: NDArray) -> tuple[NDArray, ...]:
        if batch[0, 0] < 0:
            raise RuntimeError("negative input")
        return (batch,)

    model = LoadedModel("picky@1", "test", Signature((1,), np.dtype(np.float32)), predict)
    batcher = Batcher(model, trio.Semaphore(1), 1, 0.0, 8)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run)
        with pytest.raises(InferenceError) as caught:
            await batcher.submit(-np.ones((1, 1), np.float32), trio.current_time() + 5)
        assert caught.value.kind is Code.FAILED and "negative input" in caught.value.message
        good = await batcher.submit(np.ones((1, 1), np.float32), trio.current_time() + 5)
        assert good.outputs[0][0, 0] == 1
        nursery.cancel_scope.cancel()


def sleeper(delay_s: float, threads: list[int]) -> Batcher:
    """A batcher over a model that takes `delay_s` a batch and records the thread it ran on."""

    def predict(batch: NDArray) -> tuple[NDArray, ...]:
        threads.append(threading.get_ident())
        time.sleep(delay_s)
        return (batch.sum(axis=1),)

    model = LoadedModel("sleep@1", "test", Signature((3,), np.dtype(np.float32)), predict)
    return Batcher(model, trio.Semaphore(1), 8, 0.0, 64)


@pytest.mark.parametrize("delay_s, on_loop", [(0.0, True), (0.005, False)])
async def test_a_fast_model_computes_on_the_loop_and_a_slow_one_in_a_thread(
    delay_s: float, on_loop: bool
) -> None:
    threads: list[int] = []
    batcher = sleeper(delay_s, threads)  # INLINE_COMPUTE_S is 1 ms
    for _ in range(3):  # one at a time: each its own batch
        await submit_all(batcher, [np.ones((1, 3), np.float32)])
    loop = threading.get_ident()
    assert threads[0] != loop  # the first batch: nothing known of the model yet
    assert all((ident == loop) is on_loop for ident in threads[1:])
