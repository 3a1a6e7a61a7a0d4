"""Hugging Face classifiers built from their configs, cut into pipeline stages on real nodes,
train as one node trains them, and their weights go back into the HF model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pipeline_run import train_three_stages

from hivenode.models.training.backend import TrainingError
from hivenode.models.training.hf_sequential import (
    from_hf_state_dict,
    hf_model,
    to_hf_model,
    to_hf_state_dict,
)
from hivenode.parallel.data_parallel import global_batches, train_reference
from hivenode.parallel.pipeline import PipelineConfig, leaf_layers
from hivenode.parallel.torch_state import ModelRecipe, SgdConfig, max_param_diff

VOCAB = 50
SEQ_LEN = 8
CLASSES = 3
OPTIONS = {"layers": 4, "hidden": 32, "heads": 2, "vocab": VOCAB, "max_len": SEQ_LEN}
STEPS = 30
BATCH = 64

# Each head reads one position (BERT's pooler the first, GPT-2's score the last); the label
# is the third of the vocabulary the token there is in, which 30 SGD steps learn at these
# rates (measured: with momentum 0.9, a few times either rate makes the loss rise instead).
SETUPS = {
    "bert": (ModelRecipe("hf-bert", OPTIONS, (SEQ_LEN,), CLASSES, seed=3), 0.02, 0),
    "gpt2": (ModelRecipe("hf-gpt2", OPTIONS, (SEQ_LEN,), CLASSES, seed=3), 0.005, -1),
}


def token_dataset(read_at: int, samples: int = 512, seed: int = 0) -> tuple[Any, Any]:
    """Token ids 1 … VOCAB-1 as float32 (0 is BERT's padding id, and nothing is padding),
    labelled by the third of the vocabulary that the token at `read_at` falls in."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, size=(samples, SEQ_LEN))
    labels = (tokens[:, read_at] - 1) * CLASSES // (VOCAB - 1)
    return tokens.astype(np.float32), labels.astype(np.int64)


def hf_logits(arch: str, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The HF model's own logits for `ids`, every position attended."""
    with torch.no_grad():
        if arch == "bert":
            output: Any = model(input_ids=ids, attention_mask=torch.ones_like(ids))
            logits: torch.Tensor = output.logits
            return logits
        # GPT2ForSequenceClassification refuses batches without a padding id: one at a time
        return torch.cat([model(input_ids=row[None]).logits for row in ids])


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
async def test_three_stages_train_the_hf_model_as_one_node_does(tmp_path: Path, arch: str) -> None:
    recipe, lr, read_at = SETUPS[arch]
    sgd = SgdConfig(lr=lr, momentum=0.9)
    x, y = token_dataset(read_at)
    batches = global_batches(x, y, BATCH)
    config = PipelineConfig(f"pp-{arch}", recipe, sgd, steps=STEPS, micro_batches=4)
    stages, combined = await train_three_stages(tmp_path, config, batches)
    reference, _ = train_reference(recipe, sgd, batches, STEPS)
    assert max_param_diff(combined, dict(reference.state_dict())) <= 1e-5
    losses = [r.loss for r in stages[-1].records]
    assert all(loss is not None for loss in losses)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])  # type: ignore[arg-type]

    # the pipeline's trained weights, back in the HF model, give the Sequential's logits
    trained = recipe.build()
    trained.load_state_dict(combined)
    ids = torch.from_numpy(x[:16])
    exported = to_hf_model(arch, OPTIONS, (SEQ_LEN,), CLASSES, combined)
    with torch.no_grad():
        expected = trained(ids)
    assert torch.allclose(hf_logits(arch, exported, ids.long()), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_hf_model_loaded_from_the_sequential_gives_its_logits(arch: str) -> None:
    recipe, _, _ = SETUPS[arch]
    model = recipe.build()
    # weights far from the init (std 0.02), so a misplaced tensor cannot hide
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
    ids = torch.from_numpy(token_dataset(0, samples=16)[0])
    exported = to_hf_model(arch, OPTIONS, (SEQ_LEN,), CLASSES, model.state_dict())
    with torch.no_grad():
        expected = model(ids)
    assert expected.shape == (16, CLASSES)
    assert torch.allclose(hf_logits(arch, exported, ids.long()), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("arch", "ours", "theirs"),
    [
        ("bert", "embeddings.hf.word_embeddings.weight", "bert.embeddings.word_embeddings.weight"),
        ("bert", "layers.3.hf.attention.self.query.weight",
         "bert.encoder.layer.3.attention.self.query.weight"),
        ("bert", "head.pooler.dense.bias", "bert.pooler.dense.bias"),
        ("bert", "head.classifier.weight", "classifier.weight"),
        ("gpt2", "embeddings.wpe.weight", "transformer.wpe.weight"),
        ("gpt2", "layers.2.hf.attn.c_attn.weight", "transformer.h.2.attn.c_attn.weight"),
        ("gpt2", "head.ln_f.bias", "transformer.ln_f.bias"),
        ("gpt2", "head.score.weight", "score.weight"),
    ],
)  # fmt: skip
def test_state_dict_maps_one_to_one_onto_the_hf_names(arch: str, ours: str, theirs: str) -> None:
    recipe, _, _ = SETUPS[arch]
    model = recipe.build()
    state = model.state_dict()
    renamed = to_hf_state_dict(arch, state)
    assert renamed[theirs] is state[ours]
    hf_state = hf_model(arch, OPTIONS, (SEQ_LEN,), CLASSES).state_dict()
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {
        k: tuple(v.shape) for k, v in hf_state.items()
    }
    assert set(from_hf_state_dict(arch, hf_state)) == set(state)
    names = [name for name, _ in leaf_layers(model)]
    assert names == ["embeddings", "layers.0", "layers.1", "layers.2", "layers.3", "head"]
    with pytest.raises(TrainingError, match="not a weight"):
        to_hf_state_dict(arch, {"features.0.weight": state[ours]})


@pytest.mark.parametrize("bad", [[[1.5] * SEQ_LEN], [[float(VOCAB)] * SEQ_LEN], [[-1.0] * SEQ_LEN]])
def test_token_ids_must_be_whole_numbers_in_the_vocabulary(bad: list[list[float]]) -> None:
    model = SETUPS["bert"][0].build()
    with pytest.raises(TrainingError, match="token ids"):
        model(torch.tensor(bad))


def test_the_zoo_builds_hf_models_from_the_seed_and_checks_options() -> None:
    recipe = SETUPS["bert"][0]
    first = recipe.build().state_dict()
    again = recipe.build().state_dict()
    other = ModelRecipe("hf-bert", OPTIONS, (SEQ_LEN,), CLASSES, seed=4).build().state_dict()
    assert max_param_diff(first, again) == 0.0
    assert max_param_diff(first, other) > 0.0
    with pytest.raises(TrainingError, match="Hugging Face configs, hf-bert, hf-gpt2"):
        ModelRecipe("hf-roberta", OPTIONS, (SEQ_LEN,), CLASSES).build()
    with pytest.raises(TrainingError, match="no option layer"):
        ModelRecipe("hf-gpt2", {"layer": 2}, (SEQ_LEN,), CLASSES).build()
    with pytest.raises(TrainingError, match="exceed max_len"):
        ModelRecipe("hf-bert", OPTIONS, (SEQ_LEN + 1,), CLASSES).build()
    with pytest.raises(TrainingError, match="multiple of heads"):
        ModelRecipe("hf-bert", {"hidden": 30, "heads": 4}, (SEQ_LEN,), CLASSES).build()


def test_the_zoo_imports_transformers_only_to_build_an_hf_model() -> None:
    code = (
        "import sys\n"
        "from hivenode.models.training.zoo import build_model\n"
        "build_model('mlp', {}, (4,), 2)\n"
        "assert 'transformers' not in sys.modules, 'zoo imported transformers'\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
