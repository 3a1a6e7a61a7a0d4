"""Checkpoint replication: a standby holds the newest checkpoint, only from its aggregator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from swarm_helpers import wait_until

from hivenode.agent.errors import RpcError
from hivenode.agent.node import Node
from hivenode.aggregator.checkpoint import Checkpoint, load_checkpoint
from hivenode.aggregator.job_spec import JobSpec
from hivenode.aggregator.replication import (
    Standby,
    decode_replica,
    encode_replica,
    push_checkpoint,
    wait_until_gone,
)
from hivenode.sim.chaos_swarm import ChaosSwarm, chaos_swarm


def job() -> JobSpec:
    return JobSpec.model_validate({"name": "replicated", "dataset": "d", "rounds": 5})


def checkpoint(round_number: int, control: bool = False) -> Checkpoint:
    rng = np.random.default_rng(round_number)
    arrays = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": np.arange(2)}
    return Checkpoint(
        round_number,
        arrays,
        {k: v * 2 for k, v in arrays.items()} if control else None,
        [{"round": r, "eval_accuracy": 0.5} for r in range(1, round_number + 1)],
    )


@pytest.mark.parametrize("control", [False, True])
def test_a_replica_round_trips(control: bool) -> None:
    sent = checkpoint(3, control)
    body, tensors = encode_replica(job(), sent)
    spec, got = decode_replica(body, tensors)
    assert spec == job()
    assert got.round == 3 and got.history == sent.history
    assert list(got.arrays) == ["w", "b"]  # the model's order, not safetensors' sorted one
    for key, value in sent.arrays.items():
        np.testing.assert_array_equal(got.arrays[key], value)
    assert (got.control is None) == (not control)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda b, t: b.update(round=0), "round"),
        (lambda b, t: b.update(keys=["w", "w"]), "repeat"),
        (lambda b, t: b.update(job={"name": "bad name!"}), "job spec"),
        (lambda b, t: t.pop(), "tensors"),
        (lambda b, t: t.__setitem__(0, np.frombuffer(b"{nope", dtype=np.uint8)), "JSON"),
    ],
)
def test_a_malformed_replica_is_refused(change: Any, reason: str) -> None:
    body, tensors = encode_replica(job(), checkpoint(2))
    change(body, tensors)
    with pytest.raises(RpcError, match=reason):
        decode_replica(body, tensors)


async def test_the_standby_keeps_the_newest_checkpoint_of_its_aggregator_only(
    tmp_path: Path,
) -> None:
    standbys: list[Standby] = []

    def prepare(swarm: ChaosSwarm, node: Node) -> None:
        if len(swarm.aggregators) == 1:  # the second node backs up the first
            standbys.append(Standby(tmp_path / "held", [swarm.aggregators[0].peer_id]))
            standbys[0].register(node)

    async with chaos_swarm(
        tmp_path, [], _no_trainer, aggregators=3, prepare_aggregator=prepare
    ) as swarm:
        primary, second, stranger = swarm.aggregators
        (standby,) = standbys
        await wait_until(
            lambda: second.peer_id in primary.peer_table and second.peer_id in stranger.peer_table,
            20,
            "the standby is known",
        )
        assert await push_checkpoint(primary, second.peer_id, job(), checkpoint(2)) == 2
        assert await push_checkpoint(primary, second.peer_id, job(), checkpoint(1)) == 2
        with pytest.raises(RpcError, match="forbidden"):
            await push_checkpoint(stranger, second.peer_id, job(), checkpoint(4))
    held = load_checkpoint(tmp_path / "held" / "replicated")
    assert held is not None and held.round == 2
    np.testing.assert_array_equal(held.arrays["w"], checkpoint(2).arrays["w"])
    assert standby.replicas["replicated"].aggregator == primary.peer_id


async def test_a_killed_peer_is_found_gone_within_its_missed_pings(tmp_path: Path) -> None:
    async with chaos_swarm(tmp_path, [], _no_trainer, aggregators=2) as swarm:
        watcher, watched = swarm.aggregators
        await wait_until(lambda: watched.peer_id in watcher.peer_table, 20, "the peer is known")
        with trio.move_on_after(1.5) as alive:
            await wait_until_gone(watcher, watched.peer_id, period=0.3, misses=3)
        assert alive.cancelled_caught  # it answers: not gone
        await swarm.kill(watched)
        with trio.fail_after(5):
            await wait_until_gone(watcher, watched.peer_id, period=0.3, misses=3)


def _no_trainer(index: int, state_dir: Path, peer_id: str) -> Any:
    raise AssertionError("these swarms have no trainers")
