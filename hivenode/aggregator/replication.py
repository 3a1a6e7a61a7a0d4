"""Checkpoint replication: a standby keeps every round's checkpoint of a job, and resumes the
job when its aggregator is gone.

The aggregator pushes the job's spec and newest checkpoint (global arrays, SCAFFOLD's control
variate, the history) to each standby after every round, on `REPLICA_PROTOCOL`. A standby
accepts pushes only from the aggregators it was told to back up, writes them with
`save_checkpoint` (atomic, as the aggregator's own) and ignores stale ones. It pings the
aggregator; after `LIVENESS_MISSES` missed pings `LIVENESS_PERIOD` apart it runs the job
from the replicated checkpoint with `run_job`, as a restarted aggregator would. Trainers
need no change: they answer whoever sends the job's messages, keyed by the job's name.

A round counts as safe once the standby holds it: `CheckpointPusher.replicated`. Once a
standby has taken a job over it refuses that job's pushes (`HANDED_OVER`) and tells an
aggregator that asks (`replica-status`) that the job is no longer its own: a restarted
aggregator must not run it a second time (`hivenode.aggregator.failover`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trio
from pydantic import ValidationError

from hivenode.agent.errors import RpcError
from hivenode.agent.node import Node
from hivenode.agent.rpc import request
from hivenode.aggregator.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from hivenode.aggregator.job_spec import JobSpec
from hivenode.aggregator.runner import JobResult, RoundCallback, RoundRecord, run_job
from hivenode.protocol.limits import DEFAULT_LIMITS
from hivenode.protocol.message import Message as WireMessage

log = logging.getLogger(__name__)

NDArray = np.ndarray[Any, Any]
REPLICA_PROTOCOL = "/hivenode/replica/1.0.0"
"""A job's spec and newest checkpoint, from its aggregator to a standby."""
PUSH_TIMEOUT = 30.0
"""Seconds one push to one standby may take (a large model's arrays travel with it)."""
LIVENESS_PERIOD = 1.0
"""Seconds between a standby's pings of the aggregator it backs up."""
LIVENESS_MISSES = 3
"""Missed pings in a row after which the aggregator counts as gone."""
HANDED_OVER = "handed_over"
"""The RpcError code of a push for a job its standby has taken over."""


@dataclass(frozen=True)
class Replica:
    """What a standby holds of one job."""

    job: JobSpec
    aggregator: str
    round: int


AcceptReplica = Callable[[str, JobSpec], bool]
"""Whether a standby holds `job`'s checkpoints for the peer (the caller) that pushes them."""
OnReplica = Callable[[Replica], None]


def encode_replica(job: JobSpec, checkpoint: Checkpoint) -> tuple[dict[str, Any], list[NDArray]]:
    """The request body and tensors: the history travels as JSON in a uint8 tensor (it grows
    with the rounds; the header has a size limit), then the arrays, then the control."""
    keys = list(checkpoint.arrays)
    history = np.frombuffer(json.dumps(checkpoint.history).encode(), dtype=np.uint8)
    tensors = [history, *(np.ascontiguousarray(checkpoint.arrays[k]) for k in keys)]
    if checkpoint.control is not None:
        tensors += [np.ascontiguousarray(checkpoint.control[k]) for k in keys]
    body = {
        "job": job.model_dump(mode="json"),
        "round": checkpoint.round,
        "keys": keys,
        "control": checkpoint.control is not None,
        "trainers": checkpoint.trainers,
    }
    return body, tensors


def decode_replica(
    body: Mapping[str, Any], tensors: Sequence[NDArray]
) -> tuple[JobSpec, Checkpoint]:
    """The inverse of `encode_replica`; RpcError("bad_request") for anything malformed."""
    try:
        job = JobSpec.model_validate(body.get("job"))
    except ValidationError as exc:
        raise RpcError("bad_request", f"the replica's job spec is invalid: {exc}") from exc
    round_number, keys, control = body.get("round"), body.get("keys"), body.get("control")
    if not isinstance(round_number, int) or isinstance(round_number, bool) or round_number < 1:
        raise RpcError("bad_request", "the replica's round must be an int ≥ 1")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise RpcError("bad_request", "the replica's keys must be a list of strings")
    if len(set(keys)) != len(keys) or not isinstance(control, bool):
        raise RpcError("bad_request", "the replica's keys repeat or its control flag is missing")
    if len(tensors) != 1 + len(keys) * (2 if control else 1) or tensors[0].dtype != np.uint8:
        raise RpcError("bad_request", "the replica's tensors do not match its keys")
    try:
        history = json.loads(tensors[0].tobytes())
    except (UnicodeDecodeError, ValueError) as exc:
        raise RpcError("bad_request", f"the replica's history is not JSON: {exc}") from exc
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise RpcError("bad_request", "the replica's history must be a list of records")
    arrays = dict(zip(keys, tensors[1 : 1 + len(keys)], strict=True))
    control_arrays = dict(zip(keys, tensors[1 + len(keys) :], strict=True)) if control else None
    trainers = body.get("trainers", [])
    if not isinstance(trainers, list) or not all(isinstance(p, str) for p in trainers):
        raise RpcError("bad_request", "the replica's trainers must be a list of peer ids")
    return job, Checkpoint(round_number, arrays, control_arrays, history, trainers)


