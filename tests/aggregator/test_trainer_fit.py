"""Trainers that hold the data but cannot train the model are left out before round 1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fl_swarm import DATASET, fl_swarm
from swarm_helpers import wait_until

from hivenode.aggregator.job_spec import JobSpec
from hivenode.aggregator.runner import JobError, run_job
from hivenode.aggregator.trainer_fit import split_by_fit, training_need
from hivenode.protocol.advert import Advert, Hardware, MemoryInfo
from hivenode.sim.fl_datasets import federated_dataset

GIB = 1 << 30
ARRAYS = {"w": np.zeros((1000, 1000), np.float32), "b": np.zeros(1000, np.float32)}


def spec(framework: str = "torch", **overrides: Any) -> JobSpec:
    values: dict[str, Any] = {
        "name": "fit",
        "dataset": DATASET,
        "rounds": 2,
        "model": {"framework": framework, "name": "mlp"},
        "train": {"lr": 0.1, "local_epochs": 1, "batch_size": 32},
    }
    values.update(overrides)
    return JobSpec.model_validate(values)


def machine(ram: int, *frameworks: str) -> Hardware:
    return Hardware(
        memory=MemoryInfo(total_bytes=ram, available_bytes=ram),
        frameworks={name: "1.0" for name in frameworks},
    )


def test_the_need_is_the_real_model_trained_with_sgd() -> None:
    info, analysis = training_need(spec(), ARRAYS)
    assert info.parameters == 1_001_000
    weights = 1_001_000 * 4
    assert analysis.training.weights_bytes == weights
    assert analysis.training.gradients_bytes == weights
    assert analysis.training.total_bytes >= 2 * weights


def test_trainers_without_the_framework_or_the_memory_are_left_out() -> None:
    hardware = {
        "fits": machine(8 * GIB, "torch"),
        "no-torch": machine(8 * GIB, "scikit-learn"),
        "tiny": machine(1 << 20, "torch"),
        "unknown": None,
    }
    kept, refused = split_by_fit(spec(), ARRAYS, list(hardware), hardware)
    assert kept == ["fits", "unknown"]
    assert set(refused) == {"no-torch", "tiny"}
    assert "torch" in refused["no-torch"]
    assert "for training" in refused["tiny"] and "RAM 1.0 MiB" in refused["tiny"]


def test_a_keras_job_needs_tensorflow_or_keras() -> None:
    hardware = {"tf": machine(8 * GIB, "tensorflow-cpu"), "torch-only": machine(8 * GIB, "torch")}
    kept, refused = split_by_fit(spec("keras"), ARRAYS, list(hardware), hardware)
    assert kept == ["tf"] and list(refused) == ["torch-only"]


def shrink_memory(advert: Advert) -> Advert:
    small = advert.hardware.model_copy(update={"memory": MemoryInfo(total_bytes=1 << 10)})
    return advert.model_copy(update={"hardware": small})


@pytest.fixture(scope="module")
def digits() -> list[Any]:
    return federated_dataset("digits", 3, partition="iid", seed=0)


async def test_a_job_runs_on_the_trainers_that_fit(tmp_path: Path, digits: Any) -> None:
    async with fl_swarm(tmp_path, digits) as swarm:
        small = swarm.trainers[2]
        small.advert_hooks.append(shrink_memory)
        small.advertise_soon()
        table = swarm.aggregator.peer_table

        def shrunk() -> bool:
            entry = table.get(small.peer_id)
            return entry is not None and entry.advert.hardware.memory.total_bytes == 1 << 10

        await wait_until(shrunk, 20, "the aggregator sees the small trainer's advert")
        result = await run_job(
            swarm.aggregator, spec(clients_per_round=2, min_clients=2), tmp_path / "job"
        )
        assert result.trainers == sorted(swarm.trainer_ids[:2])
        assert all(r.participants == 2 for r in result.history)

        listed = spec(name="listed", trainers=swarm.trainer_ids, clients_per_round=3)
        with pytest.raises(JobError, match="2 of 3 trainer"):
            await run_job(swarm.aggregator, listed, tmp_path / "listed")
