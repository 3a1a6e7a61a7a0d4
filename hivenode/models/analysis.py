"""What a model needs to run: complexity class, memory, GPU, cores, epoch time, host fit.

Pure functions of a `ModelInfo` (and, for `fits`, a node's advertised `Hardware`). Every
number is computed from the model's own parameter count and dtype; the only heuristics are
the activation estimate and the constants named below, and `Analysis.notes` says which of
them an answer leans on.

Memory, with P the parameter count, b the bytes per element of the parameter dtype and
B the training batch size:

- weights        W = P·b
- gradients      G = P·b                  (one gradient per parameter, same dtype)
- optimizer      O = k·P·b                (k = 2 for Adam/AdamW: exp_avg and exp_avg_sq;
                                           1 for SGD with momentum; 0 for plain SGD)
- activations    A = B·a, a per sample    (see `_activations`)
- training       W + G + O + A
- inference      W + A_inf                (A_inf: the widest layer's input and output for
                                           the inference batch, see `_activations`)
- GPU            the same totals + CUDA_CONTEXT_BYTES for the CUDA context and allocator

scikit-learn estimators have no gradients or optimizer state: both memories are the
estimator's size, and the dataset (which dominates fitting) is not counted.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Literal

from hivenode.models.dtypes import DEFAULT_DTYPE, DTYPE_BYTES, parameter_dtype
from hivenode.models.errors import ModelError
from hivenode.models.info import Family, Framework, LayerSummary, ModelInfo
from hivenode.protocol.advert import GpuInfo, Hardware
from hivenode.protocol.records import WireModel

Purpose = Literal["inference", "training"]


class Complexity(StrEnum):
    """The original design's bins by parameter count."""

    SMALL = "small"  # < 1M parameters
    MEDIUM = "medium"  # < 100M
    LARGE = "large"  # < 1B
    XLARGE = "xlarge"  # ≥ 1B
    UNKNOWN = "unknown"  # parameter count not known


COMPLEXITY_UPPER_BOUNDS: tuple[tuple[Complexity, int], ...] = (
    (Complexity.SMALL, 1_000_000),
    (Complexity.MEDIUM, 100_000_000),
    (Complexity.LARGE, 1_000_000_000),
)
"""Exclusive upper bounds on the parameter count; anything above the last is XLARGE."""

CPU_CORES_BY_COMPLEXITY: dict[Complexity, int] = {
    Complexity.SMALL: 2,
    Complexity.MEDIUM: 4,
    Complexity.LARGE: 8,
    Complexity.XLARGE: 16,
    Complexity.UNKNOWN: 2,
}
"""Cores suggested for data loading and CPU work around the model (the original table)."""


class Optimizer(StrEnum):
    ADAM = "adam"
    ADAMW = "adamw"
    SGD_MOMENTUM = "sgd_momentum"
    SGD = "sgd"


OPTIMIZER_STATE_COPIES: dict[Optimizer, int] = {
    Optimizer.ADAM: 2,
    Optimizer.ADAMW: 2,
    Optimizer.SGD_MOMENTUM: 1,
    Optimizer.SGD: 0,
}
"""Extra tensors of the parameters' size each optimizer keeps (as torch.optim does)."""

INFERENCE_DTYPES: tuple[str, ...] = ("float32", "float16", "int8")
"""Dtypes `Analysis.inference_bytes_by_dtype` prices the model at (cast or quantised)."""

SAVED_TENSORS_PER_LAYER = 2
"""Activations autograd keeps per layer output: the output and its nonlinearity/norm."""

TRAINING_ACTIVATION_FRACTION = 0.5
"""Per-sample training activations as a fraction of the weight bytes when the layer summary
cannot give widths (convolutions, whose spatial size identification does not know, or no
summary at all). ResNet-18 at 224x224 keeps roughly 0.5-0.8x its weights per sample."""

INFERENCE_ACTIVATION_FRACTION = 0.1
"""Per-sample inference working memory as a fraction of the weight bytes, same fallback."""

CUDA_CONTEXT_BYTES = 512 * 1024**2
"""GPU memory taken before the first tensor: CUDA context, cuBLAS/cuDNN workspaces and the
caching allocator's slack (300-600 MiB depending on the card and libraries)."""

