"""The scikit-learn adapter against the training contract, on a small separable 3-class set."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from hivenode.models.training.backend import (
    LocalData,
    ModelSpec,
    NDArray,
    ScaffoldState,
    TrainingError,
    TrainSettings,
    backend_for,
)

BACKEND = backend_for("sklearn")
SGD = ModelSpec("sklearn", "SGDClassifier")
MLP = ModelSpec("sklearn", "MLPClassifier", {"hidden_layer_sizes": [16]})
SPECS = pytest.mark.parametrize("spec", [SGD, MLP], ids=["sgd", "mlp"])
SETTINGS = TrainSettings(lr=0.1, local_epochs=3, batch_size=16, seed=1)


def blobs(num_classes: int = 3, examples: int = 200, seed: int = 0) -> LocalData:
    """Gaussian blobs around well-separated centres: linearly separable with margin."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 4.0, (num_classes, 2, 3))
    labels = rng.integers(0, num_classes, examples)
    features = (centres[labels] + rng.normal(0.0, 1.0, (examples, 2, 3))).astype(np.float32)
    split = examples * 4 // 5
    return LocalData(
        features[:split], labels[:split], features[split:], labels[split:], num_classes
    )


DATA = blobs()


def initial(spec: ModelSpec, data: LocalData = DATA) -> dict[str, NDArray]:
    return BACKEND.init_arrays(spec, data.feature_shape, data.num_classes, seed=0)


def distance(a: dict[str, NDArray], b: dict[str, NDArray]) -> float:
    return float(sum(np.sum((a[key].astype(np.float64) - b[key]) ** 2) for key in a) ** 0.5)


@SPECS
def test_loss_falls_over_a_few_epochs(spec: ModelSpec) -> None:
    start = initial(spec)
    trained = BACKEND.train(spec, start, DATA, TrainSettings(lr=0.1, local_epochs=5, batch_size=16))
    before = BACKEND.evaluate(spec, start, DATA.x_test, DATA.y_test)
    after = BACKEND.evaluate(spec, trained.arrays, DATA.x_test, DATA.y_test)
    assert after.loss < before.loss / 3
    assert after.accuracy >= 0.95
    assert after.num_examples == len(DATA.y_test)
    again = BACKEND.train(spec, trained.arrays, DATA, SETTINGS)
    assert again.train_loss < trained.train_loss


@SPECS
def test_training_is_deterministic_for_a_seed(spec: ModelSpec) -> None:
    first = BACKEND.train(spec, initial(spec), DATA, SETTINGS)
    second = BACKEND.train(spec, initial(spec), DATA, SETTINGS)
    other = BACKEND.train(
        spec, initial(spec), DATA, TrainSettings(lr=0.1, local_epochs=3, batch_size=16, seed=2)
    )
    assert first.train_loss == second.train_loss
    assert all(np.array_equal(first.arrays[k], second.arrays[k]) for k in first.arrays)
    assert any(not np.array_equal(first.arrays[k], other.arrays[k]) for k in first.arrays)


@SPECS
def test_arrays_keep_keys_order_and_dtypes(spec: ModelSpec) -> None:
    start = initial(spec)
    mixed = {
        key: value.astype(np.float64 if i % 2 else np.float32)
        for i, (key, value) in enumerate(start.items())
    }
    outcome = BACKEND.train(spec, mixed, DATA, SETTINGS)
    assert list(outcome.arrays) == list(mixed)
    assert [v.dtype for v in outcome.arrays.values()] == [v.dtype for v in mixed.values()]


