"""Chaos scenarios on real in-process nodes: faults cost no finished work, hostile updates
cost FedAvg its model and the robust strategies nothing, a standby resumes a killed job."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import typer
from swarm_helpers import wait_until
from typer.testing import CliRunner

from hivenode.agent.node import MIN_ADVERT_SPACING
from hivenode.aggregator.runner import RoundRecord
from hivenode.cli_chaos import sim_chaos
from hivenode.sim.chaos import ChaosConfig, ChaosError, Scenario, run_chaos
from hivenode.sim.chaos_swarm import Ledger, chaos_swarm, honest_trainer, training_threads
from hivenode.sim.fl_datasets import federated_dataset

SMALL = {"nodes": 4, "deadline_s": 10.0, "partition": "iid"}


def record(number: int, participants: int) -> RoundRecord:
    return RoundRecord(number, None, None, None, None, participants, 0, 0, 0, 0, 0.1)


def test_the_ledger_counts_delivered_updates_that_completed_rounds_did_not_take() -> None:
    ledger = Ledger()
    for index in range(3):
        ledger.deliver(index, "agg", 1)
        ledger.deliver(index, "agg", 2)
    ledger.deliver(0, "agg", 3)  # a round that never completed: not counted
    ledger.round_done("agg", record(1, 3))
    ledger.round_done("agg", record(2, 2))
    assert ledger.lost() == 1
    assert ledger.rounds_of[0] == [1, 2, 3]


async def test_a_restarted_trainer_comes_back_with_its_key_and_a_newer_advert(
    tmp_path: Path,
) -> None:
    devices = federated_dataset("iris", 2, seed=0)
    async with chaos_swarm(tmp_path, devices, honest_trainer(training_threads())) as swarm:
        (aggregator,) = swarm.aggregators
        member = swarm.trainers[1]
        await wait_until(lambda: member.peer_id in aggregator.peer_table, 20, "joined")
        entry = aggregator.peer_table.get(member.peer_id)
        assert entry is not None
        first_seq = entry.advert.seq
        await swarm.kill(member.node)
        assert member.peer_id not in aggregator.connected_peers()
        # an advert within MIN_ADVERT_SPACING of the last one from its origin is dropped
        await trio.sleep(MIN_ADVERT_SPACING)
        node = await swarm.restart(1)
        assert node.peer_id == member.peer_id and member.restarts == 1

        def readvertised() -> bool:
            entry = aggregator.peer_table.get(member.peer_id)
            return entry is not None and entry.advert.seq > first_seq

        await wait_until(readvertised, 20, "the restarted trainer advertised again")


async def test_killed_trainers_cost_no_update_of_the_others_and_the_job_finishes() -> None:
    config = ChaosConfig(
        Scenario.KILL_TRAINERS, rounds=6, at_round=2, rejoin_after=2, fraction=0.25, **SMALL
    )
    report = await run_chaos(config)
    assert report.completed and report.rounds_completed == 6
    assert report.lost_updates == 0
    assert report.details["failures_per_round"][1] == 1  # the killed trainer, round 2 only
    assert report.recovery_s is not None and report.recovery_s < config.deadline_s
    assert report.final_accuracy is not None and report.baseline_accuracy is not None


async def test_a_standby_resumes_a_killed_aggregators_job_from_its_replica() -> None:
    config = ChaosConfig(Scenario.KILL_AGGREGATOR, rounds=4, at_round=3, **SMALL)
    report = await run_chaos(config)
    assert report.completed and report.rounds_completed == 4
    assert report.lost_updates == 0
    assert report.details["resumed_from_round"] == 2
    assert report.details["completed_rounds_redone"] == 0
    assert report.recovery_s is not None and report.recovery_s < 15
    # the same rounds from the same checkpoint with the same seeds: the same model
    assert report.final_accuracy == pytest.approx(report.baseline_accuracy, abs=0.02)


async def test_a_partitioned_half_misses_only_the_cut_rounds_and_rejoins() -> None:
    config = ChaosConfig(
        Scenario.PARTITION_HEAL,
        rounds=5,
        at_round=2,
        rejoin_after=2,
        **{**SMALL, "deadline_s": 2.0},
    )
    report = await run_chaos(config)
    assert report.completed and report.rounds_completed == 5
    assert report.lost_updates == 0
    cut = config.affected
    assert report.details["failures_per_round"] == [0, cut, cut, 0, 0]
    assert report.details["messages_lost"] == 2 * cut
    assert report.details["participants_after_heal"] == [config.nodes, config.nodes]


async def test_lossy_links_lose_the_drawn_messages_and_the_job_finishes() -> None:
    config = ChaosConfig(
        Scenario.LOSSY_LINKS, rounds=4, loss=0.3, jitter_s=0.05, **{**SMALL, "deadline_s": 2.0}
    )
    report = await run_chaos(config)
    assert report.completed and report.rounds_completed == 4
    assert report.lost_updates == 0
    lost = report.details["messages_lost"]
    assert lost == sum(report.details["failures_per_round"]) and lost > 0


async def test_a_swarm_killed_whole_comes_back_with_its_jobs_registry_and_qtable() -> None:
    config = ChaosConfig(Scenario.RESTART_ALL, nodes=3, rounds=4, at_round=2, partition="iid")
    report = await run_chaos(config)
    details = report.details
    assert details["registry_intact"] and details["qtable_intact"] and details["first_job_intact"]
    assert report.completed and report.rounds_completed == 4
    assert details["resumed_from_round"] == details["rounds_reported_before_kill"] >= 2
    assert report.lost_updates == 0
    assert report.final_accuracy is not None and report.baseline_accuracy is not None
    assert abs(report.final_accuracy - report.baseline_accuracy) < 0.1


async def test_scaled_updates_wreck_fedavg_and_not_fedmedian() -> None:
    config = ChaosConfig(
        Scenario.BYZANTINE,
        rounds=3,
        nodes=5,
        deadline_s=10.0,
        partition="iid",
        fraction=0.2,
        attack="scale",
        defences=("fedavg", "fedmedian"),
        strategy="fedmedian",
    )
    report = await run_chaos(config)
    runs = report.details["runs"]
    assert report.details["attackers"] == [4]
    assert runs["fedavg"]["final_accuracy"] < runs["fedavg"]["baseline_accuracy"] - 0.3
    assert runs["fedmedian"]["final_accuracy"] > runs["fedmedian"]["baseline_accuracy"] - 0.1
    assert report.final_accuracy == runs["fedmedian"]["final_accuracy"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"strategy": "fedwhatever"}, "unknown strategy"),
        ({"scenario": Scenario.BYZANTINE, "attack": "gentle", "defences": ("fedavg",)}, "attack"),
        ({"at_round": 30}, "not a round"),
        ({"fraction": 0.01}, "is nobody"),
    ],
)
async def test_a_scenario_that_cannot_run_says_why(
    changes: dict[str, object], message: str
) -> None:
    config = ChaosConfig(**{"scenario": Scenario.KILL_TRAINERS, **changes})  # type: ignore[arg-type]
    with pytest.raises(ChaosError, match=message):
        await run_chaos(config)


def test_the_command_refuses_bad_arguments_with_one_line_and_exit_2() -> None:
    app = typer.Typer()
    app.command()(sim_chaos)
    runner = CliRunner()
    unknown = runner.invoke(app, ["--scenario", "meteor"])
    assert unknown.exit_code == 2 and "--scenario must be one of" in unknown.output
    bad_attack = runner.invoke(
        app, ["--scenario", "byzantine", "--attack", "gentle", "--defences", "fedavg", "--json"]
    )
    assert bad_attack.exit_code == 2 and "unknown attack" in bad_attack.output
    assert "Traceback" not in bad_attack.output
