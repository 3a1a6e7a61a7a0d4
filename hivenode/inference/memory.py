"""Whether a model may be loaded here now: its analysis against this node's free RAM."""

from __future__ import annotations

import psutil

from hivenode.inference.errors import Code, InferenceError
from hivenode.models.analysis import FRAMEWORK_DISTRIBUTIONS, analyze, fits, format_bytes
from hivenode.models.registry import ModelVersion
from hivenode.protocol.advert import Hardware


def available_ram() -> int:
    return int(psutil.virtual_memory().available)


def check_memory(
    version: ModelVersion,
    hardware: Hardware,
    available_bytes: int,
    max_batch: int,
    reserve_bytes: int,
) -> int:
    """The bytes serving `version` in batches of `max_batch` takes; InferenceError when this
    node cannot run its framework (unsupported_model) or cannot hold it (insufficient_memory),
    with the numbers that show why.

    Loading needs the weights twice for a moment (the file's tensors and the model's), then
    the analysis' inference total: weights plus the activations of a full batch. What is
    free now, less `reserve_bytes` for the rest of the node, must hold that."""
    info = version.info
    wanted = FRAMEWORK_DISTRIBUTIONS.get(info.framework)
    if wanted is not None and not wanted & hardware.frameworks.keys():
        raise InferenceError(
            Code.UNSUPPORTED_MODEL,
            f"{version.spec} is a {info.framework.value} model and none of "
            f"{', '.join(sorted(wanted))} is installed here",
        )
    analysis = analyze(info, inference_batch_size=max_batch)
    possible, reason = fits(info, analysis, hardware, "inference")
    if not possible:
        raise InferenceError(Code.INSUFFICIENT_MEMORY, f"{version.spec} cannot fit here: {reason}")
    serving = analysis.inference
    need = serving.total_bytes + serving.weights_bytes
    usable = available_bytes - reserve_bytes
    if need > usable:
        raise InferenceError(
            Code.INSUFFICIENT_MEMORY,
            f"{version.spec} needs {format_bytes(need)} to load and serve batches of "
            f"{max_batch} (weights {format_bytes(serving.weights_bytes)} twice while loading, "
            f"activations {format_bytes(serving.activations_bytes)}); "
            f"{format_bytes(max(available_bytes, 0))} RAM free less a "
            f"{format_bytes(reserve_bytes)} reserve leaves {format_bytes(max(usable, 0))}",
        )
    return need
