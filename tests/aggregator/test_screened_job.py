"""Jobs behind the update screen: hostile updates are refused per peer, honest ones kept."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest
from fl_swarm import DATASET, fl_swarm
from safetensors.numpy import load_file

from hivenode.aggregator.job_spec import JobSpec
from hivenode.aggregator.runner import run_job
from hivenode.sim.fl_datasets import federated_dataset
from hivenode.sim.hostile import Attack, hostile_app


def job(name: str, trainers: list[str], **overrides: Any) -> JobSpec:
    values: dict[str, Any] = {
        "name": name,
        "dataset": DATASET,
        "rounds": 2,
        "clients_per_round": len(trainers),
        "trainers": trainers,
        "deadline_s": 30,
        "model": {"framework": "torch", "name": "logreg"},
        "train": {"lr": 0.1, "local_epochs": 1, "batch_size": 32},
    }
    values.update(overrides)
    return JobSpec.model_validate(values)


def last_trainer_attacks(attack: Attack) -> Any:
    made = itertools.count()

    def wrap(app: Any) -> Any:
        return hostile_app(app, attack) if next(made) == 3 else app

    return wrap


@pytest.fixture(scope="module")
def digits() -> list[Any]:
    return federated_dataset("digits", 4, partition="iid", seed=0)


@pytest.mark.parametrize("attack", [Attack.NAN, Attack.SCALE])
async def test_a_hostile_update_is_rejected_and_the_job_goes_on(
    tmp_path: Path, digits: Any, attack: Attack
) -> None:
    async with fl_swarm(tmp_path, digits, wrap=last_trainer_attacks(attack)) as swarm:
        result = await run_job(swarm.aggregator, job("screened", swarm.trainer_ids), tmp_path / "j")
        metrics = swarm.aggregator.metrics
        counted = {
            p: metrics.value("hivenode_updates_rejected_total", peer=p) for p in swarm.trainer_ids
        }
    assert [(r.participants, r.rejected, r.failures) for r in result.history] == [(3, 1, 0)] * 2
    assert sorted(counted.values()) == [0, 0, 0, 2]  # one peer, both rounds, in Prometheus
    model = load_file(str(result.model_path))
    assert all(math.isfinite(float(abs(v).max())) for v in model.values())
    assert result.history[-1].eval_accuracy is not None
    assert result.history[-1].eval_accuracy > 0.5


async def test_without_the_screen_a_nan_update_reaches_the_model(
    tmp_path: Path, digits: Any
) -> None:
    async with fl_swarm(tmp_path, digits, wrap=last_trainer_attacks(Attack.NAN)) as swarm:
        spec = job("unscreened", swarm.trainer_ids, rounds=1, screen_updates=False)
        result = await run_job(swarm.aggregator, spec, tmp_path / "j")
    assert result.history[0].rejected == 0 and result.history[0].participants == 4
    model = load_file(str(result.model_path))
    assert any(not math.isfinite(float(abs(v).max())) for v in model.values())
