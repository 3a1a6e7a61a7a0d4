"""Pipeline stage fail-over: a stage whose node dies moves to a spare node from the last
consistent checkpoint, every other stage rolls back to it, and training resumes.

Who does what
-------------
- `PipelineCoordinator`, on one node that must outlive the job (the node the job was
  submitted to; it may also hold a stage, but then that stage's death ends the job): keeps
  the checkpoints, notices failures, picks spares, and drives each fail-over.
- `FailoverStage`, on every stage's node and every spare's: runs a `Stage`, pushes its
  checkpoints, reports a failed step, and obeys the coordinator's pause, prepare, resume,
  end and abort. A spare is a `FailoverStage` without a stage until a fail-over gives it one.

Checkpoints: a consistent cut kept by the coordinator
----------------------------------------------------
Before each step c that is a multiple of `PipelineConfig.checkpoint_every`, every stage
copies its weights and momentum buffers (its state after c steps), keeps the copy, and pushes
it to the coordinator in the background. Checkpoint c is *committed* once every stage's part
of c has arrived: the whole model as of one step, the only kind a pipeline can resume from
(a step couples every stage, so stage states from different steps do not make a model).
Step 0 is always committed and needs no parts: it is the recipe's weights, which every node
builds alike. A stage forgets its own copies older than the newest commit it has heard of.

The coordinator keeps them because it is the one party a fail-over cannot do without anyway
(it decides the cut and picks the spare), so keeping them there adds no new point of failure;
a spare then needs one transfer, and survivors roll back from their own copies without any.
A neighbour as keeper would spread the traffic but lose a stage when two adjacent nodes die,
and someone would still have to decide when a cut is complete; a spare as keeper is lost with
the spare, and needs a copy per spare. The price: every `checkpoint_every` steps the whole
model and its momentum (2× the weights) travel to the coordinator, off the training path.

Failure, pause, fail-over, resume
---------------------------------
A stage whose step fails (a neighbour silent for `stage_timeout`, or unreachable) reports it
to the coordinator and waits. The coordinator also pings every stage and spare each
`probe_period` (a dead first stage's neighbour only waits, so it would notice after
`stage_timeout`; a spare that died idle is dropped before a fail-over counts on it; and the
connections to the spares stay open, which took 0.4 s off a fail-over). On a report, or a
stage that does not answer its ping, the coordinator:

1. starts attempt (epoch) e + 1: from here on it refuses the failed attempt's checkpoints,
   so the cut it resumes from cannot change under it, and forgets incomplete ones;
2. pauses every stage (cancels its step); a stage that does not answer is dead;
3. gives each dead stage's index to the next spare, with the committed checkpoint's part
   (a spare that does not take it is dropped and the next one tried);
4. has every stage restore checkpoint c (its own copy, or the coordinator's part if it has
   none) and rewind to step c of epoch e + 1 with the new peer list; only when all have
   done so does it
5. resume them all. Stages refuse activations and gradients of any other epoch, so nothing
   in flight from before mixes into the redone steps; and since step 5 waits for step 4 on
   every stage, no stage hears from a neighbour that is an epoch ahead.

Guarantees: the batches are a function of the step and each stage's state after c steps is
restored exactly (weights and momentum), so the steps redone from c, and every step after,
are the same computation as without the failure: the final weights equal uninterrupted
training (and single-node training, as a pipeline does). A fail-over redoes at most
`checkpoint_every` steps plus the one that failed. At most `max_failovers` fail-overs; when
none is left, or no spare is, the coordinator tells every stage to abort and raises a
`ParallelError` naming the dead stage. Every wait is bounded: stages and spares ask the
coordinator every `stage_timeout` whether it still counts on them and give up when it does
not answer. Not covered: the coordinator's own death (it would need a standby, as the
federated aggregator has); checkpoints live in its memory, not on disk.

Wire: control messages ride the pipeline protocol under job ids of their own
(`<job>/coordinator`, `<job>/control`), so the router needs no new protocol.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import trio

from hivenode.agent.errors import RpcError
from hivenode.agent.node import Node
from hivenode.agent.rpc import StreamPool
from hivenode.parallel import wire
from hivenode.parallel.data_parallel import Batches
from hivenode.parallel.errors import ParallelError, first_error
from hivenode.parallel.pipeline import Arrays, PipelineConfig, Stage, StageStep, leaf_layers
from hivenode.parallel.router import ParallelRouter
from hivenode.parallel.torch_state import MOMENTUM_PREFIX
from hivenode.protocol.errors import ProtocolError
from hivenode.protocol.ids import PIPELINE_PROTOCOL
from hivenode.protocol.message import Message

log = logging.getLogger(__name__)

# to the coordinator
CHECKPOINT = "checkpoint"
FAILED = "failed"
DONE = "done"
PING = "ping"
# to a stage or spare
PAUSE = "pause"
PREPARE = "prepare"
RESUME = "resume"
END = "end"
ABORT = "abort"

MAX_FAILOVERS = 3
"""Fail-overs one job may take; a node that keeps failing should end the job, not loop it."""
PROBE_PERIOD_S = 1.0
"""How often the coordinator pings the stages. A dead stage's neighbours notice it only when
they send to it; the next stage of a dead first stage only waits, and would notice after
`stage_timeout`. A ping is a few hundred bytes, so each second costs nothing."""
MAX_REASON_CHARS = 500


def coordinator_job(job_id: str) -> str:
    return f"{job_id}/coordinator"


def control_job(job_id: str) -> str:
    return f"{job_id}/control"


class CheckpointStore:
    """The coordinator's checkpoints: each stage's part per step, and the newest step whose
    parts have all arrived (a consistent cut; 0, the recipe's weights, needs none)."""

    def __init__(self, stages: int) -> None:
        self.stages = stages
        self.step = 0
        self._committed: dict[int, Arrays] = {}
        self._pending: dict[int, dict[int, Arrays]] = {}

    def add(self, step: int, index: int, arrays: Arrays) -> int:
        """Keep stage `index`'s part of checkpoint `step`; returns the committed step."""
        if step > self.step:
            parts = self._pending.setdefault(step, {})
            parts[index] = arrays
            if len(parts) == self.stages:
                self.step, self._committed = step, parts
                self._pending = {s: p for s, p in self._pending.items() if s > step}
        return self.step

    def part(self, index: int) -> Arrays | None:
        """Stage `index`'s part of the committed checkpoint; None at step 0."""
        return self._committed.get(index)

    def drop_pending(self) -> None:
        """Forget the incomplete checkpoints: the attempt that was making them is over."""
        self._pending.clear()


@dataclass(frozen=True)
class Failover:
    """One fail-over: when the job failed, where it resumed from, who took over."""

    epoch: int
    """The attempt it started."""
    failed_step: int
    checkpoint_step: int
    replaced: tuple[tuple[int, str, str], ...]
    """(stage index, dead node, spare) for each stage moved; empty when every node answered
    (the stages only rolled back)."""
    reason: str
    recovery_s: float
    """From the failure reaching the coordinator to every stage resumed."""


class PipelineCoordinator:
    """Keeps the stages' checkpoints and moves dead stages to spares (see the module).

    Create it before the stages start (it takes their first checkpoints), then `await
    run()`. `spares`: nodes running a spare `FailoverStage`, tried in this order."""

    def __init__(
        self,
        node: Node,
        router: ParallelRouter,
        config: PipelineConfig,
        peers: Sequence[str],
        cuts: Sequence[int],
        spares: Sequence[str] = (),
        max_failovers: int = MAX_FAILOVERS,
        probe_period: float = PROBE_PERIOD_S,
    ) -> None:
        if len(cuts) != len(peers) + 1 or len(set(peers)) != len(peers):
            raise ParallelError(f"{len(peers)} distinct stages need {len(peers) + 1} cuts")
        self.node = node
        self.config = config
        self.peers = list(peers)
        self.cuts = tuple(cuts)
        self.spares = [s for s in spares if s not in self.peers]
        """The spares not used yet, in the order they will be."""
        self.max_failovers = max_failovers
        self.probe_period = probe_period
        self._shapes = _part_shapes(config, self.cuts)
        self.epoch = 0
        self.store = CheckpointStore(len(self.peers))
        self.failovers: list[Failover] = []
        self._done: set[int] = set()
        self._seen: set[str] = set()
        """Stage nodes that have answered or written to us: only these can be found dead
        by a ping (one still starting up answers nothing yet)."""
        self._failure: tuple[int | None, str, float] | None = None
        self._wake = trio.Event()
        self._router = router
        self._pool = StreamPool(node.swarm.host, PIPELINE_PROTOCOL)
        router.attach(PIPELINE_PROTOCOL, coordinator_job(config.job_id), self._serve)

    def _signal(self) -> None:
        self._wake.set()
        self._wake = trio.Event()

    async def wait_for_checkpoint(self, step: int, timeout: float) -> None:
        """Until checkpoint `step` (or a later one) is committed; TooSlowError after `timeout`."""
        with trio.fail_after(timeout):
            while self.store.step < step:
                await self._wake.wait()

    async def run(self) -> list[Failover]:
        """Until every stage has finished the last step; the fail-overs it took. A
        ParallelError (after telling the stages to abort) when a stage cannot be replaced."""
        next_probe = trio.current_time() + self.probe_period
        try:
            while True:
                if len(self._done) == len(self.peers):
                    await self._call_all(END, {p: {} for p in [*self.peers, *self.spares]})
                    return self.failovers
                if self._failure is not None:
                    await self._recover(*self._failure)
                    continue
                wake = self._wake
                with trio.move_on_at(next_probe):
                    await wake.wait()
                if trio.current_time() >= next_probe:
                    await self._probe()
                    next_probe = trio.current_time() + self.probe_period
        finally:
            self._router.detach(PIPELINE_PROTOCOL, coordinator_job(self.config.job_id))
            await self._pool.aclose()

    async def _probe(self) -> None:
        """Finds a stage that died where no neighbour sends to it (the first stage, a
        one-stage job), and a spare that died waiting, before a fail-over counts on it;
        and keeps our connections to the spares open for the fail-over that does."""
        replies = await self._call_all(PING, {p: {} for p in [*self.peers, *self.spares]})
        for peer, reply in replies.items():
            if isinstance(reply, Message):
                self._seen.add(peer)
            elif peer in self._seen and peer in self.spares:
                log.warning(
                    "pipeline job %s: spare %s is gone: %s", self.config.job_id, peer, reply
                )
                self.spares.remove(peer)
            elif peer in self._seen and peer in self.peers and self._failure is None:
                index = self.peers.index(peer)
                reason = f"stage {index} (node {peer}) does not answer a ping: {reply}"
                self._failure = (None, reason, _now())

    async def _recover(self, step: int | None, reason: str, detected: float) -> None:
        self._failure = None
        if len(self.failovers) >= self.max_failovers:
            await self._abort(
                f"pipeline job {self.config.job_id} failed ({reason}) after "
                f"{len(self.failovers)} fail-overs, the most it may take"
            )
        self.epoch += 1  # from here on the failed attempt's checkpoints are refused
        self.store.drop_pending()
        self._done.clear()
        checkpoint = self.store.step
        paused = await self._call_all(PAUSE, {p: {"epoch": self.epoch} for p in self.peers})
        dead = {i for i, p in enumerate(self.peers) if isinstance(paused[p], RpcError)}
        at = [_reply_int(r, "step", -1) for r in paused.values() if isinstance(r, Message)]
        failed_step = step if step is not None else max(at, default=checkpoint)
        # a stage that has no copy of the checkpoint (a spare, or one that lost it) gets
        # the coordinator's part
        needs_part = {
            i
            for i, p in enumerate(self.peers)
            if i not in dead and checkpoint not in _reply_steps(paused[p])
        }
        peers = list(self.peers)
        replaced: list[tuple[int, str, str]] = []
        while True:  # each round uses up a spare per failed node, so it ends
            for index in sorted(dead):
                spare = await self._next_spare(index, peers, failed_step, reason)
                replaced.append((index, peers[index], spare))
                peers[index] = spare
                needs_part.add(index)
            prepared = await self._call_all(
                PREPARE,
                {p: self._prepare_body(i, peers, checkpoint) for i, p in enumerate(peers)},
                {p: self._part(i) for i, p in enumerate(peers) if i in needs_part},
            )
            # a node that cannot roll back (died meanwhile, lacks the checkpoint) is as
            # good as dead: it is replaced too
            dead = {i for i, p in enumerate(peers) if isinstance(prepared[p], RpcError)}
            if not dead:
                break
        self._seen.update(peers)
        self.peers = peers
        resumed = await self._call_all(RESUME, {p: {"epoch": self.epoch} for p in peers})
        record = Failover(
            self.epoch, failed_step, checkpoint, tuple(replaced), reason, _now() - detected
        )
        self.failovers.append(record)
        log.warning(
            "pipeline job %s: failed at step %d (%s); resumed from checkpoint %d, moved %s",
            self.config.job_id,
            failed_step,
            reason,
            checkpoint,
            [(i, new) for i, _, new in replaced] or "nothing",
        )
        lost = [p for p, r in resumed.items() if isinstance(r, RpcError)]
        if lost and self._failure is None:
            self._failure = (checkpoint, f"{lost[0]} did not resume: {resumed[lost[0]]}", _now())

    async def _next_spare(self, index: int, peers: list[str], step: int, reason: str) -> str:
        if self.spares:
            return self.spares.pop(0)
        await self._abort(
            f"pipeline job {self.config.job_id}: stage {index} (node {peers[index]}) failed at "
            f"step {step} ({reason}) and no spare node is left to take it; give the job more "
            "spares or fewer stages",
            also=peers,  # spares already given a stage in this fail-over
        )

    def _prepare_body(self, index: int, peers: Sequence[str], step: int) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": step,
            "index": index,
            "peers": list(peers),
            "cuts": list(self.cuts),
        }

    def _part(self, index: int) -> Arrays:
        return self.store.part(index) or {}

    async def _abort(self, message: str, also: Sequence[str] = ()) -> NoReturn:
        told = {*self.peers, *self.spares, *also}
        await self._call_all(ABORT, {p: {"reason": message} for p in told})
        raise ParallelError(message)

    async def _call_all(
        self,
        method: str,
        bodies: Mapping[str, dict[str, Any]],
        parts: Mapping[str, Arrays] | None = None,
    ) -> dict[str, Message | RpcError]:
        """`method` to every peer at once: each one's reply, or the RpcError it failed with."""
        results: dict[str, Message | RpcError] = {}

        async def call(peer: str, body: dict[str, Any]) -> None:
            arrays = (parts or {}).get(peer, {})
            body = {"job": control_job(self.config.job_id), **body, "names": list(arrays)}
            try:
                self.node.make_dialable(peer)
                results[peer] = await self._pool.request(
                    peer,
                    method,
                    body,
                    timeout=self.config.stage_timeout,
                    tensors=tuple(arrays.values()),
                )
            except RpcError as exc:
                results[peer] = exc

        async with trio.open_nursery() as nursery:
            for peer, body in bodies.items():
                nursery.start_soon(call, peer, body)
        return results

    async def _serve(self, request: Message, caller: str) -> dict[str, Any]:
        body = request.body
        if request.type == PING:
            return {"member": caller in self.peers or caller in self.spares, "epoch": self.epoch}
        epoch = wire.field(body, "epoch", int)
        index = wire.field(body, "index", int)
        if epoch != self.epoch:  # from before a fail-over: its cut and reports are void
            if request.type == CHECKPOINT:
                raise RpcError("stale_epoch", f"attempt {epoch} is over, now {self.epoch}")
            return {}
        if not 0 <= index < len(self.peers) or self.peers[index] != caller:
            raise RpcError("not_member", f"{caller} holds no stage {index} of this job")
        self._seen.add(caller)
        if request.type == CHECKPOINT:
            return {"committed": self._keep(body, index, request.tensors)}
        if request.type == FAILED:
            if self._failure is None:
                step = wire.field(body, "step", int)
                reason = wire.field(body, "reason", str)[:MAX_REASON_CHARS]
                prefix = f"stage {index}: "
                self._failure = (
                    step,
                    reason if reason.startswith(prefix) else prefix + reason,
                    _now(),
                )
        elif request.type == DONE:
            self._done.add(index)
        else:
            raise RpcError("unknown_method", f"not a coordinator method: {request.type!r}")
        self._signal()
        return {}

    def _keep(self, body: Mapping[str, Any], index: int, tensors: tuple[Any, ...]) -> int:
        step = wire.field(body, "step", int)
        names = wire.field(body, "names", list)
        every = self.config.checkpoint_every
        if step % every or not 0 < step < self.config.steps:
            raise ProtocolError(f"step {step} is no checkpoint step (every {every})")
        if len(names) != len(tensors) or not all(isinstance(n, str) for n in names):
            raise ProtocolError("a checkpoint names each of its tensors")
        arrays = dict(zip(names, tensors, strict=True))
        _check_part(arrays, self._shapes[index], index)
        committed = self.store.add(step, index, arrays)
        self._signal()
        return committed


