"""The "torch" adapter: zoo models learn, rounds replay exactly, FedProx and SCAFFOLD steps
match a plain autograd reference, and stragglers and deadlines report the work really done."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hivenode.models.training import loop, zoo
from hivenode.models.training.backend import (
    LocalData,
    ModelSpec,
    ScaffoldState,
    TrainingError,
    TrainSettings,
    backend_for,
)

NDArray = np.ndarray[Any, Any]
BACKEND = backend_for("torch")
ZOO = ("logreg", "mlp", "cnn")


def blobs(
    n: int = 120, shape: tuple[int, ...] = (8, 8), classes: int = 3, seed: int = 0
) -> LocalData:
    """Linearly separable classes: each class lights its own block of pixels, plus noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.normal(0.0, 0.3, size=(n, *shape)).astype(np.float32)
    flat = x.reshape(n, -1)
    block = flat.shape[1] // classes
    for c in range(classes):
        flat[y == c, c * block : (c + 1) * block] += 1.0
    x.flags.writeable = False  # as the node's dataset cache hands it out
    return LocalData(x[:90], y[:90], x[90:], y[90:], classes)


def spec(name: str) -> ModelSpec:
    return ModelSpec("torch", name, {"hidden": [32]} if name == "mlp" else {})


def init(name: str, data: LocalData, seed: int = 0) -> dict[str, NDArray]:
    return BACKEND.init_arrays(spec(name), data.feature_shape, data.num_classes, seed)


def settings(**overrides: Any) -> TrainSettings:
    return TrainSettings(**{"lr": 0.1, "local_epochs": 3, "batch_size": 16, **overrides})


def distance(a: dict[str, NDArray], b: dict[str, NDArray]) -> float:
    return math.sqrt(sum(float(np.sum((a[k] - b[k]) ** 2)) for k in a))


@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_model_learns_a_separable_task(name: str) -> None:
    data = blobs()
    arrays = init(name, data)
    before = BACKEND.evaluate(spec(name), arrays, data.x_train, data.y_train)
    outcome = BACKEND.train(spec(name), arrays, data, settings(lr=0.2, local_epochs=8))
    after = BACKEND.evaluate(spec(name), outcome.arrays, data.x_train, data.y_train)
    assert after.loss < 0.5 * before.loss
    assert BACKEND.evaluate(spec(name), outcome.arrays, data.x_test, data.y_test).accuracy > 0.9


@pytest.mark.parametrize("shape", [(8, 8), (28, 28), (1, 28, 28), (3, 8, 8), (4, 5)])
def test_cnn_builds_for_images_of_any_usable_size(shape: tuple[int, ...]) -> None:
    model = zoo.build_model("cnn", {}, shape, 10)
    assert model(torch.zeros(2, *shape)).shape == (2, 10)


def test_unknown_zoo_model_names_the_known_ones() -> None:
    with pytest.raises(TrainingError, match="cnn, logreg, mlp"):
        zoo.build_model("resnet", {}, (8, 8), 10)


def test_misspelt_option_is_refused() -> None:
    with pytest.raises(TrainingError, match="hiden"):
        zoo.build_model("mlp", {"hiden": [8]}, (8, 8), 10)


def test_init_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    data = blobs()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = init("cnn", data, seed=7)
    assert torch.equal(torch.rand(3), expected)
    second, other = init("cnn", data, seed=7), init("cnn", data, seed=8)
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert not np.array_equal(first["head.weight"], other["head.weight"])


def test_arrays_are_the_state_dict_as_float32() -> None:
    arrays = init("mlp", blobs())
    assert list(arrays) == list(zoo.build_model("mlp", {"hidden": [32]}, (8, 8), 3).state_dict())
    assert {a.dtype for a in arrays.values()} == {np.dtype(np.float32)}


