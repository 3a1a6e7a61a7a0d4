"""The `lossy-links` and `partition-heal` scenarios: train messages delayed and lost on the
way to some trainers, or every message to half of them lost for a few rounds (see
`hivenode.sim.chaos`)."""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

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
    ChaosTrainer,
    Ledger,
    LinkFault,
    chaos_swarm,
    honest_trainer,
    training_threads,
)


def link_fault(config: ChaosConfig, affected: set[int], lost: list[tuple[int, int]]) -> LinkFault:
    """The scenario's fault per (trainer, round); `lost` collects the messages it loses."""
    if config.scenario is Scenario.PARTITION_HEAL:
        cut = range(config.fault_round, config.fault_round + max(1, config.rejoin_after))

        def partition(index: int, server_round: int) -> float | None:
            if index in affected and server_round in cut:
                lost.append((index, server_round))
                return None
            return 0.0

        return partition

    def lossy(index: int, server_round: int) -> float | None:
        if index not in affected:
            return 0.0
        # one draw per (seed, trainer, round): the same faults whatever the timing
        draw = random.Random(f"{config.seed}/{index}/{server_round}")
        if draw.random() < config.loss:
            lost.append((index, server_round))
            return None
        return draw.uniform(0.0, config.jitter_s)

    return lossy


async def link_faults_run(
    config: ChaosConfig, devices: Sequence[LocalData], faulty: bool, say: Progress
) -> RunOutcome:
    affected = set(range(config.nodes - config.affected, config.nodes)) if faulty else set()
    ledger = Ledger()
    honest = honest_trainer(training_threads())
    lost: list[tuple[int, int]] = []
    fault = link_fault(config, affected, lost) if faulty else None
    outcome = RunOutcome([], None, None, 0, 0.0)

    def make_trainer(index: int, state_dir: Path, peer_id: str) -> Trainer:
        return ChaosTrainer.wrapping(
            honest(index, state_dir, peer_id), index=index, ledger=ledger, link=fault
        )

    def on_round(aggregator: str, record: RoundRecord) -> None:
        ledger.round_done(aggregator, record)
        outcome.round_done_at[record.round] = time.monotonic()
        if faulty and record.round == config.fault_round - 1:
            outcome.fault_at = time.monotonic()  # the fault round starts now
        say(round_line(record))

    with tempfile.TemporaryDirectory(prefix="hn-chaos-") as tmp:
        base = Path(tmp)
        started = time.monotonic()
        async with chaos_swarm(base, devices, make_trainer) as swarm:
            (aggregator,) = swarm.aggregators
            if faulty and config.fault_round == 1:
                outcome.fault_at = time.monotonic()
            job = job_of(config, config.job_strategy, swarm.trainer_ids, 0)
            await run_job_into(
                outcome,
                aggregator,
                job,
                base / "jobs" / job.name,
                devices,
                lambda r: on_round(aggregator.peer_id, r),
            )
        outcome.wall_s = time.monotonic() - started
    outcome.lost_updates = ledger.lost()
    if faulty:
        outcome.details.update(_details(config, sorted(affected), lost, outcome.history))
    return outcome


def _details(
    config: ChaosConfig,
    affected: list[int],
    lost: list[tuple[int, int]],
    history: Sequence[RoundRecord],
) -> dict[str, object]:
    details: dict[str, object] = {
        "affected_trainers": affected,
        "messages_lost": len(lost),
        "round_s_p50": sorted(r.duration_s for r in history)[len(history) // 2]
        if history
        else None,
        "participants_min": min((r.participants for r in history), default=None),
    }
    if config.scenario is Scenario.PARTITION_HEAL:
        healed = config.fault_round + max(1, config.rejoin_after)
        details["partitioned_rounds"] = [config.fault_round, healed - 1]
        details["participants_after_heal"] = [r.participants for r in history if r.round >= healed][
            :3
        ]
    else:
        details.update(loss=config.loss, jitter_s=config.jitter_s)
    return details
