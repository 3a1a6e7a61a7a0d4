"""FedAvg/FedProx with our averaging kernel give Flower's own results."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flower_messages import as_grid, task_identity  # noqa: F401 (autouse fixture)
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedProx

from hivenode.aggregator.job_spec import JobSpec
from hivenode.aggregator.strategy_factory import build_strategy
from hivenode.models.flower_arrays import numpy_to_array
from hivenode.strategies.fast import FastFedAvg, FastFedProx

NDArray = np.ndarray[Any, Any]
SHAPES = {"w": (64, 33), "b": (33,), "scale": ()}


def replies_to(strategy: FedAvg, clients: int, seed: int) -> list[Message]:
    rng = np.random.default_rng(seed)
    initial = ArrayRecord({k: numpy_to_array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})
    sent = list(strategy.configure_train(1, initial, ConfigRecord(), as_grid(list(range(clients)))))
    replies = []
    for msg in sent:
        arrays = {
            k: numpy_to_array(rng.standard_normal(s).astype(np.float32)) for k, s in SHAPES.items()
        }
        metrics = {"num-examples": int(rng.integers(1, 500)), "train_loss": float(rng.random())}
        content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)})
        replies.append(Message(content, reply_to=msg))
    return replies


@pytest.mark.parametrize(
    ("fast", "flower"),
    [(FastFedAvg(), FedAvg()), (FastFedProx(proximal_mu=0.5), FedProx(proximal_mu=0.5))],
)
def test_fast_strategies_aggregate_as_flowers_do(fast: FedAvg, flower: FedAvg) -> None:
    replies = replies_to(flower, clients=40, seed=3)
    ours_arrays, ours_metrics = fast.aggregate_train(1, replies)
    their_arrays, their_metrics = flower.aggregate_train(1, replies)
    assert ours_arrays is not None and their_arrays is not None
    assert list(ours_arrays) == list(their_arrays)
    for key in their_arrays:
        ours, theirs = ours_arrays[key].numpy(), their_arrays[key].numpy()
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    assert dict(ours_metrics or {}) == pytest.approx(dict(their_metrics or {}))


def test_no_valid_reply_aggregates_to_nothing() -> None:
    assert FastFedAvg().aggregate_train(1, []) == (None, None)


@pytest.mark.parametrize(("name", "kind"), [("fedavg", FastFedAvg), ("fedprox", FastFedProx)])
def test_jobs_get_the_fast_strategies(name: str, kind: type[FedAvg]) -> None:
    job = JobSpec.model_validate(
        {"name": "j", "dataset": "iris", "rounds": 3, "strategy": {"name": name}}
    )
    strategy = build_strategy(job, 4, lambda r, k: MetricRecord(), lambda r, k: MetricRecord())
    assert type(strategy) is kind
