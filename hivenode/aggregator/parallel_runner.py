"""Runs a job whose spec has a `[parallel]` section: data-, pipeline- or model-parallel
training on the trainers that hold its dataset, coordinated from this node.

The coordinator picks the members as a federated job picks its trainers (the dataset, the
hardware fit), sends each its order (`protocol/parallel_job.py`: rank, model, settings),
then polls one member for the steps done: the first replica (data), the last stage (its
loss). Each step becomes one RoundRecord, so `jobs watch|show` read a parallel job as they
read a federated one: round = step. At the end it collects the weights (any replica's: all
replicas hold the same; each stage's own layers, under the whole model's names), saves them
as the job's model.safetensors and averages the replicas' accuracies on their test splits.

A data-parallel member that dies is left out by the others' all-reduce and the job goes on;
if it was the one polled, the next member is polled. A job interrupted with its coordinator
restarts from step 0 (members do not checkpoint yet).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import trio

from hivenode.agent import rpc
from hivenode.agent.errors import RpcError
from hivenode.agent.node import Node
from hivenode.aggregator.job_spec import JobSpec, ParallelSection
from hivenode.aggregator.runner import (
    TRAINER_WAIT_S,
    JobError,
    JobResult,
    RoundCallback,
    RoundRecord,
    check_same_data,
    fitting_trainers,
    initial_arrays,
    save_model,
    wait_for_trainers,
)
from hivenode.protocol.advert import DatasetInfo
from hivenode.protocol.ids import PARALLEL_JOB_PROTOCOL
from hivenode.protocol.limits import CONTROL_LIMITS, DEFAULT_LIMITS
from hivenode.protocol.parallel_job import FAILED, FINISHED, START, STATUS, JobOrder

log = logging.getLogger(__name__)

POLL_S = 0.5
MAX_MISSES = 3
REQUEST_TIMEOUT_S = 30.0

NDArray = np.ndarray[Any, Any]


async def run_parallel_job(
    node: Node,
    job: JobSpec,
    job_dir: Path,
    *,
    on_round: RoundCallback | None = None,
    trainer_wait_s: float = TRAINER_WAIT_S,
) -> JobResult:
    """Train `job` peer to peer from start to end; JobError when it cannot."""
    section = job.parallel
    if section is None or section.mode == "auto":
        raise JobError(f"job {job.name} has no [parallel] mode to run (auto: resolve it first)")
    started = time.monotonic()
    trainers, info = await wait_for_trainers(node, job, trainer_wait_s)
    check_same_data(node, job, trainers)
    arrays = await trio.to_thread.run_sync(initial_arrays, job, info)
    # the coordinator only coordinates: its requests go over libp2p, which does not dial itself
    others = [peer for peer in trainers if peer != node.peer_id]
    members = _members(section, fitting_trainers(node, job, others, arrays))
    run_id = f"{job.name}-{secrets.token_hex(4)}"
    orders = [_order(job, section, info, members, rank, run_id) for rank in range(len(members))]
    async with trio.open_nursery() as nursery:
        for order in orders:
            nursery.start_soon(_start, node, order)
    log.info("job %s: %s parallel on %d members (%s)", job.name, section.mode, len(members), run_id)
    history, finals = await _follow(node, section, members, run_id, job.rounds, on_round)
    weights, accuracy = _collect(section, finals)
    if set(weights) != set(arrays):
        lost = sorted(set(arrays) - set(weights))
        raise JobError(f"the job ended without the weights of {', '.join(lost)} (a stage died)")
    if history:  # the last step was held back for the accuracy measured after it
        history[-1] = replace(history[-1], eval_accuracy=accuracy)
        if on_round is not None:
            on_round(history[-1])
    model_path = job_dir / "model.safetensors"
    await trio.to_thread.run_sync(save_model, job, weights, model_path, info)
    return JobResult(
        name=job.name,
        strategy=f"{section.mode}-parallel",
        trainers=members,
        history=history,
        model_path=model_path,
        wall_s=time.monotonic() - started,
        params=sum(int(a.size) for a in weights.values()),
    )


def _members(section: ParallelSection, trainers: list[str]) -> list[str]:
    """The members: replicas (data); or stages, spares and the member that keeps the
    checkpoints and directs fail-overs (pipeline/model with spares)."""
    extra = section.spares + 1 if section.spares else 0
    wanted = section.nodes or len(trainers) - extra
    least = 2 if section.mode == "data" else 1
    if len(trainers) < max(wanted, least) + extra or wanted < least:
        more = f", {section.spares} spare(s) and a checkpoint keeper" if extra else ""
        raise JobError(
            f"{section.mode} parallelism over {max(wanted, least)} nodes{more}, but "
            f"{len(trainers)} trainer(s) can take part"
        )
    return trainers[: wanted + extra]


def _order(
    job: JobSpec,
    section: ParallelSection,
    info: DatasetInfo,
    members: list[str],
    rank: int,
    run_id: str,
) -> JobOrder:
    return JobOrder(
        job=run_id,
        mode=section.mode,
        members=tuple(members),
        rank=rank,
        dataset=job.dataset,
        model=job.model.name,
        options=dict(job.model.options),
        feature_shape=tuple(info.feature_shape),
        num_classes=info.num_classes,
        seed=job.seed,
        steps=job.rounds,
        batch_size=job.train.batch_size,
        lr=job.train.lr,
        momentum=section.momentum,
        micro_batches=section.micro_batches,
        peer_timeout=section.peer_timeout_s,
        compression=section.compression,
        stages=len(members) - section.spares - 1 if section.spares else 0,
    )


async def _start(node: Node, order: JobOrder) -> None:
    peer = order.members[order.rank]
    node.make_dialable(peer)
    try:
        await rpc.request(
            node.swarm.host,
            peer,
            PARALLEL_JOB_PROTOCOL,
            START,
            order.to_body(),
            timeout=REQUEST_TIMEOUT_S,
            limits=CONTROL_LIMITS,
        )
    except RpcError as exc:
        raise JobError(f"member {order.rank} ({peer[-8:]}) did not start: {exc}") from exc


async def _status(
    node: Node, peer: str, run_id: str, since: int, weights: bool = False
) -> tuple[dict[str, Any], dict[str, NDArray]]:
    reply = await rpc.request(
        node.swarm.host,
        peer,
        PARALLEL_JOB_PROTOCOL,
        STATUS,
        {"job": run_id, "since": since, "weights": weights},
        timeout=REQUEST_TIMEOUT_S,
        limits=DEFAULT_LIMITS,
    )
    body = dict(reply.body)
    names = body.get("names") or []
    if len(names) != len(reply.tensors) or not all(isinstance(n, str) for n in names):
        raise JobError(f"member {peer[-8:]} sent {len(reply.tensors)} tensors for {names!r:.80}")
    return body, dict(zip(names, reply.tensors, strict=True))


async def _follow(
    node: Node,
    section: ParallelSection,
    members: list[str],
    run_id: str,
    steps: int,
    on_round: RoundCallback | None,
) -> tuple[list[RoundRecord], dict[str, tuple[dict[str, Any], dict[str, NDArray]]]]:
    """Poll the reporting member until it finishes; then every member's final status.
    `on_round` hears of every step but the last, which the caller completes."""
    # data: any replica reports every step (the first alive one); pipeline: the last stage,
    # which alone knows the loss, then the spares (one may have taken its place)
    stages = len(members) - section.spares - 1 if section.spares else len(members)
    spares = members[stages : stages + section.spares]
    reporters = list(members) if section.mode == "data" else [members[stages - 1], *spares]
    tolerant = section.mode == "data" or section.spares > 0
    history: list[RoundRecord] = []
    misses = 0
    while reporters:
        reporter = reporters[0]
        try:
            body, _ = await _status(node, reporter, run_id, len(history))
            misses = 0
        except RpcError as exc:
            # one failed poll can be a stream that did not open under load: a member is
            # taken for gone after MAX_MISSES in a row
            misses += 1
            if misses < MAX_MISSES:
                await trio.sleep(POLL_S)
                continue
            if not tolerant:
                raise JobError(f"the last stage ({reporter[-8:]}) is gone: {exc}") from exc
            log.warning("job %s: member %s is gone (%s); polling the next", run_id, reporter, exc)
            reporters.pop(0)
            misses = 0
            continue
        for raw in body.get("records") or []:
            record = _round_record(raw, stages)
            if record.round != len(history) + 1:
                continue  # a step redone after a fail-over: the same computation, seen already
            if history and on_round is not None:
                on_round(history[-1])
            history.append(record)
        if body.get("state") == FAILED:
            raise JobError(f"member {reporter[-8:]} failed: {body.get('error')}")
        if body.get("state") == FINISHED:
            break
        await trio.sleep(POLL_S)
    else:
        raise JobError("every member of the job is gone")
    return history, await _finals(node, section, members, run_id, steps)


async def _finals(
    node: Node, section: ParallelSection, members: Sequence[str], run_id: str, steps: int
) -> dict[str, tuple[dict[str, Any], dict[str, NDArray]]]:
    """Every member's final status (and weights); a replica that died is left out."""
    finals: dict[str, tuple[dict[str, Any], dict[str, NDArray]]] = {}
    for peer in members:
        misses = 0
        with trio.move_on_after(REQUEST_TIMEOUT_S * 2):
            while True:
                try:
                    body, weights = await _status(node, peer, run_id, steps, weights=True)
                except RpcError as exc:
                    misses += 1
                    if misses < MAX_MISSES:  # a stream that did not open, not a death
                        await trio.sleep(POLL_S)
                        continue
                    if section.mode != "data" and not section.spares:
                        raise JobError(f"stage {peer[-8:]} is gone: {exc}") from exc
                    break  # a dead replica, or a stage a spare took over
                if body.get("state") == FAILED and section.mode != "data":
                    raise JobError(f"stage {peer[-8:]} failed: {body.get('error')}")
                if body.get("state") != "running":
                    if body.get("state") == FINISHED:
                        finals[peer] = (body, weights)
                    break
                await trio.sleep(POLL_S)
    if not finals or (
        section.mode != "data" and not section.spares and len(finals) != len(members)
    ):
        raise JobError(f"{len(finals)} of {len(members)} members finished the job")
    for body, _ in finals.values():
        for failover in body.get("failovers") or []:
            log.warning("job %s: a dead stage moved to a spare: %s", run_id, failover)
    return finals


