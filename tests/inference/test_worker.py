"""The inference worker on real libp2p hosts: serving, the advert, and every failure with
its own code."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from inference_support import CLASSES, FEATURES, inference_swarm, reference
from swarm_helpers import wait_until

from hivenode.agent.errors import RpcError
from hivenode.agent.rpc import request
from hivenode.inference.errors import Code, InferenceError
from hivenode.inference.runtime import LoadedModel, NDArray, Signature
from hivenode.inference.settings import InferenceSettings
from hivenode.inference.wire import INFER_LIMITS, INFER_METHOD, INFER_PROTOCOL


async def ask(client: Any, worker: Any, model: str, x: NDArray, timeout_ms: int = 5000) -> Any:
    """One raw `/hivenode/infer/1.0.0` request, as any peer would send it."""
    await client.node.connect(worker.node.swarm.listen_addrs()[0])
    return await request(
        client.node.swarm.host,
        worker.node.peer_id,
        INFER_PROTOCOL,
        INFER_METHOD,
        {"model": model, "timeout_ms": timeout_ms},
        timeout=10,
        limits=INFER_LIMITS,
        tensors=(x,),
    )


async def error_code(client: Any, worker: Any, model: str, x: NDArray, **kw: Any) -> str:
    with pytest.raises(RpcError) as caught:
        await ask(client, worker, model, x, **kw)
    return caught.value.code


class Gate:
    """A model whose batches wait until the test opens the gate: a worker kept busy on cue."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.batches: list[int] = []

    def model(self, spec: str = "gated@1") -> LoadedModel:
        def predict(batch: NDArray) -> tuple[NDArray, ...]:
            self.opened.wait(10)
            self.batches.append(len(batch))
            return (batch.sum(axis=1, keepdims=True),)

        return LoadedModel(spec, "test", Signature((4,), np.dtype(np.float32)), predict)


async def test_a_worker_serves_a_registered_model_and_advertises_it(
    tmp_path: Path, mlp_file: tuple[Path, Any]
) -> None:
    path, module = mlp_file
    async with inference_swarm(tmp_path) as start:
        worker = await start("worker", models={"digits": path})
        client = await start("client", bootstrap=[worker], worker=False)
        assert worker.worker is not None
        await wait_until(lambda: worker.worker.models == ("digits@1",), 20, "the model loaded")
        x = np.random.default_rng(0).normal(size=(5, FEATURES)).astype(np.float32)
        reply = await ask(client, worker, "digits", x)
        assert reply.body["model"] == "digits@1"
        assert reply.tensors[0].shape == (5, CLASSES)
        np.testing.assert_allclose(reply.tensors[0], reference(module, x), rtol=1e-5, atol=1e-6)
        await wait_until(
            lambda: (
                (e := client.node.peer_table.get(worker.node.peer_id)) is not None
                and e.advert.models == ("digits@1",)
            ),
            15,
            "the worker's advert names its model",
        )
        served = worker.node.metrics.value(
            "hivenode_inference_served_total", model="digits@1", outcome="ok"
        )
        assert served == 1


async def test_failures_have_distinct_codes(tmp_path: Path, mlp_file: tuple[Path, Any]) -> None:
    path, _ = mlp_file
    settings = InferenceSettings(serve=["digits"], max_queue=1, concurrency=1, max_batch=1)
    gate = Gate()
    async with inference_swarm(tmp_path) as start:
        worker = await start("worker", models={"digits": path}, settings=settings)
        client = await start("client", worker=False)
        assert worker.worker is not None
        await wait_until(lambda: len(worker.worker.models) == 1, 20, "the model loaded")
        good = np.zeros((1, FEATURES), np.float32)
        assert await error_code(client, worker, "nothing", good) == Code.UNKNOWN_MODEL
        assert await error_code(client, worker, "digits@7", good) == Code.UNKNOWN_MODEL
        wrong = np.zeros((1, FEATURES + 1), np.float32)
        assert await error_code(client, worker, "digits", wrong) == Code.BAD_INPUT
        assert await error_code(client, worker, "digits", good[:0]) == Code.BAD_INPUT
        as_digits = np.zeros((2, 2, FEATURES // 2), np.int64)  # same values per sample: cast
        assert (await ask(client, worker, "digits", as_digits)).tensors[0].shape == (2, CLASSES)

        worker.worker.serve_loaded("gated", gate.model())
        one = np.ones((1, 4), np.float32)
        codes: list[str] = []

        async def send() -> None:
            try:
                await ask(client, worker, "gated", one, timeout_ms=3000)
                codes.append("ok")
            except RpcError as exc:
                codes.append(exc.code)

        async with trio.open_nursery() as nursery:
            for _ in range(4):  # one computing, one waiting (max_queue 1), two refused
                nursery.start_soon(send)
            await wait_until(lambda: codes.count(Code.BUSY) == 2, 10, "two busy answers")
            gate.opened.set()
        assert sorted(codes) == sorted(["ok", "ok", Code.BUSY, Code.BUSY])

        gate.opened.clear()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)  # holds the only compute slot until the gate opens
            await trio.sleep(0.2)
            assert await error_code(client, worker, "gated", one, timeout_ms=300) == Code.TIMEOUT
            gate.opened.set()


async def test_a_model_too_big_for_free_memory_is_refused_with_the_numbers(
    tmp_path: Path, mlp_file: tuple[Path, Any]
) -> None:
    path, _ = mlp_file
    settings = InferenceSettings(memory_reserve_bytes=1024**2)
    async with inference_swarm(tmp_path) as start:
        worker = await start(
            "worker", models={"digits": path}, settings=settings, available_memory=lambda: 10**6
        )
        assert worker.worker is not None
        with pytest.raises(InferenceError) as caught:
            await worker.worker.serve("digits")
        assert caught.value.kind is Code.INSUFFICIENT_MEMORY
        assert "RAM free" in caught.value.message and "MiB" in caught.value.message
        assert worker.worker.models == ()


async def test_unserving_answers_waiting_requests_at_once(tmp_path: Path) -> None:
    gate = Gate()
    settings = InferenceSettings(concurrency=1, max_batch=1)
    async with inference_swarm(tmp_path) as start:
        node = await start("worker", settings=settings)
        worker = node.worker
        assert worker is not None
        worker.serve_loaded("gated", gate.model())
        one = np.ones((1, 4), np.float32)
        errors: list[str] = []

        async def call() -> None:
            try:
                await worker.infer("gated", (one,), 5)
            except InferenceError as exc:
                errors.append(exc.code)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call)
                nursery.start_soon(call)
                await wait_until(lambda: worker.queue_length == 1, 5, "one request waiting")
                worker.unserve("gated")
                await wait_until(lambda: len(errors) == 1, 5, "the waiting one answered")
                gate.opened.set()
        assert errors[0] == Code.UNKNOWN_MODEL
