"""The Keras adapter against the training contract, on a small separable 3-class set.

One module, so that TensorFlow is imported once.
"""

from __future__ import annotations

import json
import os
import random
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
from hivenode.models.training.keras_backend import keras_spec

os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # as the adapter sets it, before keras loads
keras = pytest.importorskip("keras")

BACKEND = backend_for("keras")
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


def mlp(output: str = "linear", classes: int = 3) -> ModelSpec:
    """Flatten → Dense(16, relu) → Dropout → Dense(classes), logits or probabilities."""
    model = keras.Sequential(
        [
            keras.Input(DATA.feature_shape),
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(classes, activation=output, name="output"),
        ]
    )
    return keras_spec(model)


def softmax_regression() -> ModelSpec:
    """A single linear layer of logits, whose gradient a test can write down by hand."""
    model = keras.Sequential(
        [
            keras.Input(DATA.feature_shape),
            keras.layers.Flatten(),
            keras.layers.Dense(3, name="linear"),
        ]
    )
    return keras_spec(model)


def functional_with_softmax_layer() -> ModelSpec:
    """The functional API, probabilities from a separate Softmax layer."""
    inputs = keras.Input(DATA.feature_shape)
    hidden = keras.layers.Dense(16, activation="relu")(keras.layers.Flatten()(inputs))
    outputs = keras.layers.Softmax()(keras.layers.Dense(3)(hidden))
    return keras_spec(keras.Model(inputs, outputs))


LOGITS, PROBABILITIES = mlp("linear"), mlp("softmax")


def initial(spec: ModelSpec = LOGITS) -> dict[str, NDArray]:
    return BACKEND.init_arrays(spec, DATA.feature_shape, DATA.num_classes, seed=0)


def distance(a: dict[str, NDArray], b: dict[str, NDArray]) -> float:
    return float(sum(np.sum((a[key].astype(np.float64) - b[key]) ** 2) for key in a) ** 0.5)


@pytest.mark.parametrize(
    "spec",
    [LOGITS, PROBABILITIES, functional_with_softmax_layer()],
    ids=["logits", "softmax", "functional"],
)
def test_loss_falls_over_a_few_epochs(spec: ModelSpec) -> None:
    start = initial(spec)
    trained = BACKEND.train(spec, start, DATA, SETTINGS)
    before = BACKEND.evaluate(spec, start, DATA.x_test, DATA.y_test)
    after = BACKEND.evaluate(spec, trained.arrays, DATA.x_test, DATA.y_test)
    assert after.loss < before.loss / 3
    assert after.accuracy >= 0.95
    again = BACKEND.train(spec, trained.arrays, DATA, SETTINGS)
    assert again.train_loss < trained.train_loss


@pytest.mark.parametrize(
    ("spec", "from_logits"),
    [(LOGITS, True), (PROBABILITIES, False), (functional_with_softmax_layer(), False)],
    ids=["logits", "softmax", "functional"],
)
def test_evaluate_agrees_with_keras_itself(spec: ModelSpec, from_logits: bool) -> None:
    """Also catches a logits layer read as probabilities (Keras itself spots the reverse)."""
    arrays = initial(spec)
    model = keras.models.model_from_json(json.dumps(spec.options["config"]))
    model.set_weights(list(arrays.values()))
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
        metrics=["accuracy"],
    )
    loss, accuracy = model.evaluate(DATA.x_test, DATA.y_test, verbose=0)
    result = BACKEND.evaluate(spec, arrays, DATA.x_test, DATA.y_test)
    assert result.loss == pytest.approx(loss, rel=1e-5)
    assert result.accuracy == pytest.approx(accuracy)
    assert result.num_examples == len(DATA.y_test)


def test_initial_arrays_are_deterministic_for_a_seed() -> None:
    first, second = initial(), initial()
    other = BACKEND.init_arrays(LOGITS, DATA.feature_shape, DATA.num_classes, seed=1)
    assert list(first) == ["hidden/kernel", "hidden/bias", "output/kernel", "output/bias"]
    assert all(np.array_equal(first[key], second[key]) for key in first)
    assert not np.array_equal(first["hidden/kernel"], other["hidden/kernel"])