@SPECS
def test_zero_epochs_round_trip_the_arrays(spec: ModelSpec) -> None:
    start = initial(spec)
    outcome = BACKEND.train(
        spec, start, DATA, TrainSettings(lr=0.1, local_epochs=3, batch_size=16, max_epochs=0)
    )
    assert (outcome.local_steps, outcome.examples_seen, outcome.epochs_completed) == (0, 0, 0)
    assert math.isnan(outcome.train_loss)  # no batch, no loss, as in the torch adapter
    assert all(np.array_equal(start[key], outcome.arrays[key]) for key in start)
    assert BACKEND.evaluate(spec, outcome.arrays, DATA.x_test, DATA.y_test) == BACKEND.evaluate(
        spec, start, DATA.x_test, DATA.y_test
    )


def test_evaluate_matches_an_independent_log_loss() -> None:
    arrays = BACKEND.train(SGD, initial(SGD), DATA, SETTINGS).arrays
    logits = DATA.x_test.reshape(len(DATA.x_test), -1) @ arrays["coef"].T + arrays["intercept"]
    # SGDClassifier: one-vs-rest logistic regressions, normalised to sum to one
    ovr = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    probabilities = ovr / ovr.sum(axis=1, keepdims=True)
    expected = -np.mean(np.log(probabilities[np.arange(len(DATA.y_test)), DATA.y_test]))
    result = BACKEND.evaluate(SGD, arrays, DATA.x_test, DATA.y_test)
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.accuracy == np.mean(probabilities.argmax(axis=1) == DATA.y_test)


@SPECS
def test_huge_mu_keeps_weights_near_global(spec: ModelSpec) -> None:
    start = initial(spec)
    free = BACKEND.train(spec, start, DATA, SETTINGS)
    held = BACKEND.train(
        spec,
        start,
        DATA,
        TrainSettings(lr=0.1, local_epochs=3, batch_size=16, seed=1, proximal_mu=10.0),
    )
    assert distance(held.arrays, start) < 0.05 * distance(free.arrays, start)


def test_proximal_step_is_the_decoupled_form() -> None:
    """One full batch: w ← w' − η·μ·(w' − w_global), w' the plain step's result."""
    start = initial(MLP)
    one_step = TrainSettings(lr=0.1, local_epochs=1, batch_size=len(DATA.y_train))
    plain = BACKEND.train(MLP, start, DATA, one_step).arrays
    mu = 2.0
    prox = BACKEND.train(
        MLP,
        start,
        DATA,
        TrainSettings(lr=0.1, local_epochs=1, batch_size=len(DATA.y_train), proximal_mu=mu),
    ).arrays
    for key, value in plain.items():
        expected = value - 0.1 * mu * (value.astype(np.float64) - start[key])
        np.testing.assert_allclose(prox[key], expected, rtol=1e-6, atol=1e-7)


@SPECS
def test_scaffold_with_zero_controls_equals_plain_training(spec: ModelSpec) -> None:
    start = initial(spec)
    zeros = [np.zeros_like(value) for value in start.values()]
    plain = BACKEND.train(spec, start, DATA, SETTINGS)
    corrected = BACKEND.train(spec, start, DATA, SETTINGS, ScaffoldState(zeros, zeros))
    assert all(np.array_equal(plain.arrays[k], corrected.arrays[k]) for k in start)
    assert plain.train_loss == corrected.train_loss


@SPECS
def test_scaffold_shifts_each_step_by_the_control_difference(spec: ModelSpec) -> None:
    start = initial(spec)
    one_step = TrainSettings(lr=0.1, local_epochs=1, batch_size=len(DATA.y_train))
    plain = BACKEND.train(spec, start, DATA, one_step)
    control = [np.full_like(value, 0.5) for value in start.values()]
    client = [np.full_like(value, 0.2) for value in start.values()]
    corrected = BACKEND.train(spec, start, DATA, one_step, ScaffoldState(control, client))
    assert corrected.local_steps == 1
    for key in start:
        np.testing.assert_allclose(
            corrected.arrays[key], plain.arrays[key] - 0.1 * (0.5 - 0.2), rtol=1e-6, atol=1e-6
        )


