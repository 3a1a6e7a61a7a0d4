"""The router over real workers: balance, failover when a worker dies, and its errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from inference_support import FEATURES, inference_swarm, reference
from swarm_helpers import wait_until

from hivenode.inference.errors import Code, InferenceError
from hivenode.inference.settings import InferenceSettings

REQUESTS = 90
CLIENTS = 6


async def test_the_router_balances_across_three_workers_and_survives_one_dying(
    tmp_path: Path, mlp_file: tuple[Path, Any]
) -> None:
    path, module = mlp_file
    async with inference_swarm(tmp_path) as start:
        hub = await start("hub", worker=False)
        workers = [await start(f"w{i}", bootstrap=[hub], models={"digits": path}) for i in range(3)]
        ids = {w.node.peer_id for w in workers}
        router = hub.router
        await wait_until(lambda: set(router.workers_for("digits")) == ids, 20, "3 workers known")
        x = np.random.default_rng(1).normal(size=(2, FEATURES)).astype(np.float32)
        expected = reference(module, x)
        answered: list[str] = []
        failures: list[InferenceError] = []

        async def client(count: int) -> None:
            for _ in range(count):
                try:
                    result = await router.infer("digits", x, timeout=5)
                except InferenceError as exc:
                    failures.append(exc)
                    continue
                np.testing.assert_allclose(result.outputs[0], expected, rtol=1e-5, atol=1e-6)
                answered.append(result.worker)

        async with trio.open_nursery() as nursery:
            for _ in range(CLIENTS):
                nursery.start_soon(client, REQUESTS // CLIENTS)
        assert not failures
        assert {w: answered.count(w) for w in ids} == {w: pytest.approx(30, abs=25) for w in ids}

        victim = workers[0]
        before = len(answered)
        async with trio.open_nursery() as nursery:
            for _ in range(CLIENTS):
                nursery.start_soon(client, REQUESTS // CLIENTS)
            await trio.sleep(0.05)
            victim.node.stop()
        assert not failures, [str(f) for f in failures]
        assert len(answered) == before + REQUESTS
        late = answered[before + REQUESTS // 2 :]
        assert victim.node.peer_id not in late


async def test_errors_at_the_router_keep_their_codes(
    tmp_path: Path, mlp_file: tuple[Path, Any]
) -> None:
    path, _ = mlp_file
    async with inference_swarm(tmp_path) as start:
        worker = await start("worker", models={"digits": path})
        client = await start("client", bootstrap=[worker], worker=False)
        await wait_until(lambda: bool(client.router.workers_for("digits")), 20, "worker known")
        with pytest.raises(InferenceError) as caught:
            await client.router.infer("nothing", np.zeros((1, FEATURES), np.float32))
        assert caught.value.kind is Code.NO_WORKER
        with pytest.raises(InferenceError) as caught:
            await client.router.infer("digits", np.zeros((1, 3), np.float32))
        assert caught.value.kind is Code.BAD_INPUT
        assert "does not match" in caught.value.message


async def test_a_worker_serves_its_own_router_without_the_network(
    tmp_path: Path, mlp_file: tuple[Path, Any]
) -> None:
    path, module = mlp_file
    settings = InferenceSettings(serve=["digits"])
    async with inference_swarm(tmp_path) as start:
        alone = await start("alone", models={"digits": path}, settings=settings)
        await wait_until(lambda: bool(alone.router.workers_for("digits")), 20, "model loaded")
        x = np.ones((3, FEATURES), np.float32)
        result = await alone.router.infer("digits@1", x)
        assert result.worker == alone.node.peer_id and result.model == "digits@1"
        np.testing.assert_allclose(result.outputs[0], reference(module, x), rtol=1e-5)
        stats = alone.router.metrics.summary("digits")
        assert stats.requests == 1 and stats.success_rate == 1.0 and stats.p50_ms is not None


def test_a_worker_slow_once_is_priced_as_new_once_its_latency_is_stale(tmp_path: Path) -> None:
    import time

    from libp2p.crypto.ed25519 import create_new_key_pair
    from swarm_helpers import node_settings

    from hivenode.agent.hardware import HardwareProbe
    from hivenode.agent.node import Node
    from hivenode.inference.router import LATENCY_FRESH_S, Router

    node = Node(node_settings(tmp_path, "n"), create_new_key_pair(), HardwareProbe(tmp_path))
    router = Router(node)
    state = router._state("slow")
    state.latency_ewma_s, state.latency_at = 1.0, time.monotonic()
    assert router._candidate("slow", time.monotonic()).latency_ewma_s == 1.0
    later = time.monotonic() + LATENCY_FRESH_S + 1
    assert router._candidate("slow", later).latency_ewma_s is None
