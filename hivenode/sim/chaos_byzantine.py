"""The `byzantine` scenario: hostile trainers against each defence, clean and attacked
(see `hivenode.sim.chaos`)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hivenode.agent.trainer import Trainer
from hivenode.aggregator.runner import RoundRecord
from hivenode.models.training.backend import LocalData
from hivenode.protocol.ids import BUILTIN_APP
from hivenode.sim.chaos import (
    ChaosConfig,
    ChaosReport,
    Progress,
    RunOutcome,
    job_of,
    report_of,
    round_line,
    run_job_into,
)
from hivenode.sim.chaos_swarm import (
    ChaosTrainer,
    Ledger,
    chaos_swarm,
    honest_trainer,
    training_threads,
)
from hivenode.sim.hostile import Attack, hostile_app, hostile_trainers


async def byzantine(
    config: ChaosConfig, devices: Sequence[LocalData], say: Progress
) -> ChaosReport:
    labels = list(dict.fromkeys([*config.defences, config.job_strategy]))
    attacks = hostile_trainers(config.nodes, config.share, config.attack)
    runs: dict[str, dict[str, Any]] = {}
    outcomes: dict[str, tuple[RunOutcome, RunOutcome]] = {}
    for label in labels:
        say(f"byzantine: {label}, clean")
        clean = await _byzantine_run(config, devices, label, {}, say)
        say(f"byzantine: {label}, {len(attacks)} attackers ({config.attack})")
        attacked = await _byzantine_run(config, devices, label, attacks, say)
        outcomes[label] = (clean, attacked)
        runs[label] = {
            "baseline_accuracy": clean.accuracy,
            "final_accuracy": attacked.accuracy,
            "completed": attacked.completed(config.rounds),
            "rejected": sum(int(getattr(r, "rejected", 0)) for r in attacked.history),
            "error": attacked.error,
        }
    clean, attacked = outcomes[config.job_strategy]
    report = report_of(config, clean, attacked)
    report.details.update(
        {
            "attack": config.attack,
            "attackers": sorted(attacks),
            "runs": runs,
            "lost_updates_all_runs": sum(o[1].lost_updates for o in outcomes.values()),
        }
    )
    return report


async def _byzantine_run(
    config: ChaosConfig,
    devices: Sequence[LocalData],
    label: str,
    attacks: dict[int, Attack],
    say: Progress,
) -> RunOutcome:
    ledger = Ledger()
    honest = honest_trainer(training_threads())

    def make_trainer(index: int, state_dir: Path, peer_id: str) -> Trainer:
        trainer = honest(index, state_dir, peer_id)
        attack = attacks.get(index)
        if attack is not None:
            app = hostile_app(trainer.apps[BUILTIN_APP], attack, config.seed)
            trainer.apps = {**trainer.apps, BUILTIN_APP: app}
        return ChaosTrainer.wrapping(trainer, index=index, ledger=ledger)

    outcome = RunOutcome([], None, None, 0, 0.0)
    with tempfile.TemporaryDirectory(prefix="hn-chaos-") as tmp:
        base = Path(tmp)
        started = time.monotonic()
        async with chaos_swarm(base, devices, make_trainer) as swarm:
            (aggregator,) = swarm.aggregators
            job = job_of(config, label, swarm.trainer_ids, len(attacks) or config.affected)

            def on_round(record: RoundRecord) -> None:
                ledger.round_done(aggregator.peer_id, record)
                say(round_line(record))

            await run_job_into(
                outcome, aggregator, job, base / "jobs" / job.name, devices, on_round
            )
        outcome.wall_s = time.monotonic() - started
    outcome.lost_updates = ledger.lost()
    return outcome
