"""scikit-learn adapter: allow-listed estimators trained by `partial_fit`, one call a minibatch.

scikit-learn has no hook inside `partial_fit`'s update, so FedProx and SCAFFOLD are applied
in their decoupled form: after each `partial_fit` step, w ← w − η·μ·(w − w_global) and then
w ← w − η·(c − c_i). To first order in η this is the same step as the coupled
w ← w − η·(g + μ·(w − w_global) + c − c_i) that the gradient-tape adapters take.
"""

from __future__ import annotations

import importlib
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
from hivenode.models.training.loop import (
    as_given,
    check_arrays,
    checked_labels,
    checked_training,
    evaluation,
    run_minibatches,
    scaffold_corrections,
)

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