def _round_record(raw: Mapping[str, Any], members: int) -> RoundRecord:
    def number(key: str) -> float:
        value = raw.get(key)
        return float(value) if isinstance(value, int | float) else 0.0

    loss = raw.get("loss")
    replicas = int(number("replicas")) or members
    return RoundRecord(
        round=int(number("step")) + 1,
        train_loss=float(loss) if isinstance(loss, int | float) else None,
        eval_loss=None,
        eval_accuracy=None,
        global_train_loss=None,
        participants=replicas,
        stragglers=0,
        failures=members - replicas,
        bytes_out=int(number("bytes_sent")),
        bytes_in=int(number("bytes_received")),
        duration_s=number("seconds"),
        compute_s=number("compute_s"),
    )


def _collect(
    section: ParallelSection, finals: Mapping[str, tuple[dict[str, Any], dict[str, NDArray]]]
) -> tuple[dict[str, NDArray], float | None]:
    """The whole model's weights and the replicas' test accuracy (weighted by test size)."""
    if section.mode != "data":
        merged: dict[str, NDArray] = {}
        for _, weights in finals.values():
            merged.update(weights)
        return merged, None
    weights = next(iter(finals.values()))[1]
    scored = [
        (float(body["accuracy"]), int(body.get("test_count") or 0))
        for body, _ in finals.values()
        if isinstance(body.get("accuracy"), int | float)
    ]
    total = sum(count for _, count in scored)
    accuracy = sum(a * c for a, c in scored) / total if total else None
    return weights, accuracy
