"""Hugging Face sequence classifiers (BERT, GPT-2) built from a config, as an `nn.Sequential`
of blocks a pipeline can cut: token embeddings, one block per transformer layer, the head.

Every block takes and returns one float32 tensor (the hidden states, shape (n, seq_len,
hidden); the head returns the logits), so pipeline stages pass them on as they pass any zoo
model's activations. The first block takes token ids as float32 (a stage's features are
float32; every id below 2**24 is exact in float32) and casts them to int64 itself.

There is no padding: every position of every sequence is attended, as the HF model does with
an all-ones attention mask (or none). GPT-2's class is read at the last position, as HF reads
it when no token is padding.

Dropout is 0 everywhere: a pipeline stage and a single node draw different random numbers,
and only a deterministic model trains the same on both. Attention is HF's "eager" one (plain
matmul + softmax, the ops every other layer runs) rather than a fused kernel, which may pick
another algorithm for a micro-batch than for the whole batch, or sum its backward in a
nondeterministic order on a GPU.

The blocks hold the HF modules themselves, so the Sequential's state_dict is the HF model's,
one tensor for one tensor, under names that `HF_PREFIXES` rewrites prefix by prefix
("{i}" is a layer's index):

    bert  embeddings.hf.   -> bert.embeddings.      gpt2  embeddings.wte.  -> transformer.wte.
          layers.{i}.hf.   -> bert.encoder.layer.{i}.     embeddings.wpe.  -> transformer.wpe.
          head.pooler.     -> bert.pooler.                layers.{i}.hf.   -> transformer.h.{i}.
          head.classifier. -> classifier.                 head.ln_f.       -> transformer.ln_f.
                                                          head.score.      -> score.

`to_hf_state_dict` and `from_hf_state_dict` apply it; `to_hf_model` gives a trained
pipeline's weights back as the HF model (`BertForSequenceClassification`,
`GPT2ForSequenceClassification`), ready for `save_pretrained`. transformers is imported only
when one of these models is built.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hivenode.models.training.backend import TrainingError

ARCHITECTURES = ("bert", "gpt2")
OPTIONS = ("layers", "hidden", "heads", "vocab", "max_len")
DEFAULT_LAYERS = 2
DEFAULT_HIDDEN = 64
DEFAULT_HEADS = 2
DEFAULT_VOCAB = 1000
FLOAT32_EXACT_INTS = 2**24
"""Every integer below this is exact in float32: the largest vocabulary a float32 id holds."""

HF_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "bert": (
        ("embeddings.hf.", "bert.embeddings."),
        ("layers.{i}.hf.", "bert.encoder.layer.{i}."),
        ("head.pooler.", "bert.pooler."),
        ("head.classifier.", "classifier."),
    ),
    "gpt2": (
        ("embeddings.wte.", "transformer.wte."),
        ("embeddings.wpe.", "transformer.wpe."),
        ("layers.{i}.hf.", "transformer.h.{i}."),
        ("head.ln_f.", "transformer.ln_f."),
        ("head.score.", "score."),
    ),
}
"""(Sequential prefix, HF prefix) pairs per architecture: see the module docstring."""


@dataclass(frozen=True)
class HfShape:
    """The sizes of a model: transformer layers, hidden width, attention heads, token ids
    (0 … vocab - 1), the longest sequence its position embeddings cover, and the sequence
    length it is built for."""

    layers: int
    hidden: int
    heads: int
    vocab: int
    max_len: int
    seq_len: int


def hf_shape(arch: str, options: Mapping[str, Any], feature_shape: tuple[int, ...]) -> HfShape:
    """The checked sizes `options` give a model of `arch` for sequences of `feature_shape`
    (one dimension: the sequence length); `max_len` defaults to the sequence length."""
    _check_arch(arch)
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:  # a misspelt option silently ignored would train another model
        raise TrainingError(f"hf-{arch} has no option {', '.join(unknown)}; options: {OPTIONS}")
    if len(feature_shape) != 1:
        raise TrainingError(
            f"hf-{arch} takes token ids of shape (seq_len,) per example, got {feature_shape}"
        )
    seq_len = feature_shape[0]
    shape = HfShape(
        layers=_positive(arch, "layers", options.get("layers", DEFAULT_LAYERS)),
        hidden=_positive(arch, "hidden", options.get("hidden", DEFAULT_HIDDEN)),
        heads=_positive(arch, "heads", options.get("heads", DEFAULT_HEADS)),
        vocab=_positive(arch, "vocab", options.get("vocab", DEFAULT_VOCAB)),
        max_len=_positive(arch, "max_len", options.get("max_len", seq_len)),
        seq_len=seq_len,
    )
    if shape.hidden % shape.heads:
        raise TrainingError(f"hf-{arch}: hidden {shape.hidden} is not a multiple of heads")
    if shape.seq_len > shape.max_len:
        raise TrainingError(f"hf-{arch}: sequences of {seq_len} exceed max_len {shape.max_len}")
    if shape.vocab > FLOAT32_EXACT_INTS:
        raise TrainingError(f"hf-{arch}: vocab {shape.vocab} has ids float32 cannot hold")
    return shape


def hf_config(arch: str, shape: HfShape, num_classes: int) -> Any:
    """The transformers config of the model: no dropout, eager attention (module docstring)."""
    import transformers

    _check_arch(arch)
    sizes: dict[str, Any]
    if arch == "bert":
        sizes = dict(
            vocab_size=shape.vocab,
            hidden_size=shape.hidden,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            intermediate_size=4 * shape.hidden,
            max_position_embeddings=shape.max_len,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            classifier_dropout=0.0,
        )
    else:
        sizes = dict(
            vocab_size=shape.vocab,
            n_embd=shape.hidden,
            n_layer=shape.layers,
            n_head=shape.heads,
            n_positions=shape.max_len,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            # GPT-2's defaults (50256) lie outside a small vocabulary; nothing here generates
            bos_token_id=None,
            eos_token_id=None,
        )
    # for_model, as the "hf" adapter builds its configs: its kwargs are untyped, while the
    # config classes' signatures do not name the PretrainedConfig ones (num_labels, ...)
    return transformers.AutoConfig.for_model(
        arch, num_labels=num_classes, attn_implementation="eager", **sizes
    )


def hf_model(
    arch: str, options: Mapping[str, Any], feature_shape: tuple[int, ...], num_classes: int
) -> nn.Module:
    """A fresh HF sequence classifier of `arch` with the zoo model's config (its weights
    drawn from torch's global RNG: seed it, or load a state_dict into it)."""
    import transformers

    config = hf_config(arch, hf_shape(arch, options, feature_shape), num_classes)
    if arch == "bert":
        return transformers.BertForSequenceClassification(config)
    return transformers.GPT2ForSequenceClassification(config)


