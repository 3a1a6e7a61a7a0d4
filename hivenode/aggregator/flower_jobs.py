"""A daemon job that runs an unmodified Flower app (`jobs submit --flower-app DIR`).

The app directory must be readable by the daemon; its trainers are the peers (and this node)
that advertise the app's key, i.e. whose operators allowed the very same files. The app's
rounds are recorded as `RoundRecord`s so `jobs list|show|watch` read them like any job:
the metrics are the ones the app's replies carried, aggregated as Flower's FedAvg does, and
mapped by name — the first metric with "loss" in its name, and with "acc" for accuracy.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import trio

from hivenode.agent.node import Node
from hivenode.aggregator.flower_app_runner import FlowerRound, run_flower_app
from hivenode.aggregator.job_spec import JobSpec
from hivenode.aggregator.runner import (
    TRAINER_SETTLE_S,
    TRAINER_WAIT_S,
    JobError,
    JobResult,
    RoundRecord,
)
from hivenode.models.flower_app import app_key, content_hash, parse_run_config, read_flower_app


async def run_flower_job(node: Node, job: JobSpec, job_dir: Path) -> JobResult:
    assert job.flower_app is not None
    app = await trio.to_thread.run_sync(read_flower_app, Path(job.flower_app))
    digest = await trio.to_thread.run_sync(content_hash, app.root)
    key = app_key(app, digest)
    trainers = list(job.trainers) or await _trainers_with(node, key, job.min_clients)
    result = await run_flower_app(
        node,
        app,
        job.name,
        trainers,
        parse_run_config(job.run_config, app.config_defaults),
        job_dir,
        digest=digest,
        seed=job.seed,
        min_trainers=job.min_clients,
        short_wait_s=job.deadline_s,
    )
    return JobResult(
        name=job.name,
        strategy=f"flower app {app.name}",
        trainers=trainers,
        history=[_record(r) for r in result.rounds],
        model_path=job_dir / "result.json",
        wall_s=result.wall_s,
    )


async def _trainers_with(node: Node, key: str, needed: int) -> list[str]:
    """Every trainer advertising `key`, once `needed` are seen and no new one came lately."""
    found: list[str] = []
    settled_at = time.monotonic()
    with trio.move_on_after(TRAINER_WAIT_S):
        while True:
            now = time.monotonic()
            current = sorted(
                [e.advert.origin for e in node.peer_table.entries() if key in e.advert.apps]
                + ([node.peer_id] if node.trainer and key in node.trainer.apps else [])
            )
            if current != found:
                found, settled_at = current, now
            if len(found) >= needed and now - settled_at >= TRAINER_SETTLE_S:
                return found
            await trio.sleep(0.2)
    raise JobError(
        f"{len(found)} trainer(s) serve {key} after {TRAINER_WAIT_S:.0f} s; need {needed}"
    )


def _record(flower_round: FlowerRound) -> RoundRecord:
    return RoundRecord(
        round=flower_round.round,
        train_loss=_named(flower_round.train_metrics, "loss"),
        eval_loss=_named(flower_round.evaluate_metrics, "loss"),
        eval_accuracy=_named(flower_round.evaluate_metrics, "acc"),
        global_train_loss=None,
        participants=flower_round.participants,
        stragglers=0,
        failures=flower_round.failures,
        bytes_out=flower_round.bytes_out,
        bytes_in=flower_round.bytes_in,
        duration_s=0.0,
        compute_s=flower_round.compute_s,
    )


def _named(metrics: dict[str, Any], part: str) -> float | None:
    for name, value in metrics.items():
        if part in name.lower() and isinstance(value, int | float):
            return float(value)
    return None
