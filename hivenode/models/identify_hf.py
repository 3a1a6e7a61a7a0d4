"""Hugging Face model directories: config.json says what the model is (model_type,
architectures); the weights' headers say how big (safetensors headers, or the opcode scan of
pytorch_model.bin); no tensor data is read and transformers is not imported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hivenode.models.classify import classify
from hivenode.models.errors import ModelError
from hivenode.models.identify_safetensors import read_header
from hivenode.models.info import Family, Framework, ModelInfo
from hivenode.models.weights import Tensor, count, dtypes
from hivenode.models.weights import layer_summary as summarise

VISION_TYPES = frozenset(
    [
        "vit",
        "deit",
        "beit",
        "swin",
        "swinv2",
        "convnext",
        "convnextv2",
        "resnet",
        "regnet",
        "efficientnet",
        "mobilenet_v1",
        "mobilenet_v2",
        "mobilevit",
        "mobilevitv2",
        "dinov2",
        "dinat",
        "nat",
        "detr",
        "conditional_detr",
        "deformable_detr",
        "rt_detr",
        "yolos",
        "segformer",
        "mask2former",
        "maskformer",
        "dpt",
        "levit",
        "poolformer",
        "van",
        "cvt",
        "bit",
        "focalnet",
        "glpn",
        "upernet",
        "table-transformer",
        "efficientformer",
        "pvt",
        "pvt_v2",
        "swiftformer",
        "hiera",
        "dit",
        "imagegpt",
        "vitdet",
        "vit_mae",
        "vit_msn",
        "data2vec-vision",
        "depth_anything",
        "zoedepth",
        "sam",
        "vit_hybrid",
    ]
)
NON_TEXT_TYPES = frozenset(
    [
        "wav2vec2",
        "wav2vec2-conformer",
        "hubert",
        "wavlm",
        "whisper",
        "speech_to_text",
        "sew",
        "sew-d",
        "unispeech",
        "unispeech-sat",
        "data2vec-audio",
        "encodec",
        "musicgen",
        "bark",
        "speecht5",
        "seamless_m4t",
        "clap",
        "audio-spectrogram-transformer",
        "clip",
        "blip",
        "blip-2",
        "llava",
        "siglip",
        "idefics",
        "flava",
        "git",
        "owlvit",
        "owlv2",
        "paligemma",
    ]
)
RESNET_TYPES = frozenset({"resnet", "regnet", "bit"})
CNN_TYPES = frozenset({"convnext", "convnextv2", "efficientnet", "mobilenet_v1", "mobilenet_v2"})
RNN_TYPES = frozenset({"rwkv"})
SUBTYPES = (
    ("ForCausalLM", "generation"),
    ("LMHeadModel", "generation"),
    ("ForConditionalGeneration", "generation"),
    ("ForMaskedLM", "fill_mask"),
    ("ForSequenceClassification", "classification"),
    ("ForTokenClassification", "token_classification"),
    ("ForQuestionAnswering", "question_answering"),
    ("ForMultipleChoice", "multiple_choice"),
    ("ForImageClassification", "classification"),
    ("ForAudioClassification", "classification"),
    ("ForObjectDetection", "detection"),
    ("Segmentation", "segmentation"),
    ("ForDepthEstimation", "depth_estimation"),
    ("ForCTC", "speech_recognition"),
    ("ForSpeechSeq2Seq", "speech_recognition"),
    ("ForPreTraining", "pretraining"),
    ("ForMaskedImageModeling", "pretraining"),
    ("ForNextSentencePrediction", "next_sentence_prediction"),
    ("Model", "feature_extraction"),
)
_CONFIG_DETAILS = (
    "model_type", "architectures", "transformers_version", "vocab_size", "hidden_size",
    "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "max_position_embeddings", "n_positions", "n_embd", "n_layer", "n_head", "image_size",
    "num_channels", "num_labels", "torch_dtype", "dtype", "tie_word_embeddings",
)  # fmt: skip


def is_hf_directory(path: Path) -> bool:
    return (path / "config.json").is_file()


def identify_hf(path: Path) -> ModelInfo:
    try:
        config: Any = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"config.json is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelError("config.json is not a JSON object")
    files = _weight_files(path)
    tensors: list[Tensor] = []
    unsafe: list[str] = []
    for file in files:
        if file.suffix == ".safetensors":
            found, _ = read_header(file)
            tensors += [
                Tensor(t.name, t.shape, t.dtype, (file.name, t.storage), t.buffer) for t in found
            ]
        else:
            from hivenode.models.identify_torch import zip_state_dict

            found, file_unsafe = zip_state_dict(file)
            tensors += found
            unsafe += [name for name in file_unsafe if name not in unsafe]
    auto_map = config.get("auto_map")
    if isinstance(auto_map, dict):  # loading it means running the directory's Python code
        unsafe += [f"remote code: {target}" for target in map(str, auto_map.values())]

    counts = count(tensors)
    layers = summarise(tensors)
    model_type = str(config.get("model_type") or "")
    architectures = [str(a) for a in config.get("architectures") or [] if isinstance(a, str)]
    fallback = classify(layers, [t.name for t in tensors])
    details: dict[str, Any] = {key: config[key] for key in _CONFIG_DETAILS if key in config}
    details.update(
        weights_files=[file.name for file in files],
        tensors=len(tensors),
        buffers=counts.buffers,
        buffer_elements=counts.buffer_elements,
    )
    return ModelInfo(
        format="hf_directory",
        framework=Framework.TRANSFORMERS,
        family=_family(model_type, config, fallback.family),
        subtype=_subtype(architectures) or fallback.subtype,
        architecture=_architecture(model_type, fallback.architecture),
        parameters=counts.parameters,
        input_shape=_input_shape(model_type, config),
        dtypes=dtypes(tensors),
        safe=not unsafe,
        unsafe_globals=tuple(unsafe),
        layers=layers,
        details=details,
    )


def _weight_files(path: Path) -> list[Path]:
    """The weight files transformers would load, preferring safetensors as it does."""
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (path / single).is_file():
            return [path / single]
        if (path / index).is_file():
            try:
                weight_map = json.loads((path / index).read_text(encoding="utf-8"))["weight_map"]
                shards = sorted({str(name) for name in weight_map.values()})
            except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ModelError(f"{index} has no readable weight_map") from exc
            missing = [name for name in shards if not (path / name).is_file()]
            if missing:
                raise ModelError(f"{index} names shards that are missing: {', '.join(missing)}")
            return [path / name for name in shards]
    raise ModelError(
        "Hugging Face directory has config.json but no weights "
        "(model.safetensors, pytorch_model.bin or their sharded index)"
    )


def _family(model_type: str, config: dict[str, Any], fallback: Family) -> Family:
    if model_type in VISION_TYPES:
        return Family.COMPUTER_VISION
    if model_type in NON_TEXT_TYPES:
        return Family.UNKNOWN
    if "vocab_size" in config or "text_config" in config:
        return Family.NLP
    return fallback


def _architecture(model_type: str, fallback: str) -> str:
    if model_type in RESNET_TYPES:
        return "resnet"
    if model_type in CNN_TYPES:
        return "cnn"
    if model_type in RNN_TYPES:
        return "rnn"
    if model_type in ("mamba", "mamba2"):
        return "state_space"
    return "transformer" if model_type else fallback


def _subtype(architectures: list[str]) -> str | None:
    for architecture in architectures[:1]:
        for suffix, subtype in SUBTYPES:
            if suffix in architecture:
                return subtype
    return None


def _input_shape(model_type: str, config: dict[str, Any]) -> tuple[int | None, ...] | None:
    """Vision models declare their input: (batch, channels, height, width)."""
    size = config.get("image_size")
    if model_type not in VISION_TYPES or not isinstance(size, int | list):
        return None
    height, width = (size, size) if isinstance(size, int) else (size + size)[:2]
    channels = config.get("num_channels", 3)
    return (None, int(channels), int(height), int(width))
