"""The `kill-trainers` and `slow-nodes` scenarios: trainers killed mid-round and restarted
later, or delayed before every train message (see `hivenode.sim.chaos`)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from hivenode.agent.trainer import Trainer
from hivenode.aggregator.runner import RoundRecord
from hivenode.models.training.backend import LocalData
from hivenode.sim.chaos import (
    ChaosConfig,
    Progress,
    RunOutcome,
    Scenario,
    job_of,
    round_line,
    run_job_into,
)
from hivenode.sim.chaos_swarm import (
    ChaosSwarm,
    ChaosTrainer,
    Ledger,
    chaos_swarm,
    honest_trainer,
    training_threads,
)


async def trainer_faults_run(
    config: ChaosConfig, devices: Sequence[LocalData], faulty: bool, say: Progress
) -> RunOutcome:
    affected = set(range(config.nodes - config.affected, config.nodes)) if faulty else set()
    ledger = Ledger()
    limiter = training_threads()
    honest = honest_trainer(limiter)
    swarm_holder: list[ChaosSwarm] = []
    outcome = RunOutcome([], None, None, 0, 0.0)
    killing = config.scenario is Scenario.KILL_TRAINERS

    async def on_train(index: int, server_round: int, aggregator: str) -> None:
        if not (killing and affected and server_round == config.fault_round):
            return
        swarm = swarm_holder[0]
        if outcome.fault_at is None:
            outcome.fault_at = time.monotonic()
            for victim in sorted(affected):
                swarm.spawn(swarm.kill, swarm.trainers[victim].node)
            say(f"  killed trainers {sorted(affected)} in round {server_round}")
        if index in affected:
            await trio.sleep(config.deadline_s * 2)  # its node's shutdown cancels this

    def make_trainer(index: int, state_dir: Path, peer_id: str) -> Trainer:
        delay = config.delay_s if index in affected and not killing else 0.0
        return ChaosTrainer.wrapping(
            honest(index, state_dir, peer_id),
            index=index,
            delay_s=delay,
            on_train=on_train,
            ledger=ledger,
        )

    def on_round(swarm: ChaosSwarm, aggregator: str, record: RoundRecord) -> None:
        ledger.round_done(aggregator, record)
        outcome.round_done_at[record.round] = time.monotonic()
        say(round_line(record))
        restart_round = config.fault_round + config.rejoin_after
        if killing and affected and config.rejoin_after and record.round == restart_round:
            swarm.spawn(restart, swarm, record.round)

    async def restart(swarm: ChaosSwarm, after_round: int) -> None:
        began = time.monotonic()
        for victim in sorted(affected):
            await swarm.restart(victim)
        outcome.details["restart_s"] = round(time.monotonic() - began, 2)
        say(f"  restarted trainers {sorted(affected)} after round {after_round}")

    with tempfile.TemporaryDirectory(prefix="hn-chaos-") as tmp:
        base = Path(tmp)
        started = time.monotonic()
        async with chaos_swarm(base, devices, make_trainer) as swarm:
            swarm_holder.append(swarm)
            (aggregator,) = swarm.aggregators
            job = job_of(config, config.job_strategy, swarm.trainer_ids, config.affected)
            await run_job_into(
                outcome,
                aggregator,
                job,
                base / "jobs" / job.name,
                devices,
                lambda r: on_round(swarm, aggregator.peer_id, r),
            )
        outcome.wall_s = time.monotonic() - started
    outcome.lost_updates = ledger.lost()
    if killing and affected:
        outcome.details.update(_rejoin_details(config, sorted(affected), ledger))
    elif affected:
        outcome.details.update({"slow_trainers": sorted(affected), "delay_s": config.delay_s})
    return outcome


def _rejoin_details(config: ChaosConfig, victims: list[int], ledger: Ledger) -> dict[str, Any]:
    restart_round = config.fault_round + config.rejoin_after
    rejoined = {
        str(v): min((r for r in ledger.rounds_of.get(v, []) if r > restart_round), default=None)
        for v in victims
    }
    return {
        "killed_trainers": victims,
        "killed_in_round": config.fault_round,
        "restart_after_round": restart_round if config.rejoin_after else None,
        "first_round_after_rejoin": rejoined,
    }
