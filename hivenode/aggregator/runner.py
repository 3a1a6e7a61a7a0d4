"""The aggregator role: runs one federated job with a Flower strategy over the swarm.

`Strategy.start` is Flower's own round loop, unchanged; it runs in a worker thread and talks
to trainers through `SwarmGrid`. Flower calls `evaluate_fn` after every round: that is where
the round's record is made (Flower's aggregated metrics plus the Grid's traffic) and the
checkpoint written. A restarted job resumes from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import trio
from flwr.app import ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore.task_identity import TaskIdentity

from hivenode.agent.flower_wire import node_id_of
from hivenode.agent.node import Node
from hivenode.aggregator.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from hivenode.aggregator.grid import GridError, JobAddress, RoundTraffic, SwarmGrid
from hivenode.aggregator.job_spec import JobSpec
from hivenode.aggregator.strategy_factory import JobStrategy, build_job_strategy
from hivenode.aggregator.trainer_fit import split_by_fit
from hivenode.fsutil import atomic_write
from hivenode.models.flower_arrays import arrayrecord_to_numpy, numpy_to_array
from hivenode.models.training.backend import backend_for
from hivenode.privacy.accountant import PrivacySpent
from hivenode.protocol.advert import DatasetInfo, Hardware, Role
from hivenode.protocol.ids import BUILTIN_APP
from hivenode.strategies.scaffold import Scaffold

log = logging.getLogger(__name__)

NDArray = np.ndarray[Any, Any]
TRAINER_WAIT_S = 30.0
"""How long a job waits for `min_clients` trainers to show up in the peer table."""
TRAINER_SETTLE_S = 3.0
"""Adverts arrive over a few seconds: a job waits this long after the last new trainer."""


class JobError(Exception):
    """A job that cannot start or run: no trainers, mismatched data, a failed round loop."""


@dataclass(frozen=True)
class RoundRecord:
    round: int
    train_loss: float | None
    eval_loss: float | None
    eval_accuracy: float | None
    global_train_loss: float | None
    participants: int
    stragglers: int
    failures: int
    bytes_out: int
    bytes_in: int
    duration_s: float
    compute_s: float = 0.0
    """The slowest trainer's time in train plus in evaluate: the rest is the round's overhead."""
    selected: tuple[int, ...] = ()
    """Partition ids of the trainers sampled for training, as the strategy chose them."""
    rejected: int = 0
    """Train replies the update screen rejected (neither participants nor failures)."""
    epsilon: float | None = None
    """A DP job's privacy spent so far, ε at the job's δ (`JobResult.privacy` says how)."""

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RoundRecord:
        return cls(**{**raw, "selected": tuple(raw.get("selected", ()))})


@dataclass
class JobResult:
    name: str
    strategy: str
    trainers: list[str]
    history: list[RoundRecord]
    model_path: Path
    wall_s: float
    resumed_from: int = 0
    params: int = 0
    privacy: PrivacySpent | None = None
    """A DP job's privacy spent over all its rounds; None without DP."""

    @property
    def final(self) -> RoundRecord | None:
        return self.history[-1] if self.history else None


RoundCallback = Callable[[RoundRecord], None]
Replicate = Callable[[Checkpoint], Awaitable[None]]
"""Hands a round's checkpoint to the job's standbys; the next round waits for it."""


@dataclass
class _Recorder:
    """Flower's aggregated metrics of the round in progress (its aggregation, not ours)."""

    train: MetricRecord | None = None
    evaluate: MetricRecord | None = None
    history: list[RoundRecord] = field(default_factory=list)

    def on_train(self, contents: list[RecordDict], key: str) -> MetricRecord:
        self.train = aggregate_metricrecords(contents, key)
        return self.train

    def on_evaluate(self, contents: list[RecordDict], key: str) -> MetricRecord:
        self.evaluate = aggregate_metricrecords(contents, key)
        return self.evaluate


def select_trainers(node: Node, job: JobSpec) -> tuple[list[str], DatasetInfo | None]:
    """Peers (and this node) advertising the trainer role and the job's dataset: the job's
    own list in its order, or all of them by peer id."""
    found: dict[str, DatasetInfo] = {}
    for entry in node.peer_table.entries():
        advert = entry.advert
        if Role.TRAINER not in advert.roles:
            continue
        for info in advert.datasets:
            if info.name == job.dataset:
                found[advert.origin] = info
    if node.trainer is not None:
        for info in node.trainer.datasets():
            if info.name == job.dataset:
                found[node.peer_id] = info
    # the job's order is the partition ids' order: a listed trainer keeps its index
    peers = [p for p in job.trainers if p in found] if job.trainers else sorted(found)
    return peers, found[peers[0]] if peers else None


