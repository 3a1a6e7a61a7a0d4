"""The built-in ClientApp, driven with real Flower Messages: the reply contract for plain,
FedProx and SCAFFOLD rounds, simulated stragglers, deadlines, evaluation and errors."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from hivenode.models.flower_arrays import arrayrecord_to_numpy, numpy_to_array
from hivenode.models.training.backend import (
    LocalData,
    ModelSpec,
    TrainingError,
    TrainSettings,
    backend_for,
)
from hivenode.models.training.clientapp import (
    CLIENT_CONTROL_KEY,
    build_client_app,
    shuffle_seed,
    straggler_epochs,
)

NDArray = np.ndarray[Any, Any]
SPEC = ModelSpec("torch", "logreg")
BACKEND = backend_for("torch")
TRAIN_METRICS = {
    "num-examples",
    "train-loss",
    "epochs-completed",
    "examples-seen",
    "local-steps",
    "partial",
}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Flower's Message needs the process's task identity, as its runtimes set it."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    yield


@pytest.fixture(scope="module")
def data() -> LocalData:
    """Three separable classes of 4×4 inputs: 60 to train on, 30 to test."""
    rng = np.random.default_rng(0)
    y = np.arange(90) % 3
    x = rng.normal(0.0, 0.3, size=(90, 4, 4)).astype(np.float32)
    x.reshape(90, -1)[np.arange(90), y * 5] += 1.0
    return LocalData(x[:60], y[:60], x[60:], y[60:], 3)


@pytest.fixture
def app(data: LocalData) -> ClientApp:
    def load_data(dataset: str) -> LocalData:
        assert dataset == "blobs"
        return data

    return build_client_app(load_data)


@pytest.fixture
def context() -> Context:
    return Context(
        run_id=1, node_id=7, node_config={"partition-id": 2}, state=RecordDict(), run_config={}
    )


@pytest.fixture(scope="module")
def model(data: LocalData) -> dict[str, NDArray]:
    return BACKEND.init_arrays(SPEC, data.feature_shape, data.num_classes, 0)


def job_config(server_round: int = 1, **extra: Any) -> ConfigRecord:
    return ConfigRecord(
        {
            "server-round": server_round,
            "dataset": "blobs",
            **SPEC.to_config(),
            "lr": 0.1,
            "local-epochs": 3,
            "batch-size": 16,
            **extra,
        }
    )


def record(arrays: dict[str, NDArray]) -> ArrayRecord:
    return ArrayRecord({k: numpy_to_array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def message(kind: str, arrays: dict[str, NDArray], config: ConfigRecord, **records: Any) -> Message:
    content = RecordDict({"arrays": record(arrays), "config": config, **records})
    return Message(content, 7, kind)


def metrics_of(reply: Message) -> MetricRecord:
    return reply.content.metric_records["metrics"]


def expected_settings(server_round: int = 1, seed: int = 0, **extra: Any) -> TrainSettings:
    """The settings a trainer with partition-id 2 should derive from `job_config`."""
    return TrainSettings(
        lr=0.1, local_epochs=3, batch_size=16, seed=shuffle_seed(seed, server_round, 2), **extra
    )


def test_plain_round_replies_weights_and_metrics(
    app: ClientApp, context: Context, data: LocalData, model: dict[str, NDArray]
) -> None:
    msg = message(MessageType.TRAIN, model, job_config())
    reply = app(msg, context)
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id
    assert set(reply.content.array_records) == {"arrays"}
    arrays = arrayrecord_to_numpy(reply.content.array_records["arrays"])
    expected = BACKEND.train(SPEC, model, data, expected_settings())
    assert list(arrays) == list(model)
    assert all(np.array_equal(arrays[k], expected.arrays[k]) for k in model)
    metrics = metrics_of(reply)
    assert set(metrics) == TRAIN_METRICS
    assert metrics["num-examples"] == 60
    assert (metrics["epochs-completed"], metrics["partial"]) == (3, 0)
    assert (metrics["local-steps"], metrics["examples-seen"]) == (3 * 4, 3 * 60)
    assert metrics["train-loss"] == pytest.approx(expected.train_loss)


def test_fedprox_round_applies_the_proximal_mu(
    app: ClientApp, context: Context, data: LocalData, model: dict[str, NDArray]
) -> None:
    reply = app(message(MessageType.TRAIN, model, job_config(**{"proximal-mu": 5.0})), context)
    arrays = arrayrecord_to_numpy(reply.content.array_records["arrays"])
    expected = BACKEND.train(SPEC, model, data, expected_settings(proximal_mu=5.0))
    plain = BACKEND.train(SPEC, model, data, expected_settings())
    assert all(np.array_equal(arrays[k], expected.arrays[k]) for k in model)
    assert not np.array_equal(arrays["head.weight"], plain.arrays["head.weight"])


def test_scaffold_rounds_reply_deltas_and_keep_c_i(
    app: ClientApp, context: Context, data: LocalData, model: dict[str, NDArray]
) -> None:
    zeros = {k: np.zeros_like(v) for k, v in model.items()}
    reply = app(message(MessageType.TRAIN, model, job_config(), control=record(zeros)), context)
    assert set(reply.content.array_records) == {"delta_y", "delta_c"}
    assert set(metrics_of(reply)) == TRAIN_METRICS
    delta_y = arrayrecord_to_numpy(reply.content.array_records["delta_y"])
    delta_c = arrayrecord_to_numpy(reply.content.array_records["delta_c"])
    # with c = c_i = 0 the local steps are plain SGD, and c_i⁺ = (x − y)/(K·η)
    plain = BACKEND.train(SPEC, model, data, expected_settings())
    steps = plain.local_steps
    for key in model:
        np.testing.assert_allclose(delta_y[key], plain.arrays[key] - model[key], atol=1e-7)
        np.testing.assert_allclose(delta_c[key], -delta_y[key] / (steps * 0.1), rtol=1e-5)
    first_c_i = arrayrecord_to_numpy(context.state.array_records[CLIENT_CONTROL_KEY])
    for key in model:
        np.testing.assert_allclose(first_c_i[key], delta_c[key], rtol=1e-6)

    # round 2 starts from c_i of round 1: Δc = c_i⁺ − c_i, and the stored c_i moves on
    control = {k: np.full_like(v, 0.01) for k, v in model.items()}
    x2 = {k: model[k] + delta_y[k] for k in model}
    reply = app(message(MessageType.TRAIN, x2, job_config(2), control=record(control)), context)
    second_c_i = arrayrecord_to_numpy(context.state.array_records[CLIENT_CONTROL_KEY])
    delta_c2 = arrayrecord_to_numpy(reply.content.array_records["delta_c"])
    delta_y2 = arrayrecord_to_numpy(reply.content.array_records["delta_y"])
    for key in model:
        assert not np.allclose(second_c_i[key], first_c_i[key])
        np.testing.assert_allclose(delta_c2[key], second_c_i[key] - first_c_i[key], atol=1e-6)
        # option II: c_i⁺ = c_i − c + (x − y)/(K·η)
        expected = first_c_i[key] - 0.01 - delta_y2[key] / (steps * 0.1)
        np.testing.assert_allclose(second_c_i[key], expected, atol=1e-5)


def test_scaffold_round_past_its_deadline_replies_zero_deltas(
    app: ClientApp, context: Context, model: dict[str, NDArray]
) -> None:
    zeros = {k: np.zeros_like(v) for k, v in model.items()}
    config = job_config(**{"deadline-s": 0.0})
    reply = app(message(MessageType.TRAIN, model, config, control=record(zeros)), context)
    metrics = metrics_of(reply)
    assert (metrics["local-steps"], metrics["epochs-completed"], metrics["partial"]) == (0, 0, 1)
    for name in ("delta_y", "delta_c"):
        deltas = arrayrecord_to_numpy(reply.content.array_records[name])
        assert all(not deltas[k].any() for k in model)
    assert CLIENT_CONTROL_KEY not in context.state


def test_every_trainer_straggles_at_fraction_one(
    app: ClientApp, context: Context, model: dict[str, NDArray]
) -> None:
    config = job_config(**{"straggler-fraction": 1.0, "seed": 4})
    metrics = metrics_of(app(message(MessageType.TRAIN, model, config), context))
    epochs = straggler_epochs(1.0, 4, 1, 2, 3)
    assert epochs in (1, 2)
    assert (metrics["partial"], metrics["epochs-completed"]) == (1, epochs)
    assert metrics["local-steps"] == epochs * 4


def test_straggler_draw_follows_the_simulator_formula() -> None:
    rng = np.random.default_rng([9, 3, 5])
    expected = int(rng.integers(1, 6)) if rng.random() < 0.5 else None
    assert straggler_epochs(0.5, 9, 3, 5, 6) == expected
    assert straggler_epochs(1.0, 9, 3, 5, 1) is None  # one epoch cannot be cut short
    assert straggler_epochs(0.0, 9, 3, 5, 6) is None


def test_shuffle_seed_differs_per_round_and_trainer() -> None:
    seeds = {shuffle_seed(0, r, p) for r in range(1, 4) for p in range(3)}
    assert len(seeds) == 9
    assert shuffle_seed(0, 1, 1) == shuffle_seed(0, 1, 1)


def test_evaluate_reply_has_the_four_metrics(
    app: ClientApp, context: Context, data: LocalData, model: dict[str, NDArray]
) -> None:
    config = ConfigRecord({"dataset": "blobs", **SPEC.to_config()})
    reply = app(message(MessageType.EVALUATE, model, config), context)
    metrics = metrics_of(reply)
    assert set(metrics) == {"num-examples", "eval-loss", "eval-accuracy", "global-train-loss"}
    test = BACKEND.evaluate(SPEC, model, data.x_test, data.y_test)
    train = BACKEND.evaluate(SPEC, model, data.x_train, data.y_train)
    assert metrics["num-examples"] == 30
    assert metrics["eval-loss"] == pytest.approx(test.loss)
    assert metrics["eval-accuracy"] == pytest.approx(test.accuracy)
    assert metrics["global-train-loss"] == pytest.approx(train.loss)
    assert math.isfinite(float(metrics["global-train-loss"]))


def test_arrays_for_another_model_raise_with_the_reason(
    app: ClientApp, context: Context, model: dict[str, NDArray]
) -> None:
    wrong = {**model, "head.bias": np.zeros(5, np.float32)}
    with pytest.raises(TrainingError, match=r"'head\.bias' has shape"):
        app(message(MessageType.TRAIN, wrong, job_config()), context)


def test_a_message_without_its_config_raises(
    app: ClientApp, context: Context, model: dict[str, NDArray]
) -> None:
    msg = Message(RecordDict({"arrays": record(model)}), 7, MessageType.TRAIN)
    with pytest.raises(TrainingError, match="no ConfigRecord 'config'"):
        app(msg, context)


def test_a_missing_training_setting_is_named(
    app: ClientApp, context: Context, model: dict[str, NDArray]
) -> None:
    config = job_config()
    del config["lr"]
    with pytest.raises(TrainingError, match="no 'lr'"):
        app(message(MessageType.TRAIN, model, config), context)


def test_importing_the_client_app_loads_no_framework() -> None:
    """Frameworks load slowly and only the one a job names is needed: they load on first use."""
    code = (
        "import sys, hivenode.models.training.clientapp; "
        "print(sorted({'torch', 'transformers', 'keras', 'sklearn'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