GPU_FRAMEWORKS = frozenset(
    {
        Framework.TORCH,
        Framework.TENSORFLOW,
        Framework.KERAS,
        Framework.TRANSFORMERS,
        Framework.ONNX,
        Framework.SAFETENSORS,
        Framework.UNKNOWN,
    }
)
"""Frameworks that can put the model on a GPU (scikit-learn cannot)."""

TRAINABLE_FRAMEWORKS = frozenset(Framework) - {Framework.ONNX}
"""ONNX files are served with onnxruntime, not trained."""

FRAMEWORK_DISTRIBUTIONS: dict[Framework, frozenset[str]] = {
    Framework.TORCH: frozenset({"torch"}),
    Framework.TENSORFLOW: frozenset({"tensorflow", "tensorflow-cpu"}),
    Framework.KERAS: frozenset({"keras", "tensorflow", "tensorflow-cpu"}),
    Framework.TRANSFORMERS: frozenset({"transformers"}),
    Framework.SKLEARN: frozenset({"scikit-learn"}),
    Framework.ONNX: frozenset({"onnxruntime", "onnxruntime-gpu"}),
    Framework.SAFETENSORS: frozenset({"torch", "tensorflow", "tensorflow-cpu", "keras", "jax"}),
}
"""Installed distributions (as adverts list them), any one of which can run the framework;
a framework missing here (unknown) is not checked."""


class MemoryEstimate(WireModel):
    """Bytes by component; `total_bytes` is their sum."""

    weights_bytes: int
    gradients_bytes: int = 0
    optimizer_bytes: int = 0
    activations_bytes: int = 0
    total_bytes: int


class Analysis(WireModel):
    """What `analyze` concludes; `--json` prints it as it is."""

    parameters: int | None
    complexity: Complexity
    dtype: str
    """The parameter dtype the memory is priced at."""
    bytes_per_parameter: int
    batch_size: int
    inference_batch_size: int
    sequence_length: int | None
    optimizer: Optimizer
    activation_method: Literal["layers", "fraction", "none"]
    """`layers`: summed layer widths; `fraction`: a fixed share of the weights; `none`:
    no activations (scikit-learn)."""
    inference: MemoryEstimate
    training: MemoryEstimate
    inference_bytes_by_dtype: dict[str, int]
    """Inference memory if the weights and activations were held in each of INFERENCE_DTYPES."""
    gpu_inference_bytes: int | None
    """None when the framework does not run on GPUs."""
    gpu_training_bytes: int | None
    gpu_recommended: bool
    cpu_cores: int
    dataset_size: int | None
    throughput_samples_per_s: float | None
    epoch_seconds: float | None
    """dataset_size / throughput; None when either is unknown."""
    notes: tuple[str, ...] = ()


def complexity_of(parameters: int | None) -> Complexity:
    """small < 1M ≤ medium < 100M ≤ large < 1B ≤ xlarge; unknown without a count."""
    if parameters is None:
        return Complexity.UNKNOWN
    for level, bound in COMPLEXITY_UPPER_BOUNDS:
        if parameters < bound:
            return level
    return Complexity.XLARGE