def test_training_is_deterministic_for_a_seed() -> None:
    """With dropout, so the seed must fix its masks too."""
    first = BACKEND.train(LOGITS, initial(), DATA, SETTINGS)
    second = BACKEND.train(LOGITS, initial(), DATA, SETTINGS)
    other = BACKEND.train(
        LOGITS, initial(), DATA, TrainSettings(lr=0.1, local_epochs=3, batch_size=16, seed=2)
    )
    assert first.train_loss == second.train_loss
    assert all(np.array_equal(first.arrays[k], second.arrays[k]) for k in first.arrays)
    assert any(not np.array_equal(first.arrays[k], other.arrays[k]) for k in first.arrays)


def test_training_leaves_the_global_random_generators_alone() -> None:
    random.seed(7)
    np.random.seed(7)
    expected = (random.random(), np.random.random())
    random.seed(7)
    np.random.seed(7)
    BACKEND.train(LOGITS, initial(), DATA, SETTINGS)
    assert (random.random(), np.random.random()) == expected


def test_arrays_keep_keys_order_and_dtypes() -> None:
    start = initial()
    given = dict(reversed([(k, v.astype(np.float64)) for k, v in start.items()]))
    outcome = BACKEND.train(LOGITS, given, DATA, SETTINGS)
    assert list(outcome.arrays) == list(given)
    assert all(value.dtype == np.float64 for value in outcome.arrays.values())


def test_zero_epochs_round_trip_the_arrays() -> None:
    start = initial()
    outcome = BACKEND.train(
        LOGITS, start, DATA, TrainSettings(lr=0.1, local_epochs=3, batch_size=16, max_epochs=0)
    )
    assert (outcome.local_steps, outcome.examples_seen, outcome.epochs_completed) == (0, 0, 0)
    assert all(np.array_equal(start[key], outcome.arrays[key]) for key in start)


def test_one_step_is_sgd_with_the_proximal_term_and_scaffold_correction() -> None:
    """w ← w − η·(∇CE + μ·(w − w_global) + c − c_i), checked against a numpy gradient."""
    spec = softmax_regression()
    start = BACKEND.init_arrays(spec, DATA.feature_shape, 3, seed=0)
    kernel, bias = (start[key].astype(np.float64) for key in ("linear/kernel", "linear/bias"))
    lr, mu, batch = 0.1, 0.5, len(DATA.y_train)
    control = [np.full_like(value, 0.3) for value in start.values()]
    client = [np.full_like(value, 0.1) for value in start.values()]
    settings = TrainSettings(lr=lr, local_epochs=1, batch_size=batch, proximal_mu=mu)
    outcome = BACKEND.train(spec, start, DATA, settings, ScaffoldState(control, client))

    x = DATA.x_train.reshape(batch, -1).astype(np.float64)
    logits = x @ kernel + bias
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    error = probabilities - np.eye(3)[DATA.y_train]
    # w_global is the starting point, so the proximal gradient vanishes on the first step
    expected_kernel = kernel - lr * (x.T @ error / batch + 0.2)
    expected_bias = bias - lr * (error.mean(axis=0) + 0.2)
    np.testing.assert_allclose(outcome.arrays["linear/kernel"], expected_kernel, atol=1e-5)
    np.testing.assert_allclose(outcome.arrays["linear/bias"], expected_bias, atol=1e-5)
    assert outcome.train_loss == pytest.approx(
        -np.mean(np.log(probabilities[np.arange(batch), DATA.y_train])), rel=1e-5
    )
    assert outcome.local_steps == 1


def test_huge_mu_keeps_weights_near_global() -> None:
    """η·μ = 1: each step lands at w_global − η·∇CE, however long training runs."""
    start = initial()
    free = BACKEND.train(LOGITS, start, DATA, TrainSettings(lr=0.1, local_epochs=5, batch_size=16))
    held = BACKEND.train(
        LOGITS, start, DATA, TrainSettings(lr=0.1, local_epochs=5, batch_size=16, proximal_mu=10.0)
    )
    assert distance(held.arrays, start) < 0.3 * distance(free.arrays, start)