async def wait_for_trainers(
    node: Node, job: JobSpec, timeout: float
) -> tuple[list[str], DatasetInfo]:
    """The job's trainers: the listed ones once all are seen, else every trainer with the
    dataset once at least `min_clients` are seen and no new one came for `TRAINER_SETTLE_S`."""
    needed = len(job.trainers) or job.min_clients
    settled_at: float | None = None
    seen = 0
    with trio.move_on_after(timeout):
        while True:
            peers, info = select_trainers(node, job)
            now = time.monotonic()
            if len(peers) != seen:
                seen, settled_at = len(peers), now
            enough = info is not None and len(peers) >= needed
            if enough and (job.trainers or now - (settled_at or now) >= TRAINER_SETTLE_S):
                assert info is not None
                return peers, info
            await trio.sleep(0.2)
    raise JobError(
        f"{seen} trainer(s) hold dataset {job.dataset!r} after {timeout:.0f} s; "
        f"the job needs {needed}"
    )


async def wait_for_former(
    node: Node, job: JobSpec, former: Sequence[str], timeout: float
) -> tuple[list[str], DatasetInfo]:
    """A resumed job's trainers: the ones it had, in their order (their partition ids), once
    all are back; after `timeout`, those back if they are at least `min_clients` (a restart
    of the whole swarm brings them back one by one: taking the first would shrink the job)."""
    listed = job.model_copy(update={"trainers": list(former)})
    peers: list[str] = []
    info: DatasetInfo | None = None
    with trio.move_on_after(timeout):
        while True:
            peers, info = select_trainers(node, listed)
            if len(peers) == len(former):
                break
            await trio.sleep(0.2)
    if info is None or len(peers) < job.min_clients:
        raise JobError(
            f"{len(peers)} of the job's {len(former)} trainers came back within "
            f"{timeout:.0f} s; it needs {job.min_clients}"
        )
    if len(peers) < len(former):
        log.warning("job %s resumes with %d of its %d trainers", job.name, len(peers), len(former))
    return peers, info


async def run_job(
    node: Node,
    job: JobSpec,
    job_dir: Path,
    *,
    on_round: RoundCallback | None = None,
    trainer_wait_s: float = TRAINER_WAIT_S,
    replicate: Replicate | None = None,
) -> JobResult:
    """Run `job` to its last round from this node, resuming from `job_dir`'s checkpoint.

    `replicate(checkpoint)` is awaited after every round, before the next one starts: a
    standby that holds each round when it ends loses no finished round if this node dies
    (`hivenode.aggregator.replication`). It must not raise; it costs the round its time."""
    started = time.monotonic()
    checkpoint = await trio.to_thread.run_sync(load_checkpoint, job_dir)
    if checkpoint is not None and checkpoint.trainers and not job.trainers:
        trainers, info = await wait_for_former(node, job, checkpoint.trainers, trainer_wait_s)
    else:
        trainers, info = await wait_for_trainers(node, job, trainer_wait_s)
    check_same_data(node, job, trainers)
    done = checkpoint.round if checkpoint else 0
    if checkpoint is not None:
        arrays = checkpoint.arrays
        log.info("job %s: resuming after round %d of %d", job.name, done, job.rounds)
    else:
        arrays = await trio.to_thread.run_sync(initial_arrays, job, info)
    trainers = fitting_trainers(node, job, trainers, arrays)
    recorder = _Recorder(
        history=[RoundRecord.from_json(r) for r in (checkpoint.history if checkpoint else [])]
    )
    privacy: PrivacySpent | None = None
    if done < job.rounds:
        arrays, privacy = await _run_rounds(
            node, job, job_dir, trainers, arrays, checkpoint, recorder, on_round, replicate
        )
    model_path = job_dir / "model.safetensors"
    await trio.to_thread.run_sync(save_model, job, arrays, model_path, info)
    return JobResult(
        name=job.name,
        strategy=job.strategy.name,
        trainers=trainers,
        history=recorder.history,
        model_path=model_path,
        wall_s=time.monotonic() - started,
        resumed_from=done,
        params=sum(int(a.size) for a in arrays.values()),
        privacy=privacy,
    )


