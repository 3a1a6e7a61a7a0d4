"""Resource analysis: hand-computed memory figures, torch's own byte counts, host fit."""

from __future__ import annotations

import math

import pytest

from hivenode.models.analysis import (
    CUDA_CONTEXT_BYTES,
    Complexity,
    Optimizer,
    analyze,
    complexity_of,
    fits,
)
from hivenode.models.dtypes import normalize_dtype, parameter_dtype
from hivenode.models.errors import ModelError
from hivenode.models.info import Family, Framework, LayerSummary, ModelInfo
from hivenode.protocol.advert import CpuInfo, GpuInfo, Hardware, MemoryInfo

GIB = 1024**3


def mlp_info(framework: Framework = Framework.TORCH, dtype: str = "float32") -> ModelInfo:
    """Linear(10→20) → Linear(20→5): 10·20+20 + 20·5+5 = 325 parameters."""
    kernel = (lambda o, i: (i, o)) if framework is Framework.KERAS else (lambda o, i: (o, i))
    return ModelInfo(
        format="torch_state_dict",
        framework=framework,
        architecture="mlp",
        parameters=325,
        dtypes=(dtype,),
        layers=(
            LayerSummary(name="fc1", kind="Linear", parameters=220, shape=kernel(20, 10)),
            LayerSummary(name="fc2", kind="Linear", parameters=105, shape=kernel(5, 20)),
        ),
    )


def resnet18_info() -> ModelInfo:
    return ModelInfo(
        format="torch_state_dict",
        framework=Framework.TORCH,
        family=Family.COMPUTER_VISION,
        architecture="resnet",
        parameters=11_689_512,
        dtypes=("float32", "int64"),  # int64: BatchNorm's num_batches_tracked
        layers=(LayerSummary(name="conv1", kind="Conv2d", parameters=9408, shape=(64, 3, 7, 7)),),
    )


def hardware(
    ram_gib: float = 32, gpu_gib: float | None = None, frameworks: tuple[str, ...] = ("torch",)
) -> Hardware:
    gpus = (
        ()
        if gpu_gib is None
        else (GpuInfo(index=0, name="Test GPU", memory_total_bytes=int(gpu_gib * GIB)),)
    )
    return Hardware(
        cpu=CpuInfo(logical_cores=8, affinity_cores=8),
        memory=MemoryInfo(total_bytes=int(ram_gib * GIB), available_bytes=int(ram_gib * GIB)),
        gpus=gpus,
        frameworks=dict.fromkeys(frameworks, "1.0"),
    )


# --- complexity and dtypes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        (0, Complexity.SMALL),
        (999_999, Complexity.SMALL),
        (1_000_000, Complexity.MEDIUM),
        (99_999_999, Complexity.MEDIUM),
        (100_000_000, Complexity.LARGE),
        (999_999_999, Complexity.LARGE),
        (1_000_000_000, Complexity.XLARGE),
        (None, Complexity.UNKNOWN),
    ],
)
def test_complexity_bins_follow_the_original_thresholds(
    parameters: int | None, expected: Complexity
) -> None:
    assert complexity_of(parameters) is expected


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("F32", "float32"),
        ("BF16", "bfloat16"),
        ("torch.float16", "float16"),
        ("half", "float16"),
        ("FLOAT", "float32"),
        ("I64", "int64"),
        ("complex_thing", None),
    ],
)
def test_dtype_names_of_every_framework_are_understood(name: str, canonical: str | None) -> None:
    assert normalize_dtype(name) == canonical


def test_parameters_are_priced_at_the_widest_floating_dtype_not_an_integer_buffer() -> None:
    assert parameter_dtype(("float32", "int64")) == "float32"
    assert parameter_dtype(("BF16", "F32")) == "float32"
    assert parameter_dtype(("int8",)) == "int8"
    assert parameter_dtype(()) == "float32"


# --- memory ------------------------------------------------------------------------------


