"""The all-reduce on its own: weighted averages against a float64 reference, hostile input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trio

from hivenode.agent.errors import RpcError
from hivenode.agent.rpc import request
from hivenode.parallel.allreduce import AllReduceConfig, Averager, StepResult
from hivenode.parallel.local_nodes import local_nodes
from hivenode.protocol.ids import ALLREDUCE_PROTOCOL

SIZE = 1001


async def test_the_average_is_the_weighted_mean_on_every_peer(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = [rng.normal(size=SIZE).astype(np.float32) for _ in range(3)]
    weights = [1.0, 2.0, 5.0]
    async with local_nodes(tmp_path) as swarm:
        nodes = [await swarm.start() for _ in range(3)]
        group = [n.peer_id for n in nodes]
        averagers = [
            Averager(n.node, n.router, "ar", SIZE, group, AllReduceConfig()) for n in nodes
        ]
        results: list[StepResult] = []

        async def one(i: int) -> None:
            results.append(await averagers[i].allreduce(0, vectors[i], weights[i], "same"))

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(one, i)
        for averager in averagers:
            await averager.aclose()
    expected = np.average(np.stack(vectors).astype(np.float64), axis=0, weights=weights)
    for result in results:
        assert np.abs(result.average - expected).max() < 1e-6
        assert np.array_equal(result.average, results[0].average)
        assert result.next_group == tuple(group) and result.included


async def test_a_diverged_replica_is_left_out_not_averaged_in(tmp_path: Path) -> None:
    vectors = [np.full(SIZE, float(i), dtype=np.float32) for i in range(3)]
    async with local_nodes(tmp_path) as swarm:
        nodes = [await swarm.start() for _ in range(3)]
        group = [n.peer_id for n in nodes]
        averagers = [
            Averager(n.node, n.router, "ar", SIZE, group, AllReduceConfig()) for n in nodes
        ]
        results: dict[int, StepResult] = {}

        async def one(i: int) -> None:
            digest = "diverged" if i == 2 else "majority"
            results[i] = await averagers[i].allreduce(0, vectors[i], 1.0, digest)

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(one, i)
        for averager in averagers:
            await averager.aclose()
    assert np.all(results[0].average == 0.5)
    assert not results[2].included and results[0].next_group == tuple(group[:2])


async def test_a_reducer_answers_hostile_parts_with_errors_and_keeps_serving(
    tmp_path: Path,
) -> None:
    async with local_nodes(tmp_path) as swarm:
        nodes = [await swarm.start() for _ in range(2)]
        group = [n.peer_id for n in nodes]
        averager = Averager(nodes[0].node, nodes[0].router, "ar", 4, group, AllReduceConfig())
        host = nodes[1].node.swarm.host

        async def send(part: int, values: list[float], **extra: object) -> None:
            body = {
                "job": "ar",
                "step": 0,
                "part": part,
                "attempt": 0,
                "group": group,
                "weight": 1.0,
                "digest": "",
                "joiners": [],
                **extra,
            }
            tensors = (np.array(values, dtype=np.float32),)
            await request(host, group[0], ALLREDUCE_PROTOCOL, "reduce", body, timeout=5,
                          tensors=tensors)  # fmt: skip

        with pytest.raises(RpcError, match="not_finite"):
            await send(0, [np.nan, 1.0])
        with pytest.raises(RpcError, match="not_owner"):
            await send(1, [1.0, 1.0])
        with pytest.raises(RpcError, match="bad_request"):
            await send(0, [1.0, 1.0, 1.0])
        nodes[0].router.attach_wait = 0.1
        with pytest.raises(RpcError, match="unknown_job"):
            await send(0, [1.0, 1.0], job="other")
        # still serving: a proper step of both peers completes
        other = Averager(nodes[1].node, nodes[1].router, "ar", 4, group, AllReduceConfig())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(averager.allreduce, 0, np.zeros(4, dtype=np.float32), 1.0)
            nursery.start_soon(other.allreduce, 0, np.ones(4, dtype=np.float32), 1.0)
        assert averager.completed_step == other.completed_step == 0
        await averager.aclose()
        await other.aclose()
