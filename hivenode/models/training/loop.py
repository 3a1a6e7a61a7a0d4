"""The framework-neutral part of local training that every adapter shares.

The seeded minibatch schedule with its straggler and deadline stops, the checks of settings,
labels and arrays, SCAFFOLD's c − c_i, the given dtypes on the way out, and an evaluation
that an empty set drops out of. numpy and the standard library only: importing this module
loads no framework.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from hivenode.models.training.backend import (
    Evaluation,
    LocalData,
    NDArray,
    ScaffoldState,
    TrainingError,
    TrainOutcome,
    TrainSettings,
)

_LISTED_KEYS = 5
"""Array keys named in an error before the rest are only counted (a transformer has hundreds)."""


@dataclass
class LocalWork:
    """What one round of local training really did, counted as it goes."""

    loss_sum: float = 0.0
    """The summed cross-entropy of the batches stepped from."""
    epochs_completed: int = 0
    examples_seen: int = 0
    local_steps: int = 0

    def outcome(self, arrays: dict[str, NDArray]) -> TrainOutcome:
        # No batch seen (the deadline had passed): there is no loss to report.
        mean = self.loss_sum / self.examples_seen if self.examples_seen else math.nan
        return TrainOutcome(
            arrays, mean, self.epochs_completed, self.examples_seen, self.local_steps
        )


def check_settings(settings: TrainSettings) -> None:
    """Every setting in its range, or one TrainingError that lists all that are not."""
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


def checked_training(data: LocalData, settings: TrainSettings) -> NDArray:
    """The training labels as int64, once the settings and the data are known to fit, so
    that a bad round fails before a model is built."""
    check_settings(settings)
    if len(data.y_train) == 0:
        raise TrainingError("the local training set is empty")
    return checked_labels(data.y_train, data.num_classes, len(data.x_train))


def checked_labels(y: NDArray, num_classes: int, num_examples: int) -> NDArray:
    """Integer labels in [0, num_classes), one per example, as int64: an out-of-range class
    fails here rather than as a NaN loss, or an unrecoverable device assert, on a GPU."""
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


def minibatches(num_examples: int, settings: TrainSettings, work: LocalWork) -> Iterator[NDArray]:
    """The indices of each minibatch, each epoch in a fresh order drawn from `settings.seed`
    alone (so a round replays exactly), until `local_epochs` (or the straggler's
    `max_epochs`) are done or the deadline has passed.

    A batch is counted in `work` (steps, examples, epochs) when the caller asks for the next
    one, that is once it has stepped from it; the loss is the caller's to add. `settings` are
    those `checked_training` accepted.
    """
    epochs = settings.local_epochs
    if settings.max_epochs is not None:  # a straggler
        epochs = min(epochs, settings.max_epochs)
    rng = np.random.default_rng(settings.seed)
    for _ in range(epochs):
        order = rng.permutation(num_examples)
        for start in range(0, num_examples, settings.batch_size):
            # Checked before each batch: training stops after the batch that crossed it.
            if settings.deadline is not None and time.monotonic() >= settings.deadline:
                return
            batch = order[start : start + settings.batch_size]
            yield batch
            work.examples_seen += len(batch)
            work.local_steps += 1
        work.epochs_completed += 1


def run_minibatches(
    num_examples: int, settings: TrainSettings, step: Callable[[NDArray], float]
) -> LocalWork:
    """Call `step(indices)` once per minibatch of `minibatches`. `step` takes one optimizer
    step on those examples and returns the summed cross-entropy of the batch it stepped from."""
    work = LocalWork()
    for batch in minibatches(num_examples, settings, work):
        work.loss_sum += step(batch)
    return work


def check_arrays(given: Mapping[str, NDArray], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """`given` names exactly the model's arrays, each with the model's shape."""
    missing, extra = set(shapes) - set(given), set(given) - set(shapes)
    if missing or extra:
        raise TrainingError(
            "the arrays do not fit the model: "
            f"missing {_listing(missing)}, unexpected {_listing(extra)}"
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
    """Trained arrays under the given keys, in the given order and dtypes (always copies)."""
    return {
        key: np.array(trained[key], dtype=np.asarray(value).dtype) for key, value in given.items()
    }


def evaluation(loss_sum: float, correct: int, num_examples: int) -> Evaluation:
    """Mean loss and accuracy; an empty set scores 0 with weight 0, so it drops out of
    weighted means."""
    if num_examples == 0:
        return Evaluation(0.0, 0.0, 0)
    return Evaluation(loss_sum / num_examples, correct / num_examples, num_examples)


def _listing(keys: set[str]) -> str:
    if not keys:
        return "none"
    ordered = sorted(keys)
    shown = ", ".join(repr(key) for key in ordered[:_LISTED_KEYS])
    more = f" and {len(ordered) - _LISTED_KEYS} more" if len(ordered) > _LISTED_KEYS else ""
    return f"[{shown}{more}]"
