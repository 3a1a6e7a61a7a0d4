"""Family, subtype and architecture of a network from what identification saw: its layers'
kinds, its weights' names and shapes. Rules, not guesses by a model: each one is listed here.

- reinforcement_learning: a weight name has a segment that RL libraries use for their nets
  (`q_net`, `qf1`, `policy_net`, `actor`, `critic`, `value_net`, `action_net`, `pi`, `vf`, ...);
  subtype `q_learning` when a Q-network is named, `actor_critic` for actor + critic, else
  `policy`. A DQN whose layers are named `fc1`, `fc2` is just an MLP: the rule cannot see it.
- architecture, first that holds: `transformer` (attention layers or attention-named weights),
  `resnet` (convolutions plus residual naming: `layerN.M.convK`, `downsample`, `shortcut`),
  `cnn` (any convolution), `rnn` (LSTM/GRU/RNN layers), `mlp` (dense layers only).
- family: `nlp` when token embeddings feed a transformer/rnn/1-d cnn, `computer_vision` for 2-d
  and 3-d convolutions or patch embeddings, otherwise unknown.
- subtype: `generation` for a language-model head, `detection`/`segmentation` for box/mask
  heads, `classification` for a dense layer named `classifier`/`fc`/`head`/`logits`/...
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hivenode.models.info import Family, LayerSummary


@dataclass(frozen=True)
class Kind:
    family: Family = Family.UNKNOWN
    subtype: str | None = None
    architecture: str = "unknown"


_Q_MARKERS = {"q_net", "qnet", "q_network", "q_net_target", "qf", "qf0", "qf1", "qf2", "dqn"}
_POLICY_MARKERS = {"policy", "policy_net", "pi", "action_net", "actor", "actor_target", "pi_net"}
_CRITIC_MARKERS = {"critic", "critic_target", "value_net", "vf", "value_head", "v_net"}
_RL_MARKERS = _Q_MARKERS | _POLICY_MARKERS | _CRITIC_MARKERS | {"target_net", "mlp_extractor"}

_ATTENTION_SEGMENTS = {
    "attention", "attn", "self_attn", "self_attention", "selfattention", "c_attn", "q_proj",
    "k_proj", "v_proj", "qkv", "query", "key", "value", "multi_head_attention",
    "encoder_attn", "cross_attn", "mha",
}  # fmt: skip
_RESNET = re.compile(r"(layer\d+[./]\d+[./](conv|bn)\d|downsample|shortcut|residual|res\d+_)", re.M)
_PATCH = re.compile(r"(patch_embed|pixel|vision|image|visual)", re.I)
_LM_HEAD = re.compile(r"(^|[./])(lm_head|lm_logits|decoder_head|generator)([./]|$)", re.I | re.M)
_DETECTION = re.compile(r"(bbox|box_head|rpn|anchor|box_predictor|class_embed.*bbox)", re.I)
_SEGMENTATION = re.compile(r"(mask_head|segmentation|seg_head|decode_head)", re.I)
_CLASSIFIER_SEGMENTS = {
    "fc", "classifier", "head", "heads", "logits", "cls", "output_layer", "out", "fc_out",
    "classification_head", "score", "dense_out",
}  # fmt: skip


def category(kind: str, shape: tuple[int, ...] | None = None) -> str:
    """A framework's layer class name folded to one vocabulary: conv2d, linear, lstm, ..."""
    lower = kind.lower()
    if "attention" in lower or "multihead" in lower or lower == "mha":
        return "attention"
    if "conv" in lower and "transpose" not in lower:
        if "1d" in lower or (shape is not None and len(shape) == 3):
            return "conv1d"
        if "3d" in lower or (shape is not None and len(shape) == 5):
            return "conv3d"
        return "conv2d"
    if "transpose" in lower:
        return "conv2d"
    for name in ("lstm", "gru"):
        if name in lower:
            return name
    if "rnn" in lower:
        return "rnn"
    if "embed" in lower:
        return "embedding"
    if lower in ("linear", "dense", "gemm", "matmul", "einsumdense", "lazylinear"):
        return "linear"
    if "batchnorm" in lower or "batch_normalization" in lower:
        return "batchnorm"
    if "norm" in lower:
        return "norm"
    return lower


def _segments(names: Iterable[str]) -> set[str]:
    out: set[str] = set()
    for name in names:
        out.update(part.lower() for part in re.split(r"[./]", name) if part)
    return out


def classify(layers: Sequence[LayerSummary], names: Sequence[str]) -> Kind:
    """Family, subtype and architecture from layers (kinds, shapes) and weight names."""
    categories = [category(layer.kind, layer.shape) for layer in layers]
    present = set(categories)
    segments = _segments(names)
    joined = "\n".join(names)

    has_attention = "attention" in present or bool(segments & _ATTENTION_SEGMENTS)
    has_conv = bool(present & {"conv1d", "conv2d", "conv3d"})
    has_rnn = bool(present & {"lstm", "gru", "rnn"})
    has_embedding = "embedding" in present

    if has_attention and (has_embedding or "linear" in present):
        architecture = "transformer"
    elif has_conv and _RESNET.search(joined):
        architecture = "resnet"
    elif has_conv:
        architecture = "cnn"
    elif has_rnn:
        architecture = "rnn"
    elif "linear" in present:
        architecture = "mlp"
    else:
        architecture = "unknown"

    if segments & _RL_MARKERS:
        return Kind(Family.REINFORCEMENT_LEARNING, _rl_subtype(segments), architecture)

    vision = bool(present & {"conv2d", "conv3d"}) or bool(_PATCH.search(joined))
    if has_embedding and architecture in ("transformer", "rnn", "cnn") and not vision:
        family = Family.NLP
    elif vision:
        family = Family.COMPUTER_VISION
    else:
        family = Family.UNKNOWN
    return Kind(family, _subtype(layers, categories, joined), architecture)


def _rl_subtype(segments: set[str]) -> str:
    if segments & _Q_MARKERS:
        return "q_learning"
    if segments & (_POLICY_MARKERS - {"pi"}) and segments & _CRITIC_MARKERS:
        return "actor_critic"
    return "policy"


def _subtype(layers: Sequence[LayerSummary], categories: Sequence[str], joined: str) -> str | None:
    if _LM_HEAD.search(joined):
        return "generation"
    if _DETECTION.search(joined):
        return "detection"
    if _SEGMENTATION.search(joined):
        return "segmentation"
    # A dense layer named like a classification head, wherever it sits: safetensors files
    # list their tensors sorted by name, not in forward order.
    for layer, kind in zip(layers, categories, strict=True):
        segments = set(re.split(r"[./]", layer.name.lower()))
        if kind == "linear" and layer.parameters and segments & _CLASSIFIER_SEGMENTS:
            return "classification"
    return None
