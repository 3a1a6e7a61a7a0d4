"""Aggregator fail-over between `hivenode run` daemons: a standby resumes a SIGKILLed
aggregator's job from the checkpoint it replicated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from swarm_helpers import wait_until

from hivenode.agent.errors import RpcError
from hivenode.agent.node import Node
from hivenode.aggregator.checkpoint import Checkpoint
from hivenode.aggregator.failover import StandbyDuty, choose_standbys, standby_rank
from hivenode.aggregator.job_spec import JobSpec
from hivenode.aggregator.replication import HANDED_OVER, Replica, push_checkpoint, replica_status
from hivenode.sim.chaos import ChaosConfig, Scenario, run_chaos
from hivenode.sim.chaos_swarm import ChaosSwarm, chaos_swarm


def test_the_auto_standby_is_the_same_whatever_order_a_node_sees_its_peers_in() -> None:
    peers = [f"peer{i}" for i in range(6)]
    first = choose_standbys("job-a", peers, trainers=(), count=2)
    assert first == choose_standbys("job-a", list(reversed(peers)), trainers=(), count=2)
    assert first == sorted(peers, key=lambda p: standby_rank("job-a", p))[:2]
    # jobs spread over the aggregators: not every job picks the same one
    assert len({choose_standbys(f"job-{i}", peers, trainers=())[0] for i in range(20)}) > 1


def test_the_auto_standby_is_not_a_trainer_of_the_job_while_another_peer_can_be() -> None:
    peers = ["a", "b", "c"]
    for name in ("x", "y", "z"):
        trainers = set(peers) - {"c"}
        assert choose_standbys(name, peers, trainers) == ["c"]
        assert len(choose_standbys(name, peers, set(peers))) == 1  # all train: still one


async def test_a_standby_daemon_finishes_the_job_of_a_sigkilled_aggregator_daemon() -> None:
    config = ChaosConfig(
        Scenario.KILL_AGGREGATOR_DAEMON, nodes=2, rounds=3, at_round=1, partition="iid"
    )
    report = await run_chaos(config)
    details = report.details
    assert report.completed and report.rounds_completed == 3, details["error"]
    assert details["took_over"]["from"] is not None and details["auto_chose_the_standby"]
    assert details["resumed_from_round"] == details["rounds_reported_before_kill"] >= 1
    assert report.lost_updates == 0
    assert report.recovery_s is not None and report.recovery_s <= 15
    assert details["standby_recovery_s"] is not None
    # the same rounds from the same checkpoint with the same seeds: the same model
    assert report.final_accuracy == pytest.approx(report.baseline_accuracy, abs=0.02)


def job(name: str, standby: Any) -> JobSpec:
    return JobSpec.model_validate({"name": name, "dataset": "d", "rounds": 5, "standby": standby})


def checkpoint(round_number: int) -> Checkpoint:
    return Checkpoint(round_number, {"w": np.full((2, 2), round_number, dtype=np.float32)})


async def test_a_daemon_stands_by_only_for_jobs_that_name_it_and_refuses_them_once_taken(
    tmp_path: Path,
) -> None:
    duties: list[StandbyDuty] = []

    async def take_over(replica: Replica, last_seen: float) -> None:
        raise AssertionError("nobody dies here")

    def prepare(swarm: ChaosSwarm, node: Node) -> None:
        if len(swarm.aggregators) == 1:  # the second node stands by; "mine" is its own job
            duties.append(StandbyDuty(node, tmp_path / "held", lambda n: n == "mine", take_over))
            duties[0].register()

    async with chaos_swarm(
        tmp_path, [], _no_trainer, aggregators=2, prepare_aggregator=prepare
    ) as swarm:
        primary, second = swarm.aggregators
        (duty,) = duties
        await wait_until(lambda: second.peer_id in primary.peer_table, 20, "the standby is known")
        named, auto = job("named", [second.peer_id]), job("auto", "auto")
        assert await push_checkpoint(primary, second.peer_id, named, checkpoint(1)) == 1
        assert await push_checkpoint(primary, second.peer_id, auto, checkpoint(2)) == 2
        for refused in (job("other", ["12D3KooWsomebodyelse"]), job("mine", "auto")):
            with pytest.raises(RpcError, match="forbidden"):
                await push_checkpoint(primary, second.peer_id, refused, checkpoint(1))
        assert await replica_status(primary, second.peer_id, "named") == (1, False)
        duty.standby.hand_over("named")
        with pytest.raises(RpcError) as refused_push:
            await push_checkpoint(primary, second.peer_id, named, checkpoint(2))
        assert refused_push.value.code == HANDED_OVER
        assert await replica_status(primary, second.peer_id, "named") == (1, True)
    assert set(duty.standby.replicas) == {"auto"}


def _no_trainer(index: int, state_dir: Path, peer_id: str) -> Any:
    raise AssertionError("these swarms have no trainers")
