"""Where a model's replicas go: workers whose hardware holds it, least loaded first.

A pure function of what the adverts say (tested without a network); `deploy.py` acts on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from hivenode.inference.errors import Code, InferenceError
from hivenode.inference.wire import name_of
from hivenode.models.analysis import analyze, fits
from hivenode.models.registry import ModelVersion
from hivenode.protocol.advert import Hardware, Load


@dataclass(frozen=True)
class WorkerView:
    """One inference worker as its advert shows it."""

    peer_id: str
    hardware: Hardware
    load: Load = field(default_factory=Load)
    models: tuple[str, ...] = ()
    queue: int = 0


@dataclass(frozen=True)
class Placement:
    chosen: tuple[str, ...]
    """Workers to deploy to, best first."""
    already: tuple[str, ...]
    """Workers that serve a model of this name already; they count as replicas."""
    refused: dict[str, str] = field(default_factory=dict)
    """Workers that cannot hold it, and why, in numbers."""


def load_score(worker: WorkerView) -> tuple[float, ...]:
    """Lower is less loaded: requests queued, CPU busy, models served, then more free RAM."""
    return (
        float(worker.queue),
        worker.load.cpu_percent,
        float(len(worker.models)),
        -float(worker.hardware.memory.available_bytes),
    )


def plan_placement(
    version: ModelVersion, workers: Sequence[WorkerView], replicas: int, max_batch: int
) -> Placement:
    """Up to `replicas` workers for `version`, counting those that serve its name already:
    of the workers whose hardware holds it (`analysis.fits` on totals, priced at batches of
    `max_batch`), the least loaded (`load_score`). InferenceError(insufficient_memory) with
    each worker's numbers when none can hold it."""
    if replicas < 1:
        raise InferenceError(Code.BAD_INPUT, "replicas must be at least 1")
    analysis = analyze(version.info, inference_batch_size=max_batch)
    already = tuple(w.peer_id for w in workers if any(name_of(m) == version.name for m in w.models))
    refused: dict[str, str] = {}
    fitting: list[WorkerView] = []
    for worker in workers:
        if worker.peer_id in already:
            continue
        possible, reason = fits(version.info, analysis, worker.hardware, "inference")
        if possible:
            fitting.append(worker)
        else:
            refused[worker.peer_id] = reason
    wanted = max(0, replicas - len(already))
    if wanted and not fitting and not already:
        shown = "; ".join(f"{peer[-8:]}: {why}" for peer, why in list(refused.items())[:3])
        more = f" (and {len(refused) - 3} more)" if len(refused) > 3 else ""
        raise InferenceError(
            Code.INSUFFICIENT_MEMORY,
            f"no worker can hold {version.spec} "
            f"({len(workers)} inference workers known){': ' if shown else ''}{shown}{more}",
        )
    chosen = tuple(w.peer_id for w in sorted(fitting, key=load_score)[:wanted])
    return Placement(chosen=chosen, already=already, refused=refused)