def test_mlp_memory_matches_the_hand_computed_figures() -> None:
    analysis = analyze(mlp_info())

    # W = 325 params · 4 B; Adam keeps 2 copies; activations: widths 20 + 5, ×2 saved,
    # ×4 B, ×32 samples; inference: 2 · widest (20) · 4 B
    assert analysis.complexity is Complexity.SMALL
    assert analysis.activation_method == "layers"
    training = analysis.training
    assert training.weights_bytes == 1300
    assert training.gradients_bytes == 1300
    assert training.optimizer_bytes == 2600
    assert training.activations_bytes == 32 * 2 * 25 * 4 == 6400
    assert training.total_bytes == 11_600
    assert analysis.inference.activations_bytes == 2 * 20 * 4
    assert analysis.inference.total_bytes == 1460
    assert analysis.inference_bytes_by_dtype == {"float32": 1460, "float16": 730, "int8": 365}
    assert analysis.gpu_inference_bytes == 1460 + CUDA_CONTEXT_BYTES
    assert analysis.gpu_training_bytes == 11_600 + CUDA_CONTEXT_BYTES
    assert analysis.cpu_cores == 2
    assert analysis.gpu_recommended is False


@pytest.mark.parametrize(
    ("optimizer", "state_bytes"),
    [(Optimizer.ADAM, 2600), (Optimizer.ADAMW, 2600), (Optimizer.SGD_MOMENTUM, 1300),
     (Optimizer.SGD, 0)],
)  # fmt: skip
def test_optimizer_state_counts_the_copies_each_optimizer_keeps(
    optimizer: Optimizer, state_bytes: int
) -> None:
    training = analyze(mlp_info(), optimizer=optimizer).training

    assert training.optimizer_bytes == state_bytes
    assert training.total_bytes == 1300 + 1300 + state_bytes + 6400


def test_keras_kernels_are_read_as_in_by_out() -> None:
    torch_analysis = analyze(mlp_info(Framework.TORCH))
    keras_analysis = analyze(mlp_info(Framework.KERAS))

    assert keras_analysis.training == torch_analysis.training


def test_activations_scale_with_batch_size_and_sequence_length() -> None:
    info = ModelInfo(
        format="hf_directory",
        framework=Framework.TRANSFORMERS,
        family=Family.NLP,
        architecture="transformer",
        parameters=64_000 + 64 * 64,
        dtypes=("float32",),
        layers=(
            LayerSummary(name="wte", kind="Embedding", parameters=64_000, shape=(1000, 64)),
            LayerSummary(name="proj", kind="Linear", parameters=64 * 64, shape=(64, 64)),
        ),
    )

    one_token = analyze(info, batch_size=1)
    long = analyze(info, batch_size=8, sequence_length=128)

    # an embedding emits its dim (64), not its vocabulary (1000)
    assert one_token.training.activations_bytes == 2 * (64 + 64) * 4
    assert long.training.activations_bytes == 8 * 128 * 2 * (64 + 64) * 4
    assert long.inference.activations_bytes == 128 * 2 * 64 * 4
    assert any("sequence_length" in note for note in one_token.notes)


