"""scikit-learn adapter: allow-listed estimators trained by `partial_fit`, one call a minibatch.

This module also holds the framework-neutral part of local training that the Keras adapter
shares: the seeded minibatch schedule with its straggler and deadline stops, the label and
array checks, and SCAFFOLD's corrections.

scikit-learn has no hook inside `partial_fit`'s update, so FedProx and SCAFFOLD are applied
in their decoupled form: after each `partial_fit` step, w ← w − η·μ·(w − w_global) and then
w ← w − η·(c − c_i). To first order in η this is the same step as the coupled
w ← w − η·(g + μ·(w − w_global) + c − c_i) that the gradient-tape adapters take.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from hivenode.models.training.backend import (
    Evaluation,
    LocalData,
    ModelSpec,
    NDArray,
    ScaffoldState,
    TrainingError,
    TrainOutcome,
    TrainSettings,
)

# --- shared with keras_backend ---------------------------------------------------------------


@dataclass(frozen=True)
class LocalWork:
    """What one round of local training really did, before the arrays are attached."""

    loss_sum: float
    epochs_completed: int
    examples_seen: int
    local_steps: int

    def outcome(self, arrays: dict[str, NDArray]) -> TrainOutcome:
        # No batch seen (the deadline had passed): there is no loss to report, as in torch.
        mean = self.loss_sum / self.examples_seen if self.examples_seen else math.nan
        return TrainOutcome(
            arrays, mean, self.epochs_completed, self.examples_seen, self.local_steps
        )


def checked_training(data: LocalData, settings: TrainSettings) -> NDArray:
    """The training labels as int64, once the settings and the data are known to fit, so
    that a bad round fails before a model is built."""
    _check_settings(settings)
    if len(data.y_train) == 0:
        raise TrainingError("the local training set is empty")
    return checked_labels(data.y_train, data.num_classes, len(data.x_train))


def _check_settings(settings: TrainSettings) -> None:
    problems = [
        f"{name} must be {rule}, got {value}"
        for name, value, ok, rule in (
            ("lr", settings.lr, settings.lr > 0, "> 0"),
            ("local_epochs", settings.local_epochs, settings.local_epochs >= 1, "≥ 1"),
            ("batch_size", settings.batch_size, settings.batch_size >= 1, "≥ 1"),
            ("proximal_mu", settings.proximal_mu, settings.proximal_mu >= 0, "≥ 0"),
            ("max_epochs", settings.max_epochs, (settings.max_epochs or 0) >= 0, "≥ 0"),
        )
        if not ok
    ]
    if problems:
        raise TrainingError("bad training settings: " + "; ".join(problems))


def run_minibatches(
    num_examples: int, settings: TrainSettings, step: Callable[[NDArray], float]
) -> LocalWork:
    """Call `step(indices)` once per minibatch, each epoch in a fresh order drawn from
    `settings.seed` (the torch adapter's order too), until `local_epochs` (or the
    straggler's `max_epochs`) are done or the deadline has passed. `step` takes one optimizer
    step on those examples and returns the summed cross-entropy of the batch it stepped from.
    `settings` are those `checked_training` accepted."""
    epochs = settings.local_epochs
    if settings.max_epochs is not None:  # a straggler
        epochs = min(epochs, settings.max_epochs)
    rng = np.random.default_rng(settings.seed)
    loss_sum, seen, steps, completed = 0.0, 0, 0, 0
    for _ in range(epochs):
        order = rng.permutation(num_examples)
        for start in range(0, num_examples, settings.batch_size):
            # Checked before each batch: training stops after the batch that crossed it.
            if settings.deadline is not None and time.monotonic() >= settings.deadline:
                return LocalWork(loss_sum, completed, seen, steps)
            batch = order[start : start + settings.batch_size]
            loss_sum += step(batch)
            seen += len(batch)
            steps += 1
        completed += 1
    return LocalWork(loss_sum, completed, seen, steps)


def checked_labels(y: NDArray, num_classes: int, num_examples: int) -> NDArray:
    """Integer labels in [0, num_classes), one per example, as int64: an out-of-range class
    fails here rather than as a NaN loss on a GPU."""
    labels = np.asarray(y)
    if labels.shape != (num_examples,):
        raise TrainingError(f"{num_examples} inputs but labels of shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise TrainingError(f"labels must be integer classes, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise TrainingError(
            f"labels span {labels.min()}..{labels.max()}, the model has {num_classes} classes"
        )
    return labels.astype(np.int64)


def check_arrays(given: Mapping[str, NDArray], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """`given` names exactly the model's arrays, each with the model's shape."""
    missing, extra = set(shapes) - set(given), set(given) - set(shapes)
    if missing or extra:
        raise TrainingError(
            "the arrays do not fit the model: "
            f"missing {sorted(missing) or 'none'}, unexpected {sorted(extra) or 'none'}"
        )
    for key, shape in shapes.items():
        if tuple(np.shape(given[key])) != tuple(shape):
            raise TrainingError(
                f"array {key!r} has shape {np.shape(given[key])}, the model needs {shape}"
            )


def scaffold_corrections(
    arrays: Mapping[str, NDArray], scaffold: ScaffoldState | None
) -> dict[str, NDArray] | None:
    """SCAFFOLD's c − c_i per array key (float64), matched to the arrays by position."""
    if scaffold is None:
        return None
    count = len(arrays)
    if len(scaffold.control) != count or len(scaffold.client_control) != count:
        raise TrainingError(
            f"SCAFFOLD state has {len(scaffold.control)} server and "
            f"{len(scaffold.client_control)} client control variates for {count} arrays"
        )
    corrections: dict[str, NDArray] = {}
    for (key, array), c, c_i in zip(
        arrays.items(), scaffold.control, scaffold.client_control, strict=True
    ):
        if np.shape(c) != np.shape(array) or np.shape(c_i) != np.shape(array):
            raise TrainingError(
                f"SCAFFOLD control variates for {key!r} have shapes {np.shape(c)} and "
                f"{np.shape(c_i)}, the array has {np.shape(array)}"
            )
        corrections[key] = np.asarray(c, np.float64) - np.asarray(c_i, np.float64)
    return corrections


def as_given(given: Mapping[str, NDArray], trained: Mapping[str, NDArray]) -> dict[str, NDArray]:
    """Trained arrays under the given keys, in the given order and dtypes."""
    return {
        key: np.array(trained[key], dtype=np.asarray(value).dtype) for key, value in given.items()
    }


def evaluation(loss_sum: float, correct: int, num_examples: int) -> Evaluation:
    if num_examples == 0:
        return Evaluation(0.0, 0.0, 0)
    return Evaluation(loss_sum / num_examples, correct / num_examples, num_examples)


# --- scikit-learn ------------------------------------------------------------------------------

_ALLOCATION_LR = 1e-300
"""The learning rate of the one step on an all-zero example that allocates an estimator's
arrays (scikit-learn allocates only inside `partial_fit`): it moves no weight by more than
about 1e-300, below float64 resolution of any weight the estimator draws, so the arrays are
its own initialisation (SGDClassifier's zero intercepts become ~1e-300, 0 in float32)."""

_PROBABILITY_FLOOR = float(np.finfo(np.float64).eps)
"""Probabilities are clipped here before the log, as `sklearn.metrics.log_loss` does."""


@dataclass(frozen=True)
class _Estimator:
    """An allow-listed estimator and how this adapter drives it.

    `fixed` are the parameters that make `partial_fit` plain minibatch SGD on cross-entropy;
    options may repeat them but not change them. `controlled` come from TrainSettings and are
    refused in options. `defaults` apply unless options set them.
    """

    module: str
    name: str
    fixed: Mapping[str, object]
    controlled: frozenset[str]
    defaults: Mapping[str, object]
    step_params: Callable[[float, int], dict[str, object]]
    """Parameters for a `partial_fit` call: (learning rate, examples in the batch)."""
    parameters: Callable[[Any], dict[str, NDArray]]
    """The fitted estimator's own arrays (not copies), in array order."""
    num_classes: Callable[[Mapping[str, NDArray]], int]

    def cls(self) -> Any:
        return getattr(importlib.import_module(self.module), self.name)


def _sgd_step(lr: float, batch: int) -> dict[str, object]:
    # SGDClassifier steps once per example, not once per call: `batch` steps of η/B move the
    # weights as one minibatch step of η on the mean gradient does (to first order), so η,
    # K_i and the decoupled corrections mean what they mean in the other adapters.
    return {"eta0": lr / batch}


def _mlp_step(lr: float, batch: int) -> dict[str, object]:
    # The solver captures learning_rate_init when it first allocates; batch_size = the batch
    # makes each partial_fit exactly one step on the mean gradient.
    return {"learning_rate_init": lr, "batch_size": batch}


def _sgd_parameters(estimator: Any) -> dict[str, NDArray]:
    return {"coef": estimator.coef_, "intercept": estimator.intercept_}


def _mlp_parameters(estimator: Any) -> dict[str, NDArray]:
    coefs = {f"coefs_{i}": w for i, w in enumerate(estimator.coefs_)}
    intercepts = {f"intercepts_{i}": b for i, b in enumerate(estimator.intercepts_)}
    return coefs | intercepts


def _classes_from_outputs(outputs: int) -> int:
    # Both estimators keep a single output row/unit for two classes (the positive class's
    # logit), and one per class from three classes on.
    return 2 if outputs == 1 else outputs


def _sgd_classes(arrays: Mapping[str, NDArray]) -> int:
    return _classes_from_outputs(int(np.shape(arrays["coef"])[0]))


def _mlp_classes(arrays: Mapping[str, NDArray]) -> int:
    layers = sum(1 for key in arrays if key.startswith("intercepts_"))
    return _classes_from_outputs(int(np.shape(arrays[f"intercepts_{layers - 1}"])[0]))


_ESTIMATORS = {
    "SGDClassifier": _Estimator(
        module="sklearn.linear_model",
        name="SGDClassifier",
        fixed={
            "loss": "log_loss",
            "learning_rate": "constant",
            "shuffle": False,
            "average": False,
            "early_stopping": False,
            "verbose": 0,
        },
        controlled=frozenset({"eta0", "random_state"}),
        defaults={"alpha": 0.0},
        step_params=_sgd_step,
        parameters=_sgd_parameters,
        num_classes=_sgd_classes,
    ),
    "MLPClassifier": _Estimator(
        module="sklearn.neural_network",
        name="MLPClassifier",
        fixed={
            "solver": "sgd",
            "learning_rate": "constant",
            "momentum": 0.0,
            "nesterovs_momentum": False,
            "shuffle": False,
            "early_stopping": False,
            "verbose": False,
        },
        controlled=frozenset({"learning_rate_init", "batch_size", "random_state"}),
        defaults={"alpha": 0.0},
        step_params=_mlp_step,
        parameters=_mlp_parameters,
        num_classes=_mlp_classes,
    ),
}
"""LogisticRegression is left out: it has no partial_fit, so no minibatch SGD."""


@contextmanager
def _sklearn_errors(what: str) -> Iterator[None]:
    """scikit-learn reports bad parameters and diverged weights as ValueError/TypeError."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise TrainingError(f"scikit-learn could not {what}: {exc}") from exc


def _entry(spec: ModelSpec) -> _Estimator:
    entry = _ESTIMATORS.get(spec.name)
    if entry is None:
        raise TrainingError(
            f"scikit-learn estimator {spec.name!r} is not allow-listed; "
            f"expected one of {', '.join(sorted(_ESTIMATORS))}"
        )
    known = set(entry.cls()().get_params())
    unknown = sorted(set(spec.options) - known)
    if unknown:
        raise TrainingError(f"{spec.name} has no parameters {unknown}")
    controlled = sorted(set(spec.options) & entry.controlled)
    if controlled:
        raise TrainingError(f"{spec.name}: {controlled} come from the training settings")
    for key, value in entry.fixed.items():
        if key in spec.options and spec.options[key] != value:
            raise TrainingError(
                f"{spec.name}: {key}={spec.options[key]!r} is not supported; "
                f"training needs {key}={value!r}"
            )
    return entry


def _allocated(
    spec: ModelSpec, entry: _Estimator, num_features: int, num_classes: int, lr: float, seed: int
) -> Any:
    """A fitted estimator of the right shapes: one `partial_fit` step on an all-zero example
    (the only public way scikit-learn allocates), taken at `lr`."""
    if num_classes < 2:
        raise TrainingError(f"a classifier needs at least 2 classes, got {num_classes}")
    params = {**entry.defaults, **spec.options, **entry.fixed, "random_state": seed}
    with _sklearn_errors(f"build {spec.name}"):
        estimator = entry.cls()(**params, **entry.step_params(lr, 1))
        estimator.partial_fit(
            np.zeros((1, num_features)), np.zeros(1, np.int64), classes=np.arange(num_classes)
        )
    return estimator


def _load(entry: _Estimator, estimator: Any, arrays: Mapping[str, NDArray]) -> None:
    live = entry.parameters(estimator)
    check_arrays(arrays, {key: value.shape for key, value in live.items()})
    for key, value in live.items():
        # In place: MLPClassifier's solver updates these very buffers.
        value[...] = arrays[key]


def _flat(x: NDArray) -> NDArray:
    return np.asarray(x, np.float64).reshape(len(x), -1)


def _summed_log_loss(probabilities: NDArray, labels: NDArray) -> float:
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, _PROBABILITY_FLOOR, 1.0)).sum())


class SklearnBackend:
    """SGDClassifier (one-vs-rest logistic regressions) and MLPClassifier by partial_fit.

    Arrays: SGDClassifier "coef" (classes × features) and "intercept" (classes), with one
    row for two classes, as scikit-learn keeps them; MLPClassifier "coefs_0".."coefs_{L-1}"
    then "intercepts_0".."intercepts_{L-1}", with one output unit for two classes. Inputs
    are flattened to (examples, features). Options are the estimator's constructor
    parameters; `alpha` (L2) defaults to 0 so that training is plain cross-entropy SGD.
    """

    def init_arrays(
        self, spec: ModelSpec, feature_shape: tuple[int, ...], num_classes: int, seed: int
    ) -> dict[str, NDArray]:
        """scikit-learn's own initialisation for `seed` (zeros for SGDClassifier, Glorot
        uniform for MLPClassifier), as float32 like every adapter's initial arrays."""
        entry = _entry(spec)
        features = int(np.prod(feature_shape))
        estimator = _allocated(spec, entry, features, num_classes, _ALLOCATION_LR, seed)
        parameters = entry.parameters(estimator).items()
        return {key: value.astype(np.float32) for key, value in parameters}

    def train(
        self,
        spec: ModelSpec,
        arrays: Mapping[str, NDArray],
        data: LocalData,
        settings: TrainSettings,
        scaffold: ScaffoldState | None = None,
    ) -> TrainOutcome:
        entry = _entry(spec)
        y = checked_training(data, settings)
        x = _flat(data.x_train)
        estimator = _allocated(
            spec, entry, x.shape[1], data.num_classes, settings.lr, settings.seed
        )
        _load(entry, estimator, arrays)
        anchors = {key: np.asarray(value, np.float64) for key, value in arrays.items()}
        corrections = scaffold_corrections(arrays, scaffold)
        lr, mu = settings.lr, settings.proximal_mu

        def step(batch: NDArray) -> float:
            x_batch, y_batch = x[batch], y[batch]
            loss = _summed_log_loss(estimator.predict_proba(x_batch), y_batch)
            estimator.set_params(**entry.step_params(lr, len(batch)))
            estimator.partial_fit(x_batch, y_batch)
            for key, weights in entry.parameters(estimator).items():
                if mu > 0:
                    weights -= lr * mu * (weights - anchors[key])
                if corrections is not None:
                    weights -= lr * corrections[key]
            return loss

        with _sklearn_errors(f"train {spec.name}"):
            work = run_minibatches(len(x), settings, step)
        return work.outcome(as_given(arrays, entry.parameters(estimator)))

    def evaluate(
        self, spec: ModelSpec, arrays: Mapping[str, NDArray], x: NDArray, y: NDArray
    ) -> Evaluation:
        entry = _entry(spec)
        features = _flat(x)
        try:
            num_classes = entry.num_classes(arrays)
        except (KeyError, IndexError) as exc:
            raise TrainingError(f"the arrays are not a {spec.name}'s: no {exc}") from exc
        labels = checked_labels(y, num_classes, len(features))
        if len(features) == 0:
            return evaluation(0.0, 0, 0)
        estimator = _allocated(spec, entry, features.shape[1], num_classes, _ALLOCATION_LR, seed=0)
        _load(entry, estimator, arrays)
        with _sklearn_errors(f"evaluate {spec.name}"):
            probabilities = estimator.predict_proba(features)
        correct = int((probabilities.argmax(axis=1) == labels).sum())
        return evaluation(_summed_log_loss(probabilities, labels), correct, len(labels))


BACKEND = SklearnBackend()
