"""Every framework federates: a job of 3 rounds over 3 real nodes lowers the global loss.

Each test runs the built-in ClientApp on in-process libp2p nodes, so the model travels as a
spec and its weights as arrays, as on a real swarm. Between them the tests cover FedAvg,
FedProx (μ > 0) and SCAFFOLD in more than one adapter.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fl_swarm import DATASET, fl_swarm

from hivenode.aggregator.job_spec import JobSpec
from hivenode.aggregator.runner import JobResult, run_job
from hivenode.models.training.backend import LocalData
from hivenode.sim.fl_datasets import federated_dataset

TRAINERS = 3
ROUNDS = 3


def job(name: str, trainers: list[str], **sections: Any) -> JobSpec:
    """3 rounds over every trainer, with `sections` (model, train, strategy) as given."""
    return JobSpec.model_validate(
        {
            "name": name,
            "dataset": DATASET,
            "rounds": ROUNDS,
            "clients_per_round": len(trainers),
            "min_clients": len(trainers),
            "trainers": trainers,
            "deadline_s": 60,
            **sections,
        }
    )


async def federate(tmp_path: Path, partitions: list[LocalData], **sections: Any) -> JobResult:
    async with fl_swarm(tmp_path, partitions) as swarm:
        spec = job("frameworks", swarm.trainer_ids, **sections)
        return await run_job(swarm.aggregator, spec, tmp_path / "job")


def assert_global_loss_falls(result: JobResult) -> None:
    history = result.history
    assert [r.round for r in history] == list(range(1, ROUNDS + 1))
    assert all(r.participants == TRAINERS and r.failures == 0 for r in history), history
    first, last = history[0].global_train_loss, history[-1].global_train_loss
    assert first is not None and last is not None
    assert last < first, [r.global_train_loss for r in history]


@pytest.fixture(scope="module")
def digits() -> list[LocalData]:
    """8×8 digits flattened to 64 features in [0, 1], 10 classes, ~480 examples a trainer."""
    pytest.importorskip("sklearn")
    return federated_dataset("digits", TRAINERS, partition="iid", seed=0)


async def test_torch_mlp_federates_with_fedavg(tmp_path: Path, digits: list[LocalData]) -> None:
    pytest.importorskip("torch")
    result = await federate(
        tmp_path,
        digits,
        model={"framework": "torch", "name": "mlp", "options": {"hidden": [32]}},
        train={"lr": 0.1, "local_epochs": 1, "batch_size": 32},
    )
    assert_global_loss_falls(result)


async def test_keras_dense_model_federates_with_fedprox(
    tmp_path: Path, digits: list[LocalData]
) -> None:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # as the adapter sets it
    keras = pytest.importorskip("keras")
    from hivenode.models.training.keras_backend import keras_spec

    model = keras.Sequential(
        [
            keras.Input(digits[0].feature_shape),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(digits[0].num_classes),
        ]
    )
    spec = keras_spec(model)
    result = await federate(
        tmp_path,
        digits,
        model={"framework": "keras", "name": spec.name, "options": dict(spec.options)},
        train={"lr": 0.1, "local_epochs": 1, "batch_size": 32},
        strategy={"name": "fedprox", "mu": 0.1},
    )
    assert_global_loss_falls(result)


async def test_sklearn_sgd_classifier_federates_with_scaffold(
    tmp_path: Path, digits: list[LocalData]
) -> None:
    result = await federate(
        tmp_path,
        digits,
        model={"framework": "sklearn", "name": "SGDClassifier", "options": {"loss": "log_loss"}},
        train={"lr": 0.1, "local_epochs": 1, "batch_size": 32},
        strategy={"name": "scaffold"},
    )
    assert_global_loss_falls(result)


def half_vocabulary_tokens(examples: int, seed: int) -> LocalData:
    """Sequences of 8 int64 token ids; class 0 draws them from 10..29, class 1 from 30..49."""
    rng = np.random.default_rng(seed)
    y = np.arange(examples, dtype=np.int64) % 2
    x = rng.integers(10, 30, size=(examples, 8), dtype=np.int64) + 20 * y[:, None]
    split = examples * 4 // 5
    return LocalData(x[:split], y[:split], x[split:], y[split:], 2)


async def test_transformers_tiny_bert_federates_with_fedavg(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    config = {
        "model_type": "bert",
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "vocab_size": 50,
        "max_position_embeddings": 16,
        # BERT's default init (std 0.02) leaves plain SGD on a plateau for more than 3
        # rounds; a wider one, without dropout's noise, makes the fall reliable.
        "initializer_range": 0.2,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    result = await federate(
        tmp_path,
        # The catalog hands a trainer its features as float32: the ids arrive as whole floats.
        [half_vocabulary_tokens(100, seed) for seed in range(TRAINERS)],
        model={
            "framework": "hf",
            "name": "AutoModelForSequenceClassification",
            "options": {"config": config},
        },
        train={"lr": 0.1, "local_epochs": 1, "batch_size": 8},
    )
    assert_global_loss_falls(result)