def test_scaffold_with_zero_controls_equals_plain_training() -> None:
    start = initial()
    zeros = [np.zeros_like(value) for value in start.values()]
    plain = BACKEND.train(LOGITS, start, DATA, SETTINGS)
    corrected = BACKEND.train(LOGITS, start, DATA, SETTINGS, ScaffoldState(zeros, zeros))
    assert all(np.array_equal(plain.arrays[k], corrected.arrays[k]) for k in start)
    assert plain.train_loss == corrected.train_loss


def test_straggler_stops_after_max_epochs() -> None:
    settings = TrainSettings(lr=0.1, local_epochs=5, batch_size=16, max_epochs=2)
    outcome = BACKEND.train(LOGITS, initial(), DATA, settings)
    examples = len(DATA.y_train)
    assert outcome.epochs_completed == 2
    assert outcome.examples_seen == 2 * examples
    assert outcome.local_steps == 2 * -(-examples // 16)


def test_past_deadline_takes_at_most_one_step() -> None:
    settings = TrainSettings(lr=0.1, local_epochs=5, batch_size=16, deadline=time.monotonic() - 1)
    outcome = BACKEND.train(LOGITS, initial(), DATA, settings)
    assert outcome.local_steps <= 1
    assert outcome.examples_seen == 16 * outcome.local_steps
    assert outcome.epochs_completed == 0


def test_nested_models_get_unique_array_keys() -> None:
    """A nested model rebuilt from JSON loses its prefix: two weights share a path."""
    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(6, name="d")], name="inner")
    outer = keras.Sequential(
        [
            keras.Input(DATA.feature_shape),
            keras.layers.Flatten(),
            inner,
            keras.layers.Dense(3, name="d"),
        ]
    )
    spec = keras_spec(outer)
    start = BACKEND.init_arrays(spec, DATA.feature_shape, 3, seed=0)
    assert list(start) == ["d/kernel", "d/bias", "d/kernel#2", "d/bias#2"]
    assert start["d/kernel#2"].shape == (6, 3)
    outcome = BACKEND.train(spec, start, DATA, SETTINGS)
    assert {k: v.shape for k, v in outcome.arrays.items()} == {k: v.shape for k, v in start.items()}


LAMBDA = keras_spec(
    keras.Sequential(
        [
            keras.Input(DATA.feature_shape),
            keras.layers.Lambda(lambda x: x * 2.0),
            keras.layers.Dense(3),
        ]
    )
)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (LAMBDA, "Lambda"),
        (mlp(classes=4), "4 units for 3 classes"),
        (mlp("sigmoid"), "output activation"),
        (ModelSpec("keras", "resnet"), "name 'json'"),
        (ModelSpec("keras", "json", {"config": {"class_name": "Sequential"}}), "no layers"),
    ],
    ids=["lambda", "classes", "sigmoid", "name", "empty"],
)
def test_refuses_models_it_cannot_train(spec: ModelSpec, message: str) -> None:
    with pytest.raises(TrainingError, match=message):
        BACKEND.init_arrays(spec, DATA.feature_shape, DATA.num_classes, seed=0)


def test_refuses_labels_outside_the_classes() -> None:
    bad = LocalData(DATA.x_train, DATA.y_train + 1, DATA.x_test, DATA.y_test, 3)
    with pytest.raises(TrainingError, match="labels"):
        BACKEND.train(LOGITS, initial(), bad, SETTINGS)


def test_refuses_arrays_of_another_model() -> None:
    arrays = initial()
    arrays["hidden/kernel"] = arrays["hidden/kernel"][:, :4]
    with pytest.raises(TrainingError, match="shape"):
        BACKEND.train(LOGITS, arrays, DATA, SETTINGS)
    del arrays["hidden/kernel"]
    with pytest.raises(TrainingError, match="missing"):
        BACKEND.evaluate(LOGITS, arrays, DATA.x_test, DATA.y_test)