async def _run_rounds(
    node: Node,
    job: JobSpec,
    job_dir: Path,
    trainers: list[str],
    arrays: dict[str, NDArray],
    checkpoint: Checkpoint | None,
    recorder: _Recorder,
    on_round: RoundCallback | None,
    replicate: Replicate | None = None,
) -> tuple[dict[str, NDArray], PrivacySpent | None]:
    done = checkpoint.round if checkpoint else 0
    control = checkpoint.control if checkpoint else None
    built = build_job_strategy(
        job,
        len(trainers),
        recorder.on_train,
        recorder.on_evaluate,
        initial_control=_record_of(control) if control is not None else None,
        max_weight=_max_examples(node, job, trainers),
    )
    strategy = built.strategy
    if built.accountant is not None:
        # a resumed job's finished rounds were released: each counts (an upper bound)
        built.accountant.compose(done)
    token = trio.lowlevel.current_trio_token()
    # checkpoints are written while the next round runs; a round is reported once it is on
    # disk, so what a job says it has done is what it would resume from
    to_writer, from_strategy = trio.open_memory_channel[tuple[Checkpoint, RoundRecord]](math.inf)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_write_checkpoints, job_dir, from_strategy, on_round)
        grid = SwarmGrid(
            node,
            JobAddress(job.name, BUILTIN_APP),
            trainers,
            token,
            nursery,
            run_id=run_id_of(job.name),
            round_offset=done,
            drop_stragglers=job.straggler_policy == "drop",
            local=node.trainer.handle if node.trainer else None,
            seed=job.seed,
            min_available=job.min_clients,
            short_wait_s=job.deadline_s,
            # secure aggregation hides the individual updates the screen would judge
            screen_factor=(
                job.update_norm_factor if job.screen_updates and built.secagg is None else None
            ),
        )
        round_started = [time.monotonic()]

        def after_round(server_round: int, round_arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0:
                return None
            number = server_round + done
            train = grid.traffic.get((number, MessageType.TRAIN), RoundTraffic())
            evaluate = grid.traffic.get((number, MessageType.EVALUATE), RoundTraffic())
            elapsed = time.monotonic() - round_started[0]
            record = _private_record(
                _round_record(number, recorder, train, evaluate, elapsed), built
            )
            recorder.history.append(record)
            recorder.train = recorder.evaluate = None
            scaffold_control = strategy.control if isinstance(strategy, Scaffold) else None
            checkpoint = Checkpoint(
                number,
                {k: np.asarray(v) for k, v in arrayrecord_to_numpy(round_arrays).items()},
                scaffold_control,
                [r.as_json() for r in recorder.history],
                list(trainers),
            )
            trio.from_thread.run_sync(to_writer.send_nowait, (checkpoint, record), trio_token=token)
            if replicate is not None:
                trio.from_thread.run(replicate, checkpoint, trio_token=token)
            grid.round = number + 1
            round_started[0] = time.monotonic()
            return None

        def start() -> ArrayRecord:
            _set_task_identity(node, job)
            result = strategy.start(
                grid=grid,
                initial_arrays=_record_of(arrays),
                num_rounds=job.rounds - done,
                timeout=job.deadline_s,
                train_config=ConfigRecord(job.train_config()),
                evaluate_config=ConfigRecord(job.evaluate_config()),
                evaluate_fn=after_round,
            )
            return result.arrays

        stopped: GridError | None = None
        try:
            final = await trio.to_thread.run_sync(start)
        except GridError as exc:  # raised past the nursery, not from inside it (a group)
            stopped, final = exc, ArrayRecord()
        finally:
            await grid.aclose()
            to_writer.close()  # the writer finishes what is queued, then the nursery closes
    if stopped is not None:
        raise JobError(f"job {job.name} stopped: {stopped}") from stopped
    privacy = built.accountant.spent() if built.accountant is not None else None
    if not len(final):
        return arrays, privacy
    return {k: np.asarray(v) for k, v in arrayrecord_to_numpy(final).items()}, privacy


def _private_record(record: RoundRecord, built: JobStrategy) -> RoundRecord:
    """The round's record as privacy changes it: ε so far; under SecAgg+, the trainers
    whose update is in the sum (its four stages are all train messages to the Grid)."""
    if built.accountant is not None:
        record = replace(record, epsilon=built.accountant.spent().epsilon)
    if built.secagg is not None and built.secagg.history:
        last = built.secagg.history[-1]
        record = replace(
            record,
            participants=last.survivors,
            failures=len(last.sampled) - last.survivors,
            selected=tuple(sorted(set(record.selected))),
        )
    return record


def _max_examples(node: Node, job: JobSpec, trainers: Sequence[str]) -> float:
    """The most examples a trainer advertises for the job's dataset (SecAgg+'s weight bound)."""
    sizes = [info.samples for p in trainers if (info := _dataset_of(node, p, job.dataset))]
    return float(max(sizes, default=0) or 10_000)


async def _write_checkpoints(
    job_dir: Path,
    checkpoints: trio.MemoryReceiveChannel[tuple[Checkpoint, RoundRecord]],
    on_round: RoundCallback | None,
) -> None:
    async with checkpoints:
        async for checkpoint, record in checkpoints:
            await trio.to_thread.run_sync(save_checkpoint, job_dir, checkpoint)
            if on_round is not None:
                on_round(record)


def _round_record(
    number: int,
    recorder: _Recorder,
    train: RoundTraffic,
    evaluate: RoundTraffic,
    duration_s: float,
) -> RoundRecord:
    return RoundRecord(
        round=number,
        train_loss=_metric(recorder.train, "train-loss"),
        eval_loss=_metric(recorder.evaluate, "eval-loss"),
        eval_accuracy=_metric(recorder.evaluate, "eval-accuracy"),
        global_train_loss=_metric(recorder.evaluate, "global-train-loss"),
        participants=train.replied,
        stragglers=train.stragglers,
        failures=train.failed,
        bytes_out=train.bytes_out + evaluate.bytes_out,
        bytes_in=train.bytes_in + evaluate.bytes_in,
        duration_s=duration_s,
        compute_s=train.compute_s + evaluate.compute_s,
        selected=tuple(sorted(train.selected)),
        rejected=len(train.rejected),
    )


def _metric(record: MetricRecord | None, key: str) -> float | None:
    value = record.get(key) if record is not None else None
    return float(value) if isinstance(value, int | float) else None


def _record_of(arrays: dict[str, NDArray]) -> ArrayRecord:
    return ArrayRecord({k: numpy_to_array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def initial_arrays(job: JobSpec, info: DatasetInfo | None) -> dict[str, NDArray]:
    if info is None or not info.feature_shape or info.num_classes < 2:
        raise JobError(f"dataset {job.dataset!r} is advertised without its shape or classes")
    spec = job.model.spec()
    return backend_for(spec.framework).init_arrays(
        spec, tuple(info.feature_shape), info.num_classes, job.seed
    )


def fitting_trainers(
    node: Node, job: JobSpec, trainers: list[str], arrays: dict[str, NDArray]
) -> list[str]:
    """The trainers whose advertised hardware can train the model; JobError when fewer than
    the job needs remain (a listed trainer that cannot is an error too)."""
    hardware = {
        peer: node.hardware if peer == node.peer_id else _advert_hardware(node, peer)
        for peer in trainers
    }
    kept, refused = split_by_fit(job, arrays, trainers, hardware)
    for peer, reason in refused.items():
        log.warning("job %s: trainer %s left out: %s", job.name, peer, reason)
    needed = len(job.trainers) or job.min_clients
    if len(kept) < needed:
        why = "; ".join(f"{peer[-8:]}: {reason}" for peer, reason in refused.items())
        raise JobError(
            f"{len(kept)} of {len(trainers)} trainer(s) can train this model, the job needs "
            f"{needed} ({why})"
        )
    return kept


def _advert_hardware(node: Node, peer: str) -> Hardware | None:
    entry = node.peer_table.get(peer)
    return entry.advert.hardware if entry else None


def check_same_data(node: Node, job: JobSpec, trainers: Sequence[str]) -> None:
    shapes: dict[tuple[tuple[int, ...], int], list[str]] = {}
    for peer in trainers:
        info = _dataset_of(node, peer, job.dataset)
        if info is not None:
            shapes.setdefault((tuple(info.feature_shape), info.num_classes), []).append(peer)
    if len(shapes) > 1:
        described = "; ".join(f"{s} classes {c}: {len(p)} trainers" for (s, c), p in shapes.items())
        raise JobError(f"trainers disagree on dataset {job.dataset!r}: {described}")


def _dataset_of(node: Node, peer: str, name: str) -> DatasetInfo | None:
    if peer == node.peer_id:
        infos = node.trainer.datasets() if node.trainer else ()
    else:
        entry = node.peer_table.get(peer)
        infos = entry.advert.datasets if entry else ()
    return next((info for info in infos if info.name == name), None)


def _set_task_identity(node: Node, job: JobSpec) -> None:
    # Flower 1.4x's Message() reads the sender from this process-global identity
    TaskIdentity.run_id = run_id_of(job.name)
    TaskIdentity.node_id = node_id_of(node.peer_id)
    TaskIdentity.task_id = 1


def run_id_of(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1


def save_model(
    job: JobSpec, arrays: dict[str, NDArray], path: Path, info: DatasetInfo | None = None
) -> None:
    from safetensors.numpy import save

    from hivenode.models.training.backend import INPUT_SHAPE_KEY, MODEL_SPEC_KEY, NUM_CLASSES_KEY

    metadata = {MODEL_SPEC_KEY: json.dumps(job.model.model_dump()), "job": job.name}
    if info is not None and info.feature_shape:  # what an inference worker's input is
        metadata[INPUT_SHAPE_KEY] = json.dumps(list(info.feature_shape))
        metadata[NUM_CLASSES_KEY] = str(info.num_classes)
    contiguous = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    atomic_write(path, save(contiguous, metadata=metadata), mode=0o644)
