"""Hostile trainers: each attack lies about the values only, and the update screen sees it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from hivenode.aggregator.update_screen import screen_train_replies
from hivenode.models.flower_arrays import arrayrecord_to_numpy, numpy_to_array
from hivenode.sim.hostile import SCALE_FACTOR, Attack, hostile_app, hostile_trainers

NDArray = np.ndarray[Any, Any]
STEP = 0.1


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def global_model() -> dict[str, NDArray]:
    rng = np.random.default_rng(0)
    return {
        "w": rng.normal(size=(5, 3)).astype(np.float32),
        "b": rng.normal(size=3).astype(np.float64),
        "steps": np.array([7], dtype=np.int64),
    }


def record(arrays: dict[str, NDArray]) -> ArrayRecord:
    return ArrayRecord({k: numpy_to_array(v) for k, v in arrays.items()})


def request(kind: str = MessageType.TRAIN, server_round: int = 1) -> Message:
    content = RecordDict(
        {"arrays": record(global_model()), "config": ConfigRecord({"server-round": server_round})}
    )
    return Message(content, 7, kind)


def context(partition: int = 0) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": partition},
        state=RecordDict(),
        run_config={},
    )


def honest_app(message: Message, _: Context) -> Message:
    """Moves every float array by STEP; what the built-in app's train reply looks like."""
    arrays = arrayrecord_to_numpy(message.content.array_records["arrays"])
    moved = {k: (v + STEP).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in arrays.items()}
    content = RecordDict({"arrays": record(moved), "metrics": MetricRecord({"num-examples": 12})})
    return Message(content, reply_to=message)


def reply_arrays(reply: Message, name: str = "arrays") -> dict[str, NDArray]:
    return arrayrecord_to_numpy(reply.content.array_records[name])


@pytest.mark.parametrize("attack", list(Attack))
def test_an_attack_keeps_keys_shapes_dtypes_and_metrics(attack: Attack) -> None:
    reply = hostile_app(honest_app, attack)(request(), context())
    arrays, model = reply_arrays(reply), global_model()
    assert list(arrays) == list(model)
    for key, value in model.items():
        assert arrays[key].shape == value.shape and arrays[key].dtype == value.dtype
    np.testing.assert_array_equal(arrays["steps"], model["steps"])  # integers are left alone
    assert reply.content.metric_records["metrics"]["num-examples"] == 12


def test_sign_flip_sends_the_honest_update_backwards() -> None:
    arrays = reply_arrays(hostile_app(honest_app, Attack.SIGN_FLIP)(request(), context()))
    for key in ("w", "b"):
        np.testing.assert_allclose(arrays[key], global_model()[key] - STEP, rtol=1e-6)


def test_scale_multiplies_the_honest_update() -> None:
    arrays = reply_arrays(hostile_app(honest_app, Attack.SCALE)(request(), context()))
    for key in ("w", "b"):
        np.testing.assert_allclose(
            arrays[key], global_model()[key] + SCALE_FACTOR * STEP, rtol=1e-5, atol=1e-4
        )


@pytest.mark.parametrize(("attack", "check"), [(Attack.NAN, np.isnan), (Attack.INF, np.isposinf)])
def test_non_finite_attacks_fill_every_float(attack: Attack, check: Any) -> None:
    arrays = reply_arrays(hostile_app(honest_app, attack)(request(), context()))
    assert check(arrays["w"]).all() and check(arrays["b"]).all()


def test_random_updates_repeat_for_the_same_round_and_trainer_only() -> None:
    app = hostile_app(honest_app, Attack.RANDOM, seed=3)
    first = reply_arrays(app(request(server_round=2), context(1)))["w"]
    again = reply_arrays(app(request(server_round=2), context(1)))["w"]
    other_round = reply_arrays(app(request(server_round=3), context(1)))["w"]
    other_trainer = reply_arrays(app(request(server_round=2), context(2)))["w"]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other_round)
    assert not np.array_equal(first, other_trainer)


def test_a_record_that_is_an_update_already_is_flipped_as_is() -> None:
    def scaffold_app(message: Message, _: Context) -> Message:
        delta = {"w": np.full((5, 3), 0.5, np.float32)}
        return Message(RecordDict({"delta_y": record(delta)}), reply_to=message)

    reply = hostile_app(scaffold_app, Attack.SIGN_FLIP)(request(), context())
    np.testing.assert_array_equal(reply_arrays(reply, "delta_y")["w"], np.full((5, 3), -0.5))


def test_evaluate_and_error_replies_pass_through() -> None:
    def failing_app(message: Message, _: Context) -> Message:
        return Message(Error(2, "boom"), reply_to=message)

    evaluation = request(MessageType.EVALUATE)
    honest = honest_app(evaluation, context())
    attacked = hostile_app(honest_app, Attack.NAN)(evaluation, context())
    np.testing.assert_array_equal(reply_arrays(attacked)["w"], reply_arrays(honest)["w"])
    failed = hostile_app(failing_app, Attack.NAN)(request(), context())
    assert failed.has_error() and failed.error.reason == "boom"


def test_hostile_trainers_are_the_last_fraction_and_mixed_takes_turns() -> None:
    assert hostile_trainers(10, 0.2, "scale") == {8: Attack.SCALE, 9: Attack.SCALE}
    assert hostile_trainers(10, 0.0, "nan") == {}
    mixed = hostile_trainers(10, 0.5, "mixed")
    assert list(mixed) == [5, 6, 7, 8, 9] and set(mixed.values()) == set(Attack)
    with pytest.raises(ValueError, match="unknown attack"):
        hostile_trainers(10, 0.2, "gentle")


@pytest.mark.parametrize("attack", [Attack.SCALE, Attack.NAN, Attack.INF, Attack.RANDOM])
def test_the_update_screen_rejects_every_attack_but_sign_flip(attack: Attack) -> None:
    requests = [request(server_round=4) for _ in range(10)]
    apps = [honest_app] * 8 + [hostile_app(honest_app, attack)] * 2
    replies = [
        app(req, context(i)) for i, (app, req) in enumerate(zip(apps, requests, strict=True))
    ]
    verdict = screen_train_replies(
        [r.content for r in requests], [r.content for r in replies], 10.0
    )
    assert set(verdict.rejected) == {8, 9}


def test_sign_flip_has_an_honest_norm_and_is_left_to_robust_strategies() -> None:
    requests = [request() for _ in range(5)]
    apps = [honest_app] * 4 + [hostile_app(honest_app, Attack.SIGN_FLIP)]
    replies = [
        app(req, context(i)) for i, (app, req) in enumerate(zip(apps, requests, strict=True))
    ]
    verdict = screen_train_replies(
        [r.content for r in requests], [r.content for r in replies], 10.0
    )
    assert verdict.keep == (0, 1, 2, 3, 4)
