"""A torch model and its optimizer as flat float32 vectors and named numpy arrays.

The all-reduce moves one flat vector per step; a joiner downloads named arrays. Both views
follow `model.parameters()` order, which is the same on every replica built from one recipe.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from hivenode.models.training.zoo import build_model
from hivenode.parallel.errors import ParallelError
from hivenode.protocol.compression import Vector

MOMENTUM_PREFIX = "optimizer.momentum."


@dataclass(frozen=True)
class ModelRecipe:
    """A zoo model every peer builds alike: same name, options, shapes and seed."""

    name: str = "mlp"
    options: Mapping[str, Any] = field(default_factory=dict)
    feature_shape: tuple[int, ...] = (64,)
    num_classes: int = 10
    seed: int = 0

    def build(self) -> nn.Sequential:
        return build_model(
            self.name, dict(self.options), self.feature_shape, self.num_classes, seed=self.seed
        )


@dataclass(frozen=True)
class SgdConfig:
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0

    def optimizer(self, params: Sequence[nn.Parameter]) -> torch.optim.SGD:
        return torch.optim.SGD(
            params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flat_gradients(params: Sequence[nn.Parameter]) -> Vector:
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat: Vector = torch.cat([g.reshape(-1) for g in grads]).numpy()
    return flat


def set_gradients(params: Sequence[nn.Parameter], flat: Vector) -> None:
    values = torch.from_numpy(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = values[offset : offset + n].view_as(p).clone()
        offset += n
    if offset != values.numel():
        raise ParallelError(f"{values.numel()} gradient values for {offset} parameters")


def digest(params: Sequence[nn.Parameter]) -> str:
    """16 hex digits of the parameters' bytes: replicas in step agree on it bit for bit."""
    hasher = hashlib.blake2b(digest_size=8)
    for p in params:
        hasher.update(p.detach().contiguous().numpy().tobytes())
    return hasher.hexdigest()


def state_arrays(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, np.ndarray[Any, Any]]:
    """Copies of the weights, buffers and momentum buffers, by name."""
    arrays = {name: t.detach().cpu().numpy().copy() for name, t in model.state_dict().items()}
    names = {id(p): name for name, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            buffer = optimizer.state.get(p, {}).get("momentum_buffer")
            if buffer is not None:
                arrays[MOMENTUM_PREFIX + names[id(p)]] = buffer.detach().cpu().numpy().copy()
    return arrays


def load_state_arrays(
    model: nn.Module, optimizer: torch.optim.Optimizer, arrays: Mapping[str, np.ndarray[Any, Any]]
) -> None:
    """The inverse of `state_arrays`; a name or shape that does not fit is a ParallelError."""
    weights = {k: v for k, v in arrays.items() if not k.startswith(MOMENTUM_PREFIX)}
    expected = model.state_dict()
    if set(weights) != set(expected):
        raise ParallelError(
            f"state names differ from the model's: {sorted(set(weights) ^ set(expected))[:5]}"
        )
    for name, tensor in expected.items():
        if tuple(weights[name].shape) != tuple(tensor.shape):
            raise ParallelError(f"{name} has shape {weights[name].shape}, not {tensor.shape}")
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    params = dict(model.named_parameters())
    for key, value in arrays.items():
        if key.startswith(MOMENTUM_PREFIX):
            name = key[len(MOMENTUM_PREFIX) :]
            if name not in params or tuple(value.shape) != tuple(params[name].shape):
                raise ParallelError(f"momentum for {name!r} does not fit the model")
            optimizer.state[params[name]]["momentum_buffer"] = torch.from_numpy(np.array(value))


def max_param_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """The largest absolute difference between same-named tensors."""
    if set(a) != set(b):
        raise ParallelError("the models have different parameter names")
    if not a:
        return 0.0
    return max(float((a[k].detach() - b[k].detach()).abs().max()) for k in a)