class Standby:
    """Keeps the checkpoints that `aggregators` push, each job under `jobs_dir/<job>/`;
    `take_over` resumes them once their aggregator is gone. `aggregators`: peer ids, or a
    function that judges each push by its caller and job (a daemon backs up whoever names
    it). `on_replica` sees every replica held, in the trio thread."""

    def __init__(
        self,
        jobs_dir: Path,
        aggregators: Collection[str] | AcceptReplica,
        on_replica: OnReplica | None = None,
    ) -> None:
        self.jobs_dir = jobs_dir
        if callable(aggregators):
            self._accepts = aggregators
        else:
            backed = frozenset(aggregators)
            self._accepts = lambda caller, job: caller in backed
        self._on_replica = on_replica
        self.replicas: dict[str, Replica] = {}
        """Job name → what this standby holds of it."""
        self.handed_over: dict[str, Replica] = {}
        """Job name → the replica this node resumed the job from: its pushes are refused."""

    def register(self, node: Node) -> None:
        """Serve `REPLICA_PROTOCOL` on `node`; call before the node runs."""
        node.add_handler(REPLICA_PROTOCOL, self.handle, DEFAULT_LIMITS, PUSH_TIMEOUT)

    def hand_over(self, name: str) -> Replica | None:
        """This node now runs job `name`: hold no more of its pushes. The replica, if held."""
        replica = self.replicas.pop(name, None)
        if replica is not None:
            self.handed_over[name] = replica
        return replica

    async def handle(self, message: WireMessage, caller: str) -> Mapping[str, Any]:
        if message.type == "replica-status":
            return self._status(message.body, caller)
        if message.type != "replica":
            raise RpcError("bad_request", f"expected a replica, got {message.type!r}")
        job, checkpoint = decode_replica(message.body, message.tensors)
        if not self._accepts(caller, job):
            raise RpcError("forbidden", f"{caller} is not an aggregator this node backs up")
        taken = self.handed_over.get(job.name)
        if taken is not None and taken.aggregator == caller:
            raise RpcError(
                HANDED_OVER, f"this node took job {job.name} over after round {taken.round}"
            )
        known = self.replicas.get(job.name) or taken
        if known is not None and known.aggregator != caller:
            raise RpcError("forbidden", f"job {job.name} is backed up for {known.aggregator}")
        if known is not None and known.round >= checkpoint.round:
            return {"round": known.round}  # late or repeated: the newer one stays
        await trio.to_thread.run_sync(save_checkpoint, self.jobs_dir / job.name, checkpoint)
        replica = Replica(job, caller, checkpoint.round)
        self.replicas[job.name] = replica
        log.debug("job %s: holding round %d of %s", job.name, checkpoint.round, caller)
        if self._on_replica is not None:
            self._on_replica(replica)
        return {"round": checkpoint.round}

    def _status(self, body: Mapping[str, Any], caller: str) -> Mapping[str, Any]:
        """What this node holds of the caller's job `body["job"]`; only its aggregator may
        ask (a job's name is no secret, but who backs it up need not be told to all)."""
        name = body.get("job")
        if not isinstance(name, str):
            raise RpcError("bad_request", "replica-status names a job")
        taken = self.handed_over.get(name)
        held = self.replicas.get(name)
        if taken is not None and taken.aggregator == caller:
            return {"round": taken.round, "taken_over": True}
        if held is not None and held.aggregator == caller:
            return {"round": held.round, "taken_over": False}
        return {"round": 0, "taken_over": False}

    async def take_over(
        self,
        node: Node,
        aggregator: str,
        *,
        on_round: RoundCallback | None = None,
        trainer_wait_s: float = 30.0,
    ) -> list[JobResult]:
        """Wait until `aggregator` is gone, then run every job it pushed here to its end,
        from the last replicated round. Jobs of Flower apps are not resumed (run_job runs
        the built-in app only)."""
        await wait_until_gone(node, aggregator)
        results = []
        for replica in list(self.replicas.values()):
            if replica.aggregator != aggregator or replica.job.flower_app is not None:
                continue
            log.warning(
                "aggregator %s is gone: resuming job %s after round %d",
                aggregator,
                replica.job.name,
                replica.round,
            )
            job_dir = self.jobs_dir / replica.job.name
            results.append(
                await run_job(
                    node, replica.job, job_dir, on_round=on_round, trainer_wait_s=trainer_wait_s
                )
            )
        return results