def analyze(
    info: ModelInfo,
    dataset_size: int | None = None,
    throughput_samples_per_s: float | None = None,
    *,
    batch_size: int = 32,
    inference_batch_size: int = 1,
    sequence_length: int | None = None,
    optimizer: Optimizer = Optimizer.ADAM,
) -> Analysis:
    """Resources `info`'s model needs; the module docstring gives the formulas.

    `sequence_length` multiplies the per-sample activations of a layer-summarised model
    (positions per sample: tokens for a transformer or an RNN); None counts one position.
    When the parameter count is unknown the weights are priced at the file size.
    """
    if batch_size < 1 or inference_batch_size < 1:
        raise ModelError("batch sizes must be at least 1")
    if sequence_length is not None and sequence_length < 1:
        raise ModelError("sequence_length must be at least 1")
    notes: list[str] = []
    dtype = parameter_dtype(info.dtypes)
    if not info.dtypes:
        notes.append(f"dtype unknown: priced as {DEFAULT_DTYPE}")
    width = DTYPE_BYTES[dtype]
    weights = _weights_bytes(info, width, notes)
    gradient_free = info.framework is Framework.SKLEARN
    method, per_sample_train, per_sample_infer = _activations(
        info, weights, width, sequence_length, gradient_free, notes
    )
    if gradient_free:
        training = MemoryEstimate(weights_bytes=weights, total_bytes=weights)
        notes.append("scikit-learn: training memory excludes the dataset, which dominates it")
    else:
        gradients = weights
        state = OPTIMIZER_STATE_COPIES[optimizer] * weights
        activations = batch_size * per_sample_train
        training = MemoryEstimate(
            weights_bytes=weights,
            gradients_bytes=gradients,
            optimizer_bytes=state,
            activations_bytes=activations,
            total_bytes=weights + gradients + state + activations,
        )
    inference_activations = inference_batch_size * per_sample_infer
    inference = MemoryEstimate(
        weights_bytes=weights,
        activations_bytes=inference_activations,
        total_bytes=weights + inference_activations,
    )
    by_dtype = {
        name: _rescale(inference.total_bytes, width, DTYPE_BYTES[name]) for name in INFERENCE_DTYPES
    }
    if info.framework is Framework.SKLEARN:
        by_dtype = {}
    on_gpu = info.framework in GPU_FRAMEWORKS
    complexity = complexity_of(info.parameters)
    epoch = _epoch_seconds(dataset_size, throughput_samples_per_s)
    return Analysis(
        parameters=info.parameters,
        complexity=complexity,
        dtype=dtype,
        bytes_per_parameter=width,
        batch_size=batch_size,
        inference_batch_size=inference_batch_size,
        sequence_length=sequence_length,
        optimizer=optimizer,
        activation_method=method,
        inference=inference,
        training=training,
        inference_bytes_by_dtype=by_dtype,
        gpu_inference_bytes=inference.total_bytes + CUDA_CONTEXT_BYTES if on_gpu else None,
        gpu_training_bytes=training.total_bytes + CUDA_CONTEXT_BYTES if on_gpu else None,
        gpu_recommended=on_gpu and complexity not in (Complexity.SMALL, Complexity.UNKNOWN),
        cpu_cores=CPU_CORES_BY_COMPLEXITY[complexity],
        dataset_size=dataset_size,
        throughput_samples_per_s=throughput_samples_per_s,
        epoch_seconds=epoch,
        notes=tuple(notes),
    )


def fits(
    info: ModelInfo, analysis: Analysis, hardware: Hardware, purpose: Purpose
) -> tuple[bool, str]:
    """Whether a node with `hardware` can host the model for `purpose`, and why, in numbers.

    Rules, in order: the node must have a distribution that runs the framework
    (FRAMEWORK_DISTRIBUTIONS); ONNX models are not trained; a GPU framework fits when one
    GPU's total memory holds the GPU need and the RAM holds the weights to load them;
    otherwise it fits on the CPU when the total RAM holds the whole need. Capacity is judged
    by totals, not by the free memory of the moment, which adverts report as a gauge.
    """
    if purpose == "training" and info.framework not in TRAINABLE_FRAMEWORKS:
        return False, f"{info.framework.value} models are inference-only"
    wanted = FRAMEWORK_DISTRIBUTIONS.get(info.framework)
    if wanted is not None and not wanted & hardware.frameworks.keys():
        return False, f"none of {', '.join(sorted(wanted))} installed"
    estimate = analysis.training if purpose == "training" else analysis.inference
    gpu_need = (
        analysis.gpu_training_bytes if purpose == "training" else analysis.gpu_inference_bytes
    )
    ram = hardware.memory.total_bytes
    gpu = _largest_gpu(hardware.gpus)
    if (
        gpu_need is not None
        and gpu is not None
        and gpu.memory_total_bytes >= gpu_need
        and ram >= estimate.weights_bytes
    ):
        return True, (
            f"GPU #{gpu.index} {gpu.name or 'gpu'}: {format_bytes(gpu.memory_total_bytes)} "
            f"≥ {format_bytes(gpu_need)} needed for {purpose}"
        )
    if ram >= estimate.total_bytes and ram > 0:
        where = "on CPU" if gpu is None or gpu_need is None else "on CPU (no GPU large enough)"
        return True, (
            f"{where}: {format_bytes(ram)} RAM ≥ {format_bytes(estimate.total_bytes)} "
            f"needed for {purpose}"
        )
    ram_text = f"RAM {format_bytes(ram)}" if ram else "RAM unknown"
    if gpu is not None and gpu_need is not None:
        if gpu.memory_total_bytes >= gpu_need:
            return False, (
                f"GPU #{gpu.index} would hold {format_bytes(gpu_need)} but {ram_text} < "
                f"{format_bytes(estimate.weights_bytes)} of weights to load"
            )
        gpu_text = f"largest GPU {format_bytes(gpu.memory_total_bytes)} < {format_bytes(gpu_need)}"
    else:
        gpu_text = "no GPU" if gpu_need is not None else "CPU only"
    return False, (
        f"needs {format_bytes(estimate.total_bytes)} for {purpose}: {gpu_text}, {ram_text}"
    )