def build_sequential(
    arch: str, options: Mapping[str, Any], feature_shape: tuple[int, ...], num_classes: int
) -> nn.Sequential:
    """The HF model of `arch` as "embeddings", "layers" (an `nn.Sequential`, one block per
    transformer layer) and "head". Its weights are the fresh HF model's: seed torch first."""
    shape = hf_shape(arch, options, feature_shape)
    model: Any = hf_model(arch, options, feature_shape, num_classes)
    embeddings: nn.Module
    layers: list[nn.Module]
    head: nn.Module
    if arch == "bert":
        embeddings = BertEmbeddingsBlock(model.bert.embeddings, shape.vocab)
        layers = [LayerBlock(layer) for layer in model.bert.encoder.layer]
        head = BertHead(model.bert.pooler, model.dropout, model.classifier)
    else:
        t = model.transformer
        embeddings = Gpt2EmbeddingsBlock(t.wte, t.wpe, t.drop, shape.vocab)
        layers = [CausalLayerBlock(block) for block in t.h]
        head = Gpt2Head(t.ln_f, model.score)
    blocks = [("embeddings", embeddings), ("layers", nn.Sequential(*layers)), ("head", head)]
    return nn.Sequential(OrderedDict(blocks))


def to_hf_state_dict(arch: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Sequential's state_dict (a whole model's, e.g. every pipeline stage's merged)
    under the HF model's names; a name outside the mapping is a TrainingError."""
    _check_arch(arch)
    return {_rename(name, _PATTERNS[arch]): t for name, t in state.items()}


def from_hf_state_dict(arch: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `to_hf_state_dict`: an HF model's weights for the Sequential (to start
    a pipeline from them)."""
    _check_arch(arch)
    return {_rename(name, _INVERSE_PATTERNS[arch]): t for name, t in state.items()}


def to_hf_model(
    arch: str,
    options: Mapping[str, Any],
    feature_shape: tuple[int, ...],
    num_classes: int,
    state: Mapping[str, torch.Tensor],
) -> nn.Module:
    """The HF model holding the Sequential's weights `state` (every tensor must fit)."""
    model = hf_model(arch, options, feature_shape, num_classes)
    try:
        model.load_state_dict(to_hf_state_dict(arch, state), strict=True)
    except RuntimeError as exc:
        raise TrainingError(f"the weights do not fit hf-{arch} {dict(options)}: {exc}") from exc
    return model


# --- the blocks ------------------------------------------------------------------------------


class BertEmbeddingsBlock(nn.Module):
    """Float32 token ids (n, seq_len) → BERT's embeddings (word + position + token type 0,
    LayerNorm)."""

    def __init__(self, embeddings: nn.Module, vocab: int) -> None:
        super().__init__()
        self.hf = embeddings
        self.vocab = vocab

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _tensor(self.hf(input_ids=token_ids(ids, self.vocab)))


class Gpt2EmbeddingsBlock(nn.Module):
    """Float32 token ids (n, seq_len) → GPT-2's token + position embeddings."""

    def __init__(self, wte: nn.Module, wpe: nn.Module, drop: nn.Module, vocab: int) -> None:
        super().__init__()
        self.wte = wte
        self.wpe = wpe
        self.drop = drop
        self.vocab = vocab

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tokens = token_ids(ids, self.vocab)
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        return _tensor(self.drop(self.wte(tokens) + self.wpe(positions)))


class LayerBlock(nn.Module):
    """One bidirectional transformer layer (BERT's): every position attends every other."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.hf = layer

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # No mask is an all-ones mask: HF adds a mask of zeros to the scores, or none.
        return _tensor(self.hf(hidden))


class CausalLayerBlock(nn.Module):
    """One causal transformer layer (GPT-2's): a position attends itself and those before.

    HF's GPT2Model builds the causal mask and hands it to every layer; eager attention given
    no mask would let positions see the future, so the block builds it as HF does: the
    dtype's most negative value above the diagonal, added to the scores."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.hf = layer

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        length = hidden.shape[1]
        future = torch.full(
            (length, length), torch.finfo(hidden.dtype).min, dtype=hidden.dtype,
            device=hidden.device,
        ).triu(1)  # fmt: skip
        return _tensor(self.hf(hidden, attention_mask=future[None, None]))


class BertHead(nn.Module):
    """BERT's pooler (tanh of a linear map of the first position) and the classifier."""

    def __init__(self, pooler: nn.Module, dropout: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.pooler = pooler
        self.dropout = dropout
        self.classifier = classifier

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return _tensor(self.classifier(self.dropout(self.pooler(hidden))))


class Gpt2Head(nn.Module):
    """GPT-2's final LayerNorm and its "score" map, read at the last position."""

    def __init__(self, ln_f: nn.Module, score: nn.Module) -> None:
        super().__init__()
        self.ln_f = ln_f
        self.score = score

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # scores every position then picks the last, as GPT2ForSequenceClassification does
        return _tensor(self.score(self.ln_f(hidden)))[:, -1]


def token_ids(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """`ids` (n, seq_len), whole numbers in 0 … vocab - 1 of any dtype, as int64."""
    tokens = ids.long()
    if ids.dim() != 2:
        raise TrainingError(f"token ids must be (n, seq_len), got shape {tuple(ids.shape)}")
    # a fractional or out-of-range "id" means the data is not token ids for this vocabulary
    if not torch.equal(tokens.to(ids.dtype), ids) or (
        tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab)
    ):
        raise TrainingError(f"token ids must be whole numbers in 0 … {vocab - 1}")
    return tokens


# --- helpers ---------------------------------------------------------------------------------


def _tensor(output: Any) -> torch.Tensor:
    # Some transformers versions return a layer's hidden states in a 1-tuple.
    if isinstance(output, tuple):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TrainingError(f"a transformer block returned {type(output).__name__}, not a tensor")
    return output


def _positive(arch: str, option: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TrainingError(f"hf-{arch} option {option!r} must be a positive int: {value!r}")
    return value


def _check_arch(arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise TrainingError(f"no hf architecture {arch!r}; there are {', '.join(ARCHITECTURES)}")


def _pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(re.escape(prefix).replace(re.escape("{i}"), r"(?P<i>\d+)"))


Patterns = tuple[tuple[re.Pattern[str], str], ...]

_PATTERNS: dict[str, Patterns] = {
    arch: tuple((_pattern(ours), theirs) for ours, theirs in pairs)
    for arch, pairs in HF_PREFIXES.items()
}
_INVERSE_PATTERNS: dict[str, Patterns] = {
    arch: tuple((_pattern(theirs), ours) for ours, theirs in pairs)
    for arch, pairs in HF_PREFIXES.items()
}


def _rename(name: str, patterns: Patterns) -> str:
    for pattern, replacement in patterns:
        match = pattern.match(name)
        if match:
            prefix = replacement.replace("{i}", match.groupdict().get("i", ""))
            return prefix + name[match.end() :]
    raise TrainingError(f"{name!r} is not a weight of the mapped model")
