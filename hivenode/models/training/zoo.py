"""The built-in torch architectures a `ModelSpec` of framework "torch" may name.

Every model is an `nn.Sequential` whose last module, "head", maps to the class logits, so its
state_dict names are stable and readable ("features.0.weight", "head.bias").
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from hivenode.models.training.backend import TrainingError

Builder = Callable[[Mapping[str, Any], tuple[int, ...], int], nn.Sequential]

DEFAULT_HIDDEN = (64,)
DEFAULT_CHANNELS = (16, 32)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the body with torch's RNGs seeded, restoring the caller's RNG state afterwards.

    Module initialisation and dropout draw from torch's global generators; forking them keeps
    a seeded build or training run from changing what the rest of the process draws.
    """
    cuda = torch.cuda.is_available()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)  # only the forked (current) device
        yield


def build_model(
    name: str,
    options: Mapping[str, Any],
    feature_shape: tuple[int, ...],
    num_classes: int,
    *,
    seed: int = 0,
) -> nn.Sequential:
    """The zoo model `name` for inputs of `feature_shape` and `num_classes` outputs, its
    initial weights fixed by `seed`."""
    builder = _BUILDERS.get(name) or _HF_BUILDERS.get(name)
    if builder is None:
        raise TrainingError(
            f"unknown torch zoo model {name!r}; the zoo has {', '.join(sorted(_BUILDERS))}"
            f" and, from Hugging Face configs, {', '.join(sorted(_HF_BUILDERS))}"
        )
    if num_classes < 2:
        raise TrainingError(f"a classifier needs at least 2 classes, got {num_classes}")
    if not feature_shape or min(feature_shape) < 1:
        raise TrainingError(f"feature shape {feature_shape} has no features")
    with seeded(seed):
        return builder(options, feature_shape, num_classes)


def _logreg(
    options: Mapping[str, Any], feature_shape: tuple[int, ...], num_classes: int
) -> nn.Sequential:
    """Multinomial logistic regression: one linear map from the flattened input to logits."""
    _check_options("logreg", options, allowed=())
    return _sequential([nn.Flatten()], math.prod(feature_shape), num_classes)


def _mlp(
    options: Mapping[str, Any], feature_shape: tuple[int, ...], num_classes: int
) -> nn.Sequential:
    """Fully connected ReLU layers of `options["hidden"]` widths (default [64])."""
    _check_options("mlp", options, allowed=("hidden",))
    hidden = _positive_ints("mlp", "hidden", options.get("hidden", DEFAULT_HIDDEN))
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(feature_shape)
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    return _sequential(layers, width, num_classes)


def _cnn(
    options: Mapping[str, Any], feature_shape: tuple[int, ...], num_classes: int
) -> nn.Sequential:
    """Two 3×3 conv + ReLU + 2×2 max-pool blocks and a linear head, for (H, W) or (C, H, W)
    images as small as 4×4 (8×8 digits, 28×28 MNIST); `options["channels"]` (default
    [16, 32]) sets the two blocks' widths."""
    _check_options("cnn", options, allowed=("channels",))
    channels = _positive_ints("cnn", "channels", options.get("channels", DEFAULT_CHANNELS))
    if len(channels) != 2:
        raise TrainingError(f"cnn option 'channels' needs 2 widths, got {list(channels)}")
    if len(feature_shape) == 2:
        image = (1, *feature_shape)
    elif len(feature_shape) == 3:
        image = feature_shape
    else:
        raise TrainingError(f"cnn needs (H, W) or (C, H, W) inputs, got shape {feature_shape}")
    in_channels, height, width = image
    if min(height, width) < 4:
        raise TrainingError(f"cnn needs images of at least 4×4, got {height}×{width}")
    # Flatten + Unflatten accept (n, H, W) and (n, C, H, W) alike.
    layers: list[nn.Module] = [nn.Flatten(), nn.Unflatten(1, image)]
    for out_channels in channels:
        layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        in_channels = out_channels
        height, width = height // 2, width // 2
    layers.append(nn.Flatten())
    return _sequential(layers, in_channels * height * width, num_classes)


def _hf_bert(
    options: Mapping[str, Any], feature_shape: tuple[int, ...], num_classes: int
) -> nn.Sequential:
    """A Hugging Face BertForSequenceClassification built from its config, as pipeline-able
    blocks (hf_sequential.py); `feature_shape` is (seq_len,) token ids, options "layers",
    "hidden", "heads", "vocab", "max_len"."""
    # imported here: it imports transformers, which only these models need
    from hivenode.models.training import hf_sequential

    return hf_sequential.build_sequential("bert", options, feature_shape, num_classes)


def _hf_gpt2(
    options: Mapping[str, Any], feature_shape: tuple[int, ...], num_classes: int
) -> nn.Sequential:
    """GPT2ForSequenceClassification as blocks, with the options of "hf-bert"."""
    from hivenode.models.training import hf_sequential

    return hf_sequential.build_sequential("gpt2", options, feature_shape, num_classes)


_BUILDERS: dict[str, Builder] = {"logreg": _logreg, "mlp": _mlp, "cnn": _cnn}
_HF_BUILDERS: dict[str, Builder] = {"hf-bert": _hf_bert, "hf-gpt2": _hf_gpt2}
"""Transformers built from a config, apart: they need transformers, the others torch only."""


def _sequential(features: list[nn.Module], width: int, num_classes: int) -> nn.Sequential:
    """`features` (ending in `width` flat values per example), then the linear "head"."""
    return nn.Sequential(
        OrderedDict(
            [
                ("features", nn.Sequential(*features)),
                ("head", nn.Linear(width, num_classes)),
            ]
        )
    )


def _check_options(name: str, options: Mapping[str, Any], allowed: Sequence[str]) -> None:
    # A misspelt option silently ignored would train a different model than the job meant.
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        expected = ", ".join(allowed) if allowed else "none"
        raise TrainingError(f"{name} has no option {', '.join(unknown)}; options: {expected}")


def _positive_ints(name: str, option: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
    ):
        raise TrainingError(f"{name} option {option!r} must be a list of positive ints: {value!r}")
    return tuple(value)