def test_training_replays_exactly_for_a_seed() -> None:
    data = blobs()
    arrays = init("mlp", data)
    first = BACKEND.train(spec("mlp"), arrays, data, settings(seed=5))
    second = BACKEND.train(spec("mlp"), arrays, data, settings(seed=5))
    other = BACKEND.train(spec("mlp"), arrays, data, settings(seed=6))
    assert all(np.array_equal(first.arrays[k], second.arrays[k]) for k in arrays)
    assert first.train_loss == second.train_loss
    assert not np.array_equal(first.arrays["head.weight"], other.arrays["head.weight"])


def test_returned_arrays_keep_the_given_order_and_dtypes() -> None:
    data = blobs()
    arrays = {k: v.astype(np.float64) for k, v in reversed(init("logreg", data).items())}
    outcome = BACKEND.train(spec("logreg"), arrays, data, settings(local_epochs=1))
    assert list(outcome.arrays) == list(arrays)
    assert {a.dtype for a in outcome.arrays.values()} == {np.dtype(np.float64)}


def reference_full_batch(
    arrays: dict[str, NDArray],
    data: LocalData,
    lr: float,
    steps: int,
    mu: float = 0.0,
    correction: dict[str, NDArray] | None = None,
) -> dict[str, NDArray]:
    """Logistic regression by hand in float64: `steps` full-batch steps on
    CE + μ/2·‖w − w_global‖², each gradient plus SCAFFOLD's c − c_i."""
    x = torch.tensor(data.x_train.reshape(len(data.x_train), -1), dtype=torch.float64)
    y = torch.tensor(data.y_train)
    start = {k: torch.tensor(v, dtype=torch.float64) for k, v in arrays.items()}
    w = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    for _ in range(steps):
        loss = F.cross_entropy(x @ w["head.weight"].T + w["head.bias"], y)
        loss = loss + mu / 2 * sum(((w[k] - start[k]) ** 2).sum() for k in w)
        grads = torch.autograd.grad(loss, list(w.values()))
        with torch.no_grad():
            for (k, v), g in zip(w.items(), grads, strict=True):
                extra = 0.0 if correction is None else torch.tensor(correction[k])
                v -= lr * (g + extra)
    return {k: v.detach().numpy() for k, v in w.items()}


def test_proximal_step_matches_the_autograd_reference() -> None:
    data = blobs()
    arrays = init("logreg", data)
    outcome = BACKEND.train(
        spec("logreg"), arrays, data, settings(batch_size=90, proximal_mu=0.7, lr=0.5)
    )
    expected = reference_full_batch(arrays, data, lr=0.5, steps=3, mu=0.7)
    for key, value in expected.items():
        np.testing.assert_allclose(outcome.arrays[key], value, atol=1e-5)


def test_scaffold_step_matches_the_autograd_reference() -> None:
    data = blobs()
    arrays = init("logreg", data)
    rng = np.random.default_rng(1)
    control = [rng.normal(0, 0.1, v.shape).astype(np.float32) for v in arrays.values()]
    client = [rng.normal(0, 0.1, v.shape).astype(np.float32) for v in arrays.values()]
    outcome = BACKEND.train(
        spec("logreg"),
        arrays,
        data,
        settings(batch_size=90, lr=0.5),
        ScaffoldState(control=control, client_control=client),
    )
    correction = {k: c - ci for k, c, ci in zip(arrays, control, client, strict=True)}
    expected = reference_full_batch(arrays, data, lr=0.5, steps=3, correction=correction)
    for key, value in expected.items():
        np.testing.assert_allclose(outcome.arrays[key], value, atol=1e-5)


def test_huge_proximal_mu_keeps_weights_near_the_global_model() -> None:
    data = blobs()
    arrays = init("mlp", data)
    plain = BACKEND.train(spec("mlp"), arrays, data, settings())
    # μ = 1/lr: each step pulls all the way back to w_global before the loss gradient
    held = BACKEND.train(spec("mlp"), arrays, data, settings(proximal_mu=10.0))
    assert distance(held.arrays, arrays) < 0.2 * distance(plain.arrays, arrays)
    assert held.train_loss > plain.train_loss