class FailoverStage:
    """This node's part in a pipeline job with fail-over: `stage`, or, without one, a spare
    that becomes the stage the coordinator moves here. The first stage and a spare that may
    replace it need `batches`. Create while the node runs and before training starts;
    `aclose` closes the stage too."""

    def __init__(
        self,
        node: Node,
        router: ParallelRouter,
        config: PipelineConfig,
        coordinator: str,
        stage: Stage | None = None,
        batches: Batches | None = None,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        if stage is not None and stage.first and batches is None:
            raise ParallelError("the first stage needs the batches")
        self.node = node
        self.config = config
        self.coordinator = coordinator
        self.stage = stage
        self._batches = batches
        self._router = router
        self._limiter = limiter or trio.CapacityLimiter(1)
        self._pool = StreamPool(node.swarm.host, PIPELINE_PROTOCOL)
        # step 0 is the checkpoint every job starts from; it is cheap to keep until the
        # first commit and spares a transfer when a fail-over comes before one
        self._snapshots: dict[int, Arrays] = {0: stage.snapshot()} if stage else {}
        self._heard_commit = 0
        self._go = trio.Event()
        if stage is not None:
            self._go.set()
        self._ended = False
        self._aborted: str | None = None
        self._word = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()
        router.attach(PIPELINE_PROTOCOL, control_job(config.job_id), self._serve)

    async def aclose(self) -> None:
        self._router.detach(PIPELINE_PROTOCOL, control_job(self.config.job_id))
        await self._pool.aclose()
        if self.stage is not None:
            await self.stage.aclose()

    async def train(self, on_step: Callable[[StageStep], None] | None = None) -> list[StageStep]:
        """Train until the coordinator ends the job; the records of the steps that count
        (redone steps replace the failed ones), none for a spare it never needed.
        `on_step` sees every step run, redone ones too. A ParallelError when the job is
        aborted or the coordinator is gone."""
        try:
            async with trio.open_nursery() as pushes:
                while True:
                    await self._await_word()
                    if self._aborted is not None:
                        raise ParallelError(self._aborted)
                    if self._ended:
                        break
                    self._go = trio.Event()
                    await self._run(pushes, on_step)
                pushes.cancel_scope.cancel()  # the job is over: no checkpoint is wanted
        except* ParallelError as group:
            raise first_error(group) from None
        finally:
            # a node that no longer trains must not answer for a stage: it would pass for
            # alive, be rolled back and resumed, and fail the job again
            self._router.detach(PIPELINE_PROTOCOL, control_job(self.config.job_id))
        return self.stage.records if self.stage is not None else []

    async def _await_word(self) -> None:
        """Until resumed, ended or aborted; every `stage_timeout` ask the coordinator
        whether it still counts on us, so that no wait outlives the job."""
        while not self._go.is_set() and not self._ended and self._aborted is None:
            word = self._word
            with trio.move_on_after(self.config.stage_timeout) as quiet:
                await word.wait()
            if not quiet.cancelled_caught:
                continue
            try:
                reply = await self._request(PING, {})
            except RpcError as exc:
                raise ParallelError(
                    f"the coordinator {self.coordinator} of pipeline job {self.config.job_id} "
                    f"is gone: {exc}"
                ) from exc
            if reply.body.get("member") is not True:
                raise ParallelError(
                    f"the coordinator of pipeline job {self.config.job_id} no longer counts "
                    "on this node (it was taken for dead and replaced)"
                )

    async def _run(self, pushes: trio.Nursery, on_step: Callable[[StageStep], None] | None) -> None:
        """Steps from the stage's current one to the last; a pause cancels them."""
        stage = self.stage
        assert stage is not None
        scope = self._scope = trio.CancelScope()
        self._stopped = trio.Event()
        failure: ParallelError | None = None
        try:
            with scope:
                try:
                    for step in range(stage.step, self.config.steps):
                        batch = self._batches(step) if stage.first and self._batches else None
                        record = await stage.run_step(step, batch)
                        stage.records.append(record)
                        if on_step is not None:
                            on_step(record)
                        await self._checkpoint(pushes, stage, step + 1)
                except ParallelError as exc:
                    failure = exc
        finally:
            self._scope = None
            self._stopped.set()
        if scope.cancelled_caught:
            return  # paused: the coordinator has the word
        body = {"epoch": stage.epoch, "index": stage.index}
        try:
            if failure is None:
                await self._request(DONE, body)
            else:
                log.warning("pipeline job %s: %s", self.config.job_id, failure)
                await self._request(FAILED, {**body, "step": stage.step, "reason": str(failure)})
        except RpcError as exc:
            raise ParallelError(
                f"{failure or 'finished'}; and the coordinator {self.coordinator} does not "
                f"answer: {exc}"
            ) from failure

    async def _checkpoint(self, pushes: trio.Nursery, stage: Stage, step: int) -> None:
        if step % self.config.checkpoint_every or step >= self.config.steps:
            return
        arrays = await trio.to_thread.run_sync(stage.snapshot, limiter=self._limiter)
        self._snapshots[step] = arrays
        pushes.start_soon(self._push, stage.epoch, stage.index, step, arrays)

    async def _push(self, epoch: int, index: int, step: int, arrays: Arrays) -> None:
        """In the background: a late or lost push only makes a fail-over go further back."""
        body = {"epoch": epoch, "index": index, "step": step, "names": list(arrays)}
        try:
            reply = await self._request(CHECKPOINT, body, tuple(arrays.values()))
        except RpcError as exc:
            level = logging.DEBUG if exc.code == "stale_epoch" else logging.WARNING
            log.log(
                level, "pipeline job %s: checkpoint %d not kept: %s", self.config.job_id, step, exc
            )
            return
        self._heard_commit = max(self._heard_commit, _reply_int(reply, "committed", 0))
        # the coordinator never resumes from before a commit: older copies are dead weight
        self._snapshots = {s: a for s, a in self._snapshots.items() if s >= self._heard_commit}

    async def _request(
        self, method: str, body: dict[str, Any], tensors: tuple[np.ndarray[Any, Any], ...] = ()
    ) -> Message:
        self.node.make_dialable(self.coordinator)
        return await self._pool.request(
            self.coordinator,
            method,
            {"job": coordinator_job(self.config.job_id), **body},
            timeout=self.config.stage_timeout,
            tensors=tensors,
        )

    # --- the coordinator's orders --------------------------------------------------------

    def _wake(self) -> None:
        self._word.set()
        self._word = trio.Event()

    async def _serve(self, request: Message, caller: str) -> dict[str, Any]:
        if caller != self.coordinator:
            raise RpcError("not_coordinator", f"only {self.coordinator} directs this job")
        kind = request.type
        if kind == PREPARE:
            await self._pause()
            await self._prepare(request)
        elif kind == PAUSE:
            await self._pause()
        elif kind == RESUME:
            epoch = wire.field(request.body, "epoch", int)
            if self.stage is None or self.stage.epoch != epoch:
                raise RpcError("not_prepared", f"not prepared for attempt {epoch}")
            self._go.set()
        elif kind == END:
            self._ended = True
        elif kind == ABORT:
            self._aborted = wire.field(request.body, "reason", str)[:MAX_REASON_CHARS]
            if self._scope is not None:
                self._scope.cancel()
        elif kind != PING:
            raise RpcError("unknown_method", f"not a stage control method: {kind!r}")
        self._wake()
        stage = self.stage
        return {
            "step": stage.step if stage else -1,
            "epoch": stage.epoch if stage else -1,
            "snapshots": sorted(self._snapshots),
        }

    async def _pause(self) -> None:
        if self._scope is None:
            return
        self._scope.cancel()
        with trio.move_on_after(self.config.stage_timeout):
            await self._stopped.wait()
        if self._scope is not None:  # a step's computation would not end
            raise RpcError("busy", "the stage did not stop in time")

    async def _prepare(self, request: Message) -> None:
        """Restore checkpoint `step` (the part sent, or our own copy) and rewind to it."""
        body = request.body
        epoch = wire.field(body, "epoch", int)
        step = wire.field(body, "step", int)
        index = wire.field(body, "index", int)
        peers = wire.peer_list(body, "peers")
        cuts = wire.field(body, "cuts", list)
        names = wire.field(body, "names", list)
        if len(names) != len(request.tensors) or not all(isinstance(c, int) for c in cuts):
            raise ProtocolError("a prepare names its tensors and gives integer cuts")
        sent: Arrays = dict(zip(names, request.tensors, strict=True))
        try:
            fresh = self.stage is None
            if self.stage is None:
                if index == 0 and self._batches is None:
                    raise ParallelError("this spare has no batches: it cannot be the first stage")
                self.stage = Stage(
                    self.node, self._router, self.config, peers, index, cuts, self._limiter
                )
                log.warning("pipeline job %s: this spare takes stage %d", self.config.job_id, index)
            stage = self.stage
            if stage.index != index:
                raise ParallelError(f"this node holds stage {stage.index}, not {index}")
            arrays = sent or self._snapshots.get(step)
            if arrays is not None:
                await trio.to_thread.run_sync(stage.restore, arrays, limiter=self._limiter)
            elif not (fresh and step == 0):  # a stage just built is at step 0 already
                raise ParallelError(f"no copy of checkpoint {step} here")
            stage.rewind(step, epoch, peers)
        except ParallelError as exc:
            raise RpcError("cannot_prepare", str(exc)) from exc
        # our later copies belong to the failed attempt; this one is the rollback's
        self._snapshots = {s: a for s, a in self._snapshots.items() if s < step}
        self._snapshots[step] = arrays if arrays is not None else stage.snapshot()


def _now() -> float:
    return time.perf_counter()


def _reply_int(reply: Message, name: str, default: int) -> int:
    """A reply's field, or `default` when a peer sent none fit to use: the fail-over goes
    on with less information rather than stopping on it."""
    value = reply.body.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _part_shapes(config: PipelineConfig, cuts: Sequence[int]) -> list[dict[str, tuple[int, ...]]]:
    """Each stage's state names and shapes, as its checkpoint part must have them."""
    layers = leaf_layers(config.recipe.build())
    return [
        {
            f"{prefix}.{name}": tuple(tensor.shape)
            for prefix, module in layers[start:end]
            for name, tensor in module.state_dict().items()
        }
        for start, end in itertools.pairwise(cuts)
    ]


def _check_part(arrays: Arrays, shapes: Mapping[str, tuple[int, ...]], index: int) -> None:
    """Every weight of the stage's layers, momentum for any of them, all float32 of the
    layers' shapes: a part that does not fit would only fail later, on a spare."""
    weights = {k for k in arrays if not k.startswith(MOMENTUM_PREFIX)}
    if weights != set(shapes):
        raise ProtocolError(f"stage {index}'s checkpoint does not name its layers' weights")
    for key, value in arrays.items():
        name = key.removeprefix(MOMENTUM_PREFIX)
        if name not in shapes or value.dtype != np.float32 or tuple(value.shape) != shapes[name]:
            raise ProtocolError(f"{key!r} does not fit stage {index}'s layers")


def _reply_steps(reply: Message | RpcError) -> set[int]:
    if isinstance(reply, RpcError):
        return set()
    steps = reply.body.get("snapshots")
    return {s for s in steps if isinstance(s, int)} if isinstance(steps, list) else set()
