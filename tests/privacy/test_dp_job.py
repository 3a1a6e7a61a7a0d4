"""Central-DP jobs over real in-process nodes: Flower's fixed-clipping wrappers, ε reported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fl_swarm import fl_swarm
from safetensors.numpy import load_file
from test_secure_aggregation_job import job

from hivenode.aggregator.runner import run_job
from hivenode.models.training.backend import ModelSpec, backend_for
from hivenode.privacy.accountant import gaussian_epsilon
from hivenode.sim.fl_datasets import federated_dataset


@pytest.fixture(scope="module")
def digits() -> list[Any]:
    return federated_dataset("digits", 3, partition="iid", seed=0)


async def test_dp_jobs_report_less_epsilon_for_more_noise(tmp_path: Path, digits: Any) -> None:
    async with fl_swarm(tmp_path, digits) as swarm:
        ids = swarm.trainer_ids
        results = []
        for mode, noise in (("server-fixed", 0.5), ("client-fixed", 2.0)):
            privacy = {"dp": mode, "noise_multiplier": noise, "clipping_norm": 1.0}
            spec = job(f"dp-{noise}", ids, privacy=privacy, evaluate_fraction=1.0)
            results.append(await run_job(swarm.aggregator, spec, tmp_path / spec.name))
    low, high = (r.privacy for r in results)
    assert low is not None and high is not None
    assert low.releases == high.releases == 2 and low.delta == 1e-5
    assert low.epsilon == pytest.approx(gaussian_epsilon(0.5, 2, 1e-5))
    assert high.epsilon < low.epsilon
    assert [r.epsilon for r in results[1].history] == [
        pytest.approx(gaussian_epsilon(2.0, n, 1e-5)) for n in (1, 2)
    ]
    assert all(r.participants == 3 and r.eval_accuracy is not None for r in results[1].history)


async def test_client_side_clipping_bounds_the_update_under_secure_aggregation(
    tmp_path: Path, digits: Any
) -> None:
    clip = 0.05
    privacy = {
        "dp": "client-fixed",
        "noise_multiplier": 1e-4,
        "clipping_norm": clip,
        "secure_aggregation": True,
    }
    async with fl_swarm(tmp_path, digits) as swarm:
        spec = job("clipped", swarm.trainer_ids, rounds=1, privacy=privacy)
        result = await run_job(swarm.aggregator, spec, tmp_path / "clipped")
    start = backend_for("torch").init_arrays(ModelSpec("torch", "logreg", {}), (64,), 10, 0)
    final = load_file(str(result.model_path))
    moved = np.sqrt(sum(float(np.sum((final[k] - v) ** 2)) for k, v in start.items()))
    # the mean of 3 updates each clipped to C, plus noise of std 1e-4·C/3, plus quantization
    assert 0.5 * clip < moved <= clip * 1.01
    assert result.privacy is not None and result.privacy.releases == 1
    assert result.history[0].participants == 3