def test_scaffold_with_zero_controls_is_plain_sgd() -> None:
    data = blobs()
    arrays = init("cnn", data)
    zeros = [np.zeros_like(v) for v in arrays.values()]
    plain = BACKEND.train(spec("cnn"), arrays, data, settings())
    scaffold = BACKEND.train(
        spec("cnn"), arrays, data, settings(), ScaffoldState(control=zeros, client_control=zeros)
    )
    assert all(np.array_equal(plain.arrays[k], scaffold.arrays[k]) for k in arrays)
    assert plain.local_steps == scaffold.local_steps == 3 * 6


def test_a_straggler_stops_after_max_epochs() -> None:
    data = blobs()  # 90 examples: 6 batches of 16 (the last of 10) per epoch
    outcome = BACKEND.train(
        spec("logreg"), init("logreg", data), data, settings(local_epochs=5, max_epochs=2)
    )
    assert (outcome.epochs_completed, outcome.local_steps, outcome.examples_seen) == (2, 12, 180)


def test_a_deadline_stops_training_after_the_batch_that_crosses_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ticks = iter(range(1000))  # the clock advances one second per batch
    monkeypatch.setattr(loop, "time", SimpleNamespace(monotonic=lambda: next(ticks)))
    data = blobs()
    outcome = BACKEND.train(
        spec("logreg"), init("logreg", data), data, settings(local_epochs=5, deadline=7.5)
    )
    # batches start at t = 0..7; the one at t = 7 crosses 7.5: 8 steps, one full epoch
    assert (outcome.epochs_completed, outcome.local_steps, outcome.examples_seen) == (1, 8, 122)
    assert math.isfinite(outcome.train_loss)


def test_a_passed_deadline_takes_no_step() -> None:
    data = blobs()
    arrays = init("logreg", data)
    outcome = BACKEND.train(spec("logreg"), arrays, data, settings(deadline=time.monotonic() - 1.0))
    assert (outcome.epochs_completed, outcome.local_steps, outcome.examples_seen) == (0, 0, 0)
    assert math.isnan(outcome.train_loss)
    assert all(np.array_equal(outcome.arrays[k], arrays[k]) for k in arrays)


def test_evaluate_matches_a_numpy_reference() -> None:
    data = blobs()
    arrays = init("logreg", data, seed=3)
    result = BACKEND.evaluate(spec("logreg"), arrays, data.x_test, data.y_test)
    logits = data.x_test.reshape(len(data.x_test), -1) @ arrays["head.weight"].T
    logits = logits.astype(np.float64) + arrays["head.bias"]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    expected_loss = -log_softmax[np.arange(len(data.y_test)), data.y_test].mean()
    assert result.num_examples == len(data.y_test)
    assert result.loss == pytest.approx(expected_loss, rel=1e-5)
    assert result.accuracy == pytest.approx(np.mean(logits.argmax(axis=1) == data.y_test))


def test_arrays_for_another_model_are_refused_with_the_reason() -> None:
    data = blobs()
    arrays = init("logreg", data)
    with pytest.raises(TrainingError, match=r"missing .*features"):
        BACKEND.train(spec("mlp"), arrays, data, settings())
    wrong = {**arrays, "head.bias": np.zeros(7, np.float32)}
    with pytest.raises(TrainingError, match=r"'head\.bias' has shape"):
        BACKEND.train(spec("logreg"), wrong, data, settings())


def test_labels_outside_the_classes_are_refused() -> None:
    data = blobs()
    bad = LocalData(data.x_train, data.y_train + 5, data.x_test, data.y_test, 3)
    with pytest.raises(TrainingError, match="labels span"):
        BACKEND.train(spec("logreg"), init("logreg", data), bad, settings())
