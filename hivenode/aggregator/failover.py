"""Aggregator fail-over in the daemon: who stands by for a job, whose checkpoints a standby
holds, and when it takes a job over.

A job that names standbys (`JobSpec.standby`) has each round's checkpoint pushed to them
before the next round starts (`JobReplication`), and reports a round done only once that
push was made: a round `hivenode jobs show` reports is a round its standbys hold. Every
daemon with the aggregator role can stand by (`StandbyDuty`): it holds the checkpoints of a
job that names it (or says "auto") from a peer it would take work from, pings that peer
once a second, and after 3 misses hands the job to its own job service, which resumes it
from the replicated round under the same name. Trainers need no hand-over statement: they
bind a job's work to its name, not to the peer that sends it (`agent.trainer`); a node
that takes work only from `security.job_submitters` must list the standbys too.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Awaitable, Callable, Collection, Iterable
from pathlib import Path

import trio

from hivenode.agent.errors import RpcError
from hivenode.agent.node import Node
from hivenode.aggregator.checkpoint import Checkpoint
from hivenode.aggregator.job_spec import JobSpec
from hivenode.aggregator.replication import (
    CheckpointPusher,
    Replica,
    Standby,
    replica_status,
    wait_until_gone,
)
from hivenode.aggregator.runner import RoundCallback, RoundRecord
from hivenode.protocol.advert import Role

log = logging.getLogger(__name__)

AUTO_STANDBYS = 1
"""Standbys an "auto" job gets: one holds every round; more cost a push each per round."""
HANDOVER_CHECK_S = 10.0
"""How long a restarted aggregator looks for its job's standbys before resuming the job."""

TakeOver = Callable[[Replica, float], Awaitable[None]]
"""Runs a job whose aggregator is gone from `replica`; the float: when it last answered."""


def standby_rank(job_name: str, peer_id: str) -> bytes:
    """A peer's place in a job's standby order: a hash, so that every node ranks the same
    peers alike and different jobs spread over different standbys."""
    return hashlib.sha256(f"{job_name}\0{peer_id}".encode()).digest()


def choose_standbys(
    job_name: str,
    candidates: Iterable[str],
    trainers: Collection[str],
    count: int = AUTO_STANDBYS,
) -> list[str]:
    """The first `count` candidates by `standby_rank`, those that are not the job's trainers
    first (a trainer that also aggregates would compete with its own training)."""
    ranked = sorted(set(candidates), key=lambda p: (p in trainers, standby_rank(job_name, p)))
    return ranked[:count]


def aggregator_peers(node: Node) -> list[str]:
    """Connected peers whose advert offers the aggregator role."""
    connected = set(node.connected_peers())
    return [
        entry.advert.origin
        for entry in node.peer_table.entries()
        if Role.AGGREGATOR in entry.advert.roles and entry.advert.origin in connected
    ]


def standbys_for(
    node: Node, job: JobSpec, trainers: Collection[str], exclude: Collection[str] = ()
) -> list[str]:
    """The peers that stand by for `job` run from `node`: the listed ones, or the "auto"
    choice among the aggregators connected now; never `node` itself nor `exclude`."""
    left_out = {node.peer_id, *exclude}
    if job.standby == "auto":
        candidates = [p for p in aggregator_peers(node) if p not in left_out]
        return choose_standbys(job.name, candidates, trainers)
    return [p for p in job.standby if p not in left_out]


def accepts_replica(node: Node, caller: str, job: JobSpec) -> bool:
    """Whether `node` holds `job`'s checkpoints for `caller`: the job names it (or says
    "auto": the caller ranked it first among the aggregators it sees), and `caller` may
    make it work (taking a job over is running it: `security.accept_public_work`, else
    `security.job_submitters`, as for any job's work)."""
    if not node.wire_guard.takes_work_from(caller):
        return False
    if job.flower_app is not None or job.parallel is not None:
        return False  # run_job resumes jobs of the built-in federated app only
    return job.standby == "auto" or node.peer_id in job.standby