def test_convnets_use_the_stated_fraction_of_the_weights() -> None:
    analysis = analyze(resnet18_info())

    weights = 11_689_512 * 4
    assert analysis.dtype == "float32"
    assert analysis.activation_method == "fraction"
    assert analysis.training.activations_bytes == 32 * (weights // 2)
    assert analysis.training.total_bytes == 4 * weights + 32 * (weights // 2) == 935_160_960
    assert analysis.inference.total_bytes == weights + math.ceil(0.1 * weights) == 51_433_853
    assert analysis.complexity is Complexity.MEDIUM
    assert analysis.cpu_cores == 4
    assert analysis.gpu_recommended is True
    assert any("convolutions" in note for note in analysis.notes)


def test_half_precision_weights_take_two_bytes_each() -> None:
    info = ModelInfo(
        format="safetensors", framework=Framework.SAFETENSORS, parameters=1000, dtypes=("BF16",)
    )

    analysis = analyze(info, batch_size=1, optimizer=Optimizer.SGD)

    assert analysis.bytes_per_parameter == 2
    assert analysis.training.weights_bytes == 2000
    assert analysis.training.total_bytes == 2000 + 2000 + 1000  # no summary: 0.5·W per sample


def test_sklearn_needs_its_size_and_no_gpu() -> None:
    info = ModelInfo(
        format="sklearn_pickle",
        framework=Framework.SKLEARN,
        family=Family.TABULAR,
        architecture="tree_based",
        size_bytes=5000,
    )

    analysis = analyze(info)

    assert analysis.training.total_bytes == analysis.inference.total_bytes == 5000
    assert analysis.training.gradients_bytes == analysis.training.optimizer_bytes == 0
    assert analysis.activation_method == "none"
    assert analysis.gpu_training_bytes is None and analysis.gpu_inference_bytes is None
    assert analysis.complexity is Complexity.UNKNOWN


def test_unknown_parameter_count_prices_the_file_size() -> None:
    info = ModelInfo(format="onnx", framework=Framework.ONNX, size_bytes=4096)

    analysis = analyze(info, batch_size=1)

    assert analysis.inference.weights_bytes == 4096
    assert any("file size" in note for note in analysis.notes)


def test_epoch_time_is_dataset_over_throughput_and_unknown_without_either() -> None:
    assert analyze(mlp_info(), 50_000, 250.0).epoch_seconds == 200.0
    assert analyze(mlp_info(), 50_000, None).epoch_seconds is None
    assert analyze(mlp_info(), None, 250.0).epoch_seconds is None
    with pytest.raises(ModelError, match="throughput"):
        analyze(mlp_info(), 10, 0.0)
    with pytest.raises(ModelError, match="batch"):
        analyze(mlp_info(), batch_size=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_gradients_and_adam_state_match_what_torch_allocates(dtype: str) -> None:
    import torch

    model = torch.nn.Sequential(
        torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 5)
    ).to(getattr(torch, dtype))
    info = ModelInfo(
        format="torch_state_dict",
        framework=Framework.TORCH,
        parameters=sum(p.numel() for p in model.parameters()),
        dtypes=(dtype,),
    )
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 10, dtype=getattr(torch, dtype))).sum().backward()
    optimizer.step()

    training = analyze(info).training

    assert training.weights_bytes == sum(p.nbytes for p in model.parameters())
    assert training.gradients_bytes == sum(p.grad.nbytes for p in model.parameters())
    state = [t for s in optimizer.state.values() for t in s.values() if t.dim() > 0]
    assert training.optimizer_bytes == sum(t.nbytes for t in state)


# --- host fit ----------------------------------------------------------------------------


def test_a_gpu_large_enough_hosts_training_and_says_so() -> None:
    info = resnet18_info()
    analysis = analyze(info)

    ok, reason = fits(info, analysis, hardware(gpu_gib=16), "training")

    assert ok
    assert "GPU #0 Test GPU: 16.0 GiB" in reason and "1.4 GiB needed for training" in reason


def test_a_small_gpu_falls_back_to_cpu_when_ram_is_enough() -> None:
    info = resnet18_info()
    analysis = analyze(info)

    ok, reason = fits(info, analysis, hardware(ram_gib=32, gpu_gib=1), "training")

    assert ok
    assert reason.startswith("on CPU (no GPU large enough): 32.0 GiB RAM ≥ 891.8 MiB")


def test_too_little_memory_is_refused_with_both_numbers() -> None:
    info = resnet18_info()
    analysis = analyze(info)

    ok, reason = fits(info, analysis, hardware(ram_gib=0.5, gpu_gib=1), "training")

    assert not ok
    assert reason == "needs 891.8 MiB for training: largest GPU 1.0 GiB < 1.4 GiB, RAM 512.0 MiB"


def test_a_big_gpu_still_needs_the_ram_to_load_the_weights() -> None:
    info = resnet18_info()
    analysis = analyze(info)

    ok, reason = fits(info, analysis, hardware(ram_gib=0.03, gpu_gib=80), "inference")

    assert not ok
    assert "of weights to load" in reason


def test_a_node_without_the_framework_cannot_host_it() -> None:
    info = resnet18_info()

    ok, reason = fits(info, analyze(info), hardware(frameworks=("scikit-learn",)), "inference")

    assert not ok
    assert reason == "none of torch installed"


def test_onnx_models_are_served_not_trained() -> None:
    info = ModelInfo(format="onnx", framework=Framework.ONNX, parameters=1000, dtypes=("FLOAT",))
    analysis = analyze(info)
    node = hardware(frameworks=("onnxruntime",))

    assert fits(info, analysis, node, "inference")[0]
    assert fits(info, analysis, node, "training") == (False, "onnx models are inference-only")


def test_sklearn_runs_on_the_cpu_even_where_a_gpu_is() -> None:
    info = ModelInfo(format="joblib", framework=Framework.SKLEARN, size_bytes=2048)

    ok, reason = fits(
        info, analyze(info), hardware(gpu_gib=16, frameworks=("scikit-learn",)), "training"
    )

    assert ok
    assert reason == "on CPU: 32.0 GiB RAM ≥ 2.0 KiB needed for training"
