"""SCAFFOLD's trainer-side math (Karimireddy et al., ICML 2020) as pure numpy functions.

A model is a list of tensors; every function returns new arrays and changes none of its inputs.
Notation as in the paper: x the global model and c the server control variate (both sent by
the aggregator), y the trainer's local model, c_i its own control variate, η_l the local
learning rate, K_i the number of local steps this trainer really took.

Persisting c_i across rounds and restarts (in the trainer's state dir) is the trainer role's
job, not this module's: a trainer starts from c_i = 0 and keeps the `new_control` returned
by `local_train` / `control_update` for its next round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from hivenode.models.training.backend import NDArray, TrainingError

Model = Sequence[NDArray]
GradientFn = Callable[[list[NDArray]], list[NDArray]]


@dataclass(frozen=True)
class LocalResult:
    """What a trainer reports after its local steps, and the c_i it keeps.

    `delta_y` = y_i − x and `delta_c` = c_i⁺ − c_i go to the aggregator; `new_control` (c_i⁺)
    stays with the trainer; `local_steps` is K_i.
    """

    delta_y: list[NDArray]
    delta_c: list[NDArray]
    new_control: list[NDArray]
    local_steps: int


def corrected_step(
    y: Model, gradient: Model, control: Model, client_control: Model, local_lr: float
) -> list[NDArray]:
    """One corrected local step: y ← y − η_l·(g(y) + c − c_i)."""
    _check_same_shapes(y, gradient, control, client_control)
    return [
        yt - local_lr * (gt + ct - cit)
        for yt, gt, ct, cit in zip(y, gradient, control, client_control, strict=True)
    ]


def control_update(
    client_control: Model,
    control: Model,
    x: Model,
    y: Model,
    local_steps: int,
    local_lr: float,
) -> list[NDArray]:
    """Option II of the paper: c_i⁺ = c_i − c + (x − y_i) / (K_i·η_l).

    `local_steps` is K_i, the number of steps this trainer really took (fewer than asked for
    when it stopped at a deadline); it must be ≥ 1, and `local_lr` > 0.
    """
    if local_steps < 1:
        raise TrainingError(f"local_steps must be ≥ 1, got {local_steps}")
    if not local_lr > 0.0:
        raise TrainingError(f"local_lr must be > 0, got {local_lr}")
    _check_same_shapes(client_control, control, x, y)
    scale = 1.0 / (local_steps * local_lr)
    return [
        cit - ct + (xt - yt) * scale
        for cit, ct, xt, yt in zip(client_control, control, x, y, strict=True)
    ]


def local_train(
    x: Model,
    control: Model,
    client_control: Model,
    gradient_fn: GradientFn,
    local_steps: int,
    local_lr: float,
) -> LocalResult:
    """`local_steps` corrected steps from x, then the option II control update.

    `gradient_fn(y)` returns the (stochastic) gradient of the trainer's loss at y. With
    c = c_i = 0 this is plain local SGD, i.e. a FedAvg trainer.
    """
    y = [np.array(t, copy=True) for t in x]
    for _ in range(local_steps):
        y = corrected_step(y, gradient_fn(y), control, client_control, local_lr)
    new_control = control_update(client_control, control, x, y, local_steps, local_lr)
    return LocalResult(
        delta_y=[yt - xt for yt, xt in zip(y, x, strict=True)],
        delta_c=[n - o for n, o in zip(new_control, client_control, strict=True)],
        new_control=new_control,
        local_steps=local_steps,
    )


def zeros_like(model: Model) -> list[NDArray]:
    """A zero control variate shaped like `model` (how c and every c_i start)."""
    return [np.zeros_like(t) for t in model]


def _check_same_shapes(first: Model, *others: Model) -> None:
    shapes = [np.shape(t) for t in first]
    for other in others:
        got = [np.shape(t) for t in other]
        if got != shapes:
            raise TrainingError(f"tensor shapes {got} do not match {shapes}")