async def push_checkpoint(
    node: Node, standby: str, job: JobSpec, checkpoint: Checkpoint, timeout: float = PUSH_TIMEOUT
) -> int:
    """Send `checkpoint` of `job` to `standby`; the round the standby now holds."""
    body, tensors = encode_replica(job, checkpoint)
    node.make_dialable(standby)
    reply = await request(
        node.swarm.host,
        standby,
        REPLICA_PROTOCOL,
        "replica",
        body,
        timeout=timeout,
        tensors=tuple(tensors),
    )
    held = reply.body.get("round")
    if not isinstance(held, int):
        raise RpcError("bad_reply", "the standby did not say which round it holds")
    return held


async def replica_status(
    node: Node, standby: str, name: str, timeout: float = PUSH_TIMEOUT
) -> tuple[int, bool]:
    """The round of job `name` that `standby` holds for this node, and whether it took the
    job over."""
    node.make_dialable(standby)
    reply = await request(
        node.swarm.host, standby, REPLICA_PROTOCOL, "replica-status", {"job": name}, timeout=timeout
    )
    held, taken = reply.body.get("round"), reply.body.get("taken_over")
    if not isinstance(held, int) or not isinstance(taken, bool):
        raise RpcError("bad_reply", "the standby's replica-status is malformed")
    return held, taken


class CheckpointPusher:
    """Pushes a job's checkpoints to its standbys, in one of two ways:

    - `replicate`, as `run_job`'s `replicate`: each round's checkpoint, from memory, before
      the next round starts. A finished round is then always at the standby.
    - `on_round` (the runner's callback) with `run` beside the job: the newest checkpoint
      on disk, while the next round runs. Rounds cost nothing extra, but a kill within
      `max_lag_s` of a round's end loses that round.

    A standby that cannot be reached is logged and tried again with the next round.
    """

    def __init__(self, node: Node, job: JobSpec, job_dir: Path, standbys: Sequence[str]) -> None:
        self._node = node
        self._job = job
        self._job_dir = job_dir
        self._standbys = list(standbys)
        self._send, self._receive = trio.open_memory_channel[int](math.inf)
        self.replicated = 0
        """The newest round that every standby holds."""
        self.attempted = 0
        """The newest round pushed (or tried) to every standby."""
        self.handed_over = False
        """A standby said it took the job over: this node was counted as gone."""
        self.max_lag_s = 0.0
        """The longest a round took to reach every standby once it was on disk (`on_round`)
        or once it ended (`replicate`)."""
        self._reported_at: dict[int, float] = {}

    async def replicate(self, checkpoint: Checkpoint) -> None:
        started = trio.current_time()
        await self._push(checkpoint)
        self.max_lag_s = max(self.max_lag_s, trio.current_time() - started)

    def on_round(self, record: RoundRecord) -> None:
        """The runner's `on_round`: the round is on disk; push it (from the trio thread)."""
        self._reported_at[record.round] = trio.current_time()
        self._send.send_nowait(record.round)

    def close(self) -> None:
        """No more rounds: `run` returns once it has pushed what is queued."""
        self._send.close()

    async def run(self) -> None:
        async with self._receive:
            async for _ in self._receive:
                while True:  # rounds that queued up meanwhile: the newest on disk covers them
                    try:
                        self._receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                await self._push_newest()

    async def _push_newest(self) -> None:
        try:
            checkpoint = await trio.to_thread.run_sync(load_checkpoint, self._job_dir)
        except CheckpointError as exc:  # the next round's write raced the read: next time
            log.info("job %s: checkpoint not readable for replication: %s", self._job.name, exc)
            return
        if checkpoint is not None:
            await self._push(checkpoint)
            now = trio.current_time()
            for number in [r for r in self._reported_at if r <= self.replicated]:
                self.max_lag_s = max(self.max_lag_s, now - self._reported_at.pop(number))

    async def _push(self, checkpoint: Checkpoint) -> None:
        held = []
        for standby in self._standbys:
            try:
                held.append(await push_checkpoint(self._node, standby, self._job, checkpoint))
            except RpcError as exc:
                self.handed_over = self.handed_over or exc.code == HANDED_OVER
                log.warning(
                    "job %s: standby %s missed round %d: %s",
                    self._job.name,
                    standby,
                    checkpoint.round,
                    exc,
                )
                held.append(0)
        self.replicated = max(self.replicated, min(held, default=0))
        self.attempted = max(self.attempted, checkpoint.round)


async def wait_until_gone(
    node: Node, peer: str, period: float = LIVENESS_PERIOD, misses: int = LIVENESS_MISSES
) -> float:
    """Return once `peer` has missed `misses` pings in a row, `period` seconds apart: the
    trio time of its last answer (of the first ping when it never answered), the latest
    moment it is known to have been alive."""
    missed = 0
    last_seen = trio.current_time()
    while missed < misses:
        started = trio.current_time()
        rtt: float | None = None
        with trio.move_on_after(period):
            rtt = await node.measure_rtt(peer)
        if rtt is not None:
            missed, last_seen = 0, trio.current_time()
        else:
            missed += 1
        await trio.sleep(max(0.0, period - (trio.current_time() - started)))
    log.info("peer %s missed %d pings: gone", peer, misses)
    return last_seen
