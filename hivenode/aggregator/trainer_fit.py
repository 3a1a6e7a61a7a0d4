"""Which of a job's dataset holders can train its model, judged from their adverts.

A trainer that holds the data but lacks the framework, or whose memory cannot hold the
model's training footprint (weights, gradients, optimizer state, a batch of activations:
`models.analysis`), would only fail the round or swap the volunteer's machine. It is left
out before the first round, with the reason in numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hivenode.aggregator.job_spec import JobSpec
from hivenode.models.analysis import Analysis, Optimizer, analyze, fits
from hivenode.models.info import Framework, ModelInfo
from hivenode.protocol.advert import Hardware

JOB_FRAMEWORKS = {
    "torch": Framework.TORCH,
    "keras": Framework.KERAS,
    "sklearn": Framework.SKLEARN,
    "hf": Framework.TRANSFORMERS,
}


def training_need(
    job: JobSpec, arrays: Mapping[str, np.ndarray[Any, Any]]
) -> tuple[ModelInfo, Analysis]:
    """The job's model as `models.analysis` prices it: its real parameter count and dtypes
    (from the initial arrays), trained with SGD at the job's batch size."""
    info = ModelInfo(
        format="job",
        framework=JOB_FRAMEWORKS[job.model.framework],
        architecture=job.model.name,
        parameters=sum(int(a.size) for a in arrays.values()),
        dtypes=tuple(sorted({str(a.dtype) for a in arrays.values()})),
    )
    return info, analyze(info, batch_size=job.train.batch_size, optimizer=Optimizer.SGD)


def split_by_fit(
    job: JobSpec,
    arrays: Mapping[str, np.ndarray[Any, Any]],
    trainers: Sequence[str],
    hardware: Mapping[str, Hardware | None],
) -> tuple[list[str], dict[str, str]]:
    """(trainers that fit, in their order; peer → why not, for the others).

    A trainer whose hardware is unknown (None: this node before its first probe) is kept:
    it is this process, which is running the job's code already."""
    info, analysis = training_need(job, arrays)
    kept: list[str] = []
    refused: dict[str, str] = {}
    for peer in trainers:
        known = hardware.get(peer)
        if known is None:
            kept.append(peer)
            continue
        ok, reason = fits(info, analysis, known, "training")
        if ok:
            kept.append(peer)
        else:
            refused[peer] = reason
    return kept, refused
