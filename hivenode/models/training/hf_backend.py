"""The "hf" adapter: Hugging Face transformers classifiers built from a config dict.

Only architectures transformers itself ships are built, from the config alone: nothing is
downloaded and no remote code runs. Inputs are token ids of shape (n, seq_len) with every
position attended: integers, or whole floats as a node's dataset catalog hands every adapter
its features (float32 holds every id below 2**24 exactly). Training and evaluation are
torch_backend's, shared by every torch model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import transformers
from torch import nn

from hivenode.models.training import zoo
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
from hivenode.models.training.torch_backend import (
    TorchModel,
    evaluate_model,
    infer_num_classes,
    state_arrays,
    train_model,
)

# The auto classes whose output is one set of class logits per sequence.
AUTO_CLASSES = ("AutoModelForSequenceClassification",)
# The node's data decides the labels, whatever the config says.
_LABEL_KEYS = ("num_labels", "id2label", "label2id")


def build_model(spec: ModelSpec, num_classes: int, *, seed: int = 0) -> nn.Module:
    """The model `spec` names, with `num_classes` labels, its initial weights fixed by `seed`."""
    if spec.name not in AUTO_CLASSES:
        raise TrainingError(
            f"hf model class {spec.name!r} is not allowed; allowed: {', '.join(AUTO_CLASSES)}"
        )
    unknown = sorted(set(spec.options) - {"config"})
    if unknown:
        raise TrainingError(f"hf models take only the option 'config', got {', '.join(unknown)}")
    config = _config(spec.options.get("config"), num_classes)
    auto_class: Any = getattr(transformers, spec.name)
    try:
        with zoo.seeded(seed):
            module: nn.Module = auto_class.from_config(config, trust_remote_code=False)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise TrainingError(f"cannot build {spec.name} from its config: {exc}") from exc
    return module


class HFBackend:
    """`Backend` for framework "hf"."""

    def init_arrays(
        self, spec: ModelSpec, feature_shape: tuple[int, ...], num_classes: int, seed: int
    ) -> dict[str, NDArray]:
        return state_arrays(build_model(spec, num_classes, seed=seed))

    def train(
        self,
        spec: ModelSpec,
        arrays: Mapping[str, NDArray],
        data: LocalData,
        settings: TrainSettings,
        scaffold: ScaffoldState | None = None,
    ) -> TrainOutcome:
        module = build_model(spec, data.num_classes)
        tokens = replace(data, x_train=_token_ids(module, data.x_train))
        return train_model(_sequence_classifier(module), arrays, tokens, settings, scaffold)

    def evaluate(
        self, spec: ModelSpec, arrays: Mapping[str, NDArray], x: NDArray, y: NDArray
    ) -> Evaluation:
        num_classes = infer_num_classes(
            lambda n: build_model(spec, n), arrays, f"hf model {spec.name}"
        )
        module = build_model(spec, num_classes)
        tokens = _token_ids(module, x)
        return evaluate_model(_sequence_classifier(module), arrays, tokens, y, num_classes)


BACKEND = HFBackend()


def _config(raw: object, num_classes: int) -> Any:
    """A transformers config from the spec's dict: a built-in "model_type" only."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get("model_type"), str):
        raise TrainingError('hf models need options {"config": {"model_type": ..., ...}}')
    if "auto_map" in raw:
        # auto_map points transformers at model code outside the library: never run it
        raise TrainingError("the hf config names remote code (auto_map); only built-in models")
    kwargs = {key: value for key, value in raw.items() if key not in (*_LABEL_KEYS, "model_type")}
    try:
        return transformers.AutoConfig.for_model(
            raw["model_type"], num_labels=num_classes, **kwargs
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise TrainingError(f"bad hf config: {exc}") from exc


def _sequence_classifier(module: nn.Module) -> TorchModel:
    def logits(token_ids: torch.Tensor) -> torch.Tensor:
        output: Any = module(input_ids=token_ids, attention_mask=torch.ones_like(token_ids))
        result: torch.Tensor = output.logits
        return result

    return TorchModel(module=module, logits=logits, input_dtype=torch.long)


def _token_ids(module: nn.Module, x: NDArray) -> NDArray:
    """`x` as int64 token ids the model can embed; otherwise an embedding lookup fails deep
    inside the model (on CUDA as an unrecoverable device assert)."""
    config: Any = getattr(module, "config", None)
    whole = x.dtype.kind in "iu" or (x.dtype.kind == "f" and bool(np.all(np.mod(x, 1) == 0)))
    if x.ndim != 2 or not whole:
        raise TrainingError(
            f"hf inputs must be token ids, whole numbers of shape (n, seq_len), got {x.dtype} "
            f"{x.shape}"
        )
    vocab_size = getattr(config, "vocab_size", None)
    if x.size and vocab_size is not None and (int(x.min()) < 0 or int(x.max()) >= vocab_size):
        raise TrainingError(
            f"token ids span {int(x.min())}..{int(x.max())}, the vocabulary has {vocab_size}"
        )
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is not None and x.shape[1] > max_positions:
        raise TrainingError(f"sequences of {x.shape[1]} tokens exceed the model's {max_positions}")
    return x.astype(np.int64)