def format_bytes(value: int | float) -> str:
    """1536 → `1.5 KiB` (binary units, one decimal)."""
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024:
            return f"{amount:.0f} B" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} TiB"


def _weights_bytes(info: ModelInfo, width: int, notes: list[str]) -> int:
    if info.framework is Framework.SKLEARN or info.parameters is None:
        if info.framework is not Framework.SKLEARN:
            notes.append("parameter count unknown: weights priced at the file size")
        return info.size_bytes
    return info.parameters * width


def _activations(
    info: ModelInfo,
    weights: int,
    width: int,
    sequence_length: int | None,
    gradient_free: bool,
    notes: list[str],
) -> tuple[Literal["layers", "fraction", "none"], int, int]:
    """(method, training bytes per sample, inference bytes per sample).

    `layers` (a summary with weight shapes and no convolution): each layer's output width
    w_l (features per position, `_output_width`) over n positions (`sequence_length`, else 1)
        training  a = SAVED_TENSORS_PER_LAYER · n · Σ w_l · b
        inference a = 2 · n · max w_l · b          (the widest layer's input and output)
    `fraction` otherwise: a = TRAINING_ACTIVATION_FRACTION · W for training and
    INFERENCE_ACTIVATION_FRACTION · W for inference.
    """
    if gradient_free:
        return "none", 0, 0
    widths = _layer_widths(info)
    if widths:
        positions = sequence_length or 1
        if sequence_length is None and info.family is Family.NLP:
            notes.append("activations counted for one token per sample: pass sequence_length")
        train = SAVED_TENSORS_PER_LAYER * positions * sum(widths) * width
        infer = 2 * positions * max(widths) * width
        return "layers", train, infer
    reason = "convolutions" if _has_conv(info.layers) else "no layer summary"
    notes.append(
        f"activations estimated as {TRAINING_ACTIVATION_FRACTION:g}x (training) and "
        f"{INFERENCE_ACTIVATION_FRACTION:g}x (inference) the weights per sample ({reason})"
    )
    return (
        "fraction",
        math.ceil(TRAINING_ACTIVATION_FRACTION * weights),
        math.ceil(INFERENCE_ACTIVATION_FRACTION * weights),
    )


def _layer_widths(info: ModelInfo) -> list[int]:
    """Output widths of the summarised layers; empty when they cannot be had."""
    if _has_conv(info.layers):
        return []
    keras_layout = info.framework in (Framework.KERAS, Framework.TENSORFLOW)
    return [w for layer in info.layers if (w := _output_width(layer, keras_layout)) is not None]


def _output_width(layer: LayerSummary, keras_layout: bool) -> int | None:
    """Features a layer emits per position, from its main weight's shape: torch and ONNX
    store (out, in), Keras (in, out); embeddings are (vocab, dim) in both; 1-D weights
    (norms) are their length."""
    shape = layer.shape
    if not shape or any(d <= 0 for d in shape):
        return None
    if len(shape) == 1:
        return shape[0]
    if keras_layout or "embedding" in layer.kind.lower():
        return shape[-1]
    return shape[0]


def _has_conv(layers: tuple[LayerSummary, ...]) -> bool:
    return any("conv" in layer.kind.lower() for layer in layers)


def _rescale(total: int, from_width: int, to_width: int) -> int:
    return total * to_width // from_width


def _largest_gpu(gpus: tuple[GpuInfo, ...]) -> GpuInfo | None:
    return max(gpus, key=lambda g: g.memory_total_bytes, default=None)


def _epoch_seconds(dataset_size: int | None, throughput: float | None) -> float | None:
    if dataset_size is None or throughput is None:
        return None
    if dataset_size < 0 or throughput <= 0:
        raise ModelError("dataset size must be ≥ 0 and throughput > 0 samples/s")
    return dataset_size / throughput