class JobReplication:
    """A job's replication, run by its aggregator: `replicate` for `run_job` (each round's
    checkpoint to the standbys before the next round starts) and `on_round`, which hands a
    round's record to `report` only once its checkpoint was pushed."""

    def __init__(
        self,
        node: Node,
        job: JobSpec,
        job_dir: Path,
        report: RoundCallback,
        exclude: Collection[str] = (),
    ) -> None:
        self._node = node
        self._job = job
        self._job_dir = job_dir
        self._report = report
        self._exclude = exclude
        self._pending: list[RoundRecord] = []
        self.pusher: CheckpointPusher | None = None
        self.standbys: list[str] = []

    async def replicate(self, checkpoint: Checkpoint) -> None:
        if self.pusher is None:  # the first round: the swarm and the trainers are known now
            self.standbys = standbys_for(self._node, self._job, checkpoint.trainers, self._exclude)
            if self.standbys:
                log.info("job %s: standbys %s", self._job.name, ", ".join(self.standbys))
            else:
                log.warning("job %s: no standby to replicate to", self._job.name)
            self.pusher = CheckpointPusher(self._node, self._job, self._job_dir, self.standbys)
        await self.pusher.replicate(checkpoint)
        self._flush()

    def on_round(self, record: RoundRecord) -> None:
        self._pending.append(record)
        self._flush()

    @property
    def handed_over(self) -> bool:
        return self.pusher is not None and self.pusher.handed_over

    def _flush(self) -> None:
        pushed = self.pusher.attempted if self.pusher is not None else 0
        while self._pending and self._pending[0].round <= pushed:
            self._report(self._pending.pop(0))


async def taken_over_by(node: Node, job: JobSpec, standbys: Collection[str]) -> str | None:
    """The standby that took `job` over while this node was gone, if any: asked before a
    restarted aggregator resumes the job. A standby not seen within `HANDOVER_CHECK_S`
    is taken as not having it (the job then resumes here)."""
    for standby in standbys:
        with trio.move_on_after(HANDOVER_CHECK_S):
            while True:
                try:
                    _, taken = await replica_status(node, standby, job.name, timeout=5.0)
                except RpcError as exc:
                    log.debug("job %s: standby %s not reached yet: %s", job.name, standby, exc)
                    await trio.sleep(0.5)
                    continue
                if taken:
                    return standby
                break
    return None


class StandbyDuty:
    """A daemon's standby role: holds the checkpoints pushed to it under `jobs_dir`, watches
    each aggregator whose unfinished job it holds, and calls `take_over` for each such job
    once that aggregator is gone. `is_own(name)`: a job of this node's own by that name
    (its replicas are refused: one directory per name)."""

    def __init__(
        self, node: Node, jobs_dir: Path, is_own: Callable[[str], bool], take_over: TakeOver
    ) -> None:
        self._node = node
        self._is_own = is_own
        self._take_over = take_over
        self.standby = Standby(jobs_dir, self._accepts, on_replica=self._on_replica)
        self._watched: dict[str, trio.CancelScope] = {}
        self._send, self._receive = trio.open_memory_channel[str](math.inf)

    def register(self) -> None:
        self.standby.register(self._node)

    def restore(self, job: JobSpec, aggregator: str, round_number: int) -> None:
        """A job this node took over before it restarted: its aggregator's pushes stay
        refused, and it is told so when it asks."""
        self.standby.handed_over[job.name] = Replica(job, aggregator, round_number)

    def _accepts(self, caller: str, job: JobSpec) -> bool:
        return accepts_replica(self._node, caller, job) and not self._is_own(job.name)

    def _on_replica(self, replica: Replica) -> None:
        if replica.round >= replica.job.rounds:  # its aggregator did every round: done
            self.standby.replicas.pop(replica.job.name, None)
            if not self._unfinished(replica.aggregator):
                scope = self._watched.pop(replica.aggregator, None)
                if scope is not None:
                    scope.cancel()
            return
        if replica.aggregator not in self._watched:
            self._watched[replica.aggregator] = trio.CancelScope()
            self._send.send_nowait(replica.aggregator)

    def _unfinished(self, aggregator: str) -> list[Replica]:
        return [r for r in self.standby.replicas.values() if r.aggregator == aggregator]

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            async for aggregator in self._receive:
                nursery.start_soon(self._watch, aggregator)

    async def _watch(self, aggregator: str) -> None:
        scope = self._watched.get(aggregator)
        if scope is None:
            return
        with scope:
            last_seen = await wait_until_gone(self._node, aggregator)
        self._watched.pop(aggregator, None)
        if scope.cancelled_caught:
            return
        for replica in self._unfinished(aggregator):
            self.standby.hand_over(replica.job.name)
            log.warning(
                "aggregator %s is gone: taking job %s over after round %d",
                aggregator,
                replica.job.name,
                replica.round,
            )
            await self._take_over(replica, last_seen)