def test_scaffold_state_must_match_the_arrays() -> None:
    start = initial(SGD)
    with pytest.raises(TrainingError, match="control variates"):
        BACKEND.train(SGD, start, DATA, SETTINGS, ScaffoldState([np.zeros(1)], [np.zeros(1)]))


@SPECS
def test_straggler_stops_after_max_epochs(spec: ModelSpec) -> None:
    settings = TrainSettings(lr=0.1, local_epochs=5, batch_size=16, max_epochs=2)
    outcome = BACKEND.train(spec, initial(spec), DATA, settings)
    examples = len(DATA.y_train)
    assert outcome.epochs_completed == 2
    assert outcome.examples_seen == 2 * examples
    assert outcome.local_steps == 2 * -(-examples // 16)


@SPECS
def test_past_deadline_takes_at_most_one_step(spec: ModelSpec) -> None:
    settings = TrainSettings(lr=0.1, local_epochs=5, batch_size=16, deadline=time.monotonic() - 1)
    outcome = BACKEND.train(spec, initial(spec), DATA, settings)
    assert outcome.local_steps <= 1
    assert outcome.examples_seen == 16 * outcome.local_steps
    assert outcome.epochs_completed == 0


@pytest.mark.parametrize(
    ("spec", "shapes"),
    [
        (SGD, {"coef": (1, 6), "intercept": (1,)}),
        (
            MLP,
            {"coefs_0": (6, 16), "coefs_1": (16, 1), "intercepts_0": (16,), "intercepts_1": (1,)},
        ),
    ],
    ids=["sgd", "mlp"],
)
def test_two_classes_keep_one_output_row(
    spec: ModelSpec, shapes: dict[str, tuple[int, ...]]
) -> None:
    """scikit-learn's own binary layout: one logit for the positive class."""
    data = blobs(num_classes=2)
    outcome = BACKEND.train(spec, initial(spec, data), data, SETTINGS)
    assert {key: value.shape for key, value in outcome.arrays.items()} == shapes
    result = BACKEND.evaluate(spec, outcome.arrays, data.x_test, data.y_test)
    assert result.accuracy >= 0.95


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ModelSpec("sklearn", "RandomForestClassifier"), "not allow-listed"),
        (ModelSpec("sklearn", "LogisticRegression"), "not allow-listed"),
        (ModelSpec("sklearn", "SGDClassifier", {"no_such_option": 1}), "no parameters"),
        (ModelSpec("sklearn", "SGDClassifier", {"loss": "hinge"}), "log_loss"),
        (ModelSpec("sklearn", "SGDClassifier", {"eta0": 0.5}), "training settings"),
        (ModelSpec("sklearn", "MLPClassifier", {"solver": "adam"}), "sgd"),
        (ModelSpec("sklearn", "MLPClassifier", {"hidden_layer_sizes": [-3]}), "could not build"),
    ],
)
def test_refuses_specs_it_cannot_train(spec: ModelSpec, message: str) -> None:
    with pytest.raises(TrainingError, match=message):
        BACKEND.init_arrays(spec, DATA.feature_shape, DATA.num_classes, seed=0)


def test_refuses_bad_settings() -> None:
    settings = TrainSettings(lr=0.0, local_epochs=0, batch_size=16)
    with pytest.raises(TrainingError, match=r"lr must be > 0, got 0\.0; local_epochs must be ≥ 1"):
        BACKEND.train(SGD, initial(SGD), DATA, settings)


def test_refuses_labels_outside_the_classes() -> None:
    bad = LocalData(DATA.x_train, DATA.y_train + 1, DATA.x_test, DATA.y_test, 3)
    with pytest.raises(TrainingError, match="labels"):
        BACKEND.train(SGD, initial(SGD), bad, SETTINGS)


def test_refuses_arrays_of_another_shape() -> None:
    arrays = initial(SGD)
    arrays["coef"] = arrays["coef"][:, :2]
    with pytest.raises(TrainingError, match="shape"):
        BACKEND.train(SGD, arrays, DATA, SETTINGS)
