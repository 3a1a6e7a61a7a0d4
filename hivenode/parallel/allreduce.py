"""Decentralised all-reduce over libp2p streams: reduce-scatter and all-gather in one exchange.

Every peer of a group of n cuts its vector into n parts (equal, or sized by bandwidth, see
`parts.py`) and sends part j to peer j. Peer j averages the part over the contributions it
got (weighted, e.g. by batch size), and its reply to each sender is that average: the
reduce-scatter's result travels back as the all-gather on the same stream. Each peer sends
(n−1)/n of the vector and receives (n−1)/n of it back as a reducer, and the same again as a
contributor: 2·(n−1)/n of the vector each way, the minimum for an all-reduce, in two message
latencies (a ring needs 2·(n−1)).

Faults, all decided from what every survivor sees alike, so replicas stay identical:

- a contributor that has not sent its part `peer_timeout` seconds after the part's first
  contribution, or whose stream to us failed this step, is left out; the part is the
  weighted average of the others (the weights re-normalised);
- a contributor whose connection to the reducer closes is given up at once;
- a reducer that fails (stream error, no reply in `reply_timeout`) is replaced: each peer
  that lacks its part first asks the others whether the reducer answered them before it
  failed (each answers once its own try is over, so all use that result or none does);
  if none has it, the part goes to the next peer in group order (attempt 1, 2, ...), which
  reduces it again from the survivors;
- replies name who was counted and which joiners the contributions announced; every peer
  derives the next step's group from the same replies: the peers counted in every part,
  then the joiners. A peer left out must rejoin (download the state) before it takes part
  again;
- each contribution carries a digest of the sender's parameters; a part counts only the
  contributions of the majority digest, so a replica that diverged is left out instead of
  pulling the others with it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from hivenode.agent.errors import RpcError
from hivenode.agent.node import Node
from hivenode.agent.rpc import OK, Reply, StreamPool
from hivenode.parallel import wire
from hivenode.parallel.errors import ParallelError, first_error
from hivenode.parallel.parts import part_bounds
from hivenode.parallel.reducer import Contribution, PartResult, Reductions
from hivenode.parallel.router import ParallelRouter
from hivenode.protocol.compression import Compression, Vector, decode, encode
from hivenode.protocol.errors import ProtocolError
from hivenode.protocol.ids import ALLREDUCE_PROTOCOL
from hivenode.protocol.message import Message, encode_message

log = logging.getLogger(__name__)

REDUCE = "reduce"
FETCH = "fetch"
HELLO = "hello"
KEEP_STEPS = 2
"""Results of this many recent steps are kept for peers that recover a part late."""
TRAFFIC_STEPS_KEPT = 10_000
"""Per-step traffic counts kept for reports."""
CLOSE_GRACE_S = 2.0
"""How long closing waits for replies still being written to peers."""


@dataclass(frozen=True)
class AllReduceConfig:
    """Per job, the same on every peer."""

    peer_timeout: float = 10.0
    """Seconds a reducer waits for a missing contribution after a part's first one arrived."""
    compression: Compression = Compression.NONE
    bandwidths: Mapping[str, float] | None = None
    """Bytes/s per peer: parts sized ∝ bandwidth; None: equal parts."""

    @property
    def reply_timeout(self) -> float:
        """A reducer answers once its slowest contributor sent or timed out: within two
        peer timeouts of our request (its clock may have started before ours)."""
        return 2.0 * self.peer_timeout + 1.0


@dataclass(frozen=True)
class StepResult:
    step: int
    average: Vector
    group: tuple[str, ...]
    """Who the step began with."""
    contributors: tuple[str, ...]
    """Who was counted in every part (group order)."""
    next_group: tuple[str, ...]
    """The contributors, then the joiners they announced."""
    joiners: tuple[str, ...]
    included: bool
    """Whether we were counted everywhere; if not we must rejoin before the next step."""
    bytes_sent: int
    bytes_received: int
    seconds: float
    recovered_parts: int
    """Parts whose first reducer failed and that a backup reduced."""


@dataclass
class _Traffic:
    sent: int = 0
    received: int = 0
    recovered: int = 0


@dataclass
class _Admission:
    done: trio.Event = field(default_factory=trio.Event)
    step: int = -1
    group: tuple[str, ...] = ()


class Averager:
    """One peer's side of a job's all-reduce. Create it while the node runs; `group` is
    the same ordered peer list on every peer (empty for a peer that must join first)."""

    def __init__(
        self,
        node: Node,
        router: ParallelRouter,
        job_id: str,
        size: int,
        group: Sequence[str],
        config: AllReduceConfig,
    ) -> None:
        self.node = node
        self.peer_id = node.peer_id
        self.job_id = job_id
        self.size = size
        self.group = tuple(group)
        self.config = config
        self.completed_step = -1
        self._router = router
        self._pool = StreamPool(node.swarm.host, ALLREDUCE_PROTOCOL)
        self._reductions = Reductions(
            job_id, config.peer_timeout, config.compression, self._connected
        )
        self._pending_joiners: set[str] = set()
        self._admissions: dict[str, _Admission] = {}
        self._serving = 0
        self.traffic: dict[int, list[int]] = {}
        """step → [bytes sent, bytes received] by this peer in both roles, headers included."""
        router.attach(ALLREDUCE_PROTOCOL, job_id, self._serve)

    async def aclose(self) -> None:
        """Stop serving once the replies in flight are written (bounded), close streams."""
        with trio.move_on_after(CLOSE_GRACE_S):
            while self._serving:
                await trio.sleep(0.01)
        self._router.detach(ALLREDUCE_PROTOCOL, self.job_id)
        await self._pool.aclose()

    async def warm_up(self) -> None:
        """Open the streams to the group before the first step, so that its deadlines are
        not spent dialling (a Noise handshake costs a loaded loop a few hundred ms)."""

        async def hello(peer: str) -> None:
            try:
                self.node.make_dialable(peer)
                await self._pool.request(
                    peer, HELLO, {"job": self.job_id}, timeout=self.config.reply_timeout
                )
                self._reductions.seen_connected.add(peer)
            except RpcError as exc:  # the first step decides what to do about it
                log.info("job %s: %s did not answer before the first step: %s",
                         self.job_id, peer, exc)  # fmt: skip

        async with trio.open_nursery() as nursery:
            for peer in self.group:
                if peer != self.peer_id:
                    nursery.start_soon(hello, peer)

    # --- the step ------------------------------------------------------------------------

    async def allreduce(
        self, step: int, values: Vector, weight: float, digest: str = ""
    ) -> StepResult:
        """The weighted average of every group member's `values` for `step`."""
        if self.peer_id not in self.group:
            raise ParallelError(f"{self.peer_id} is not in the group of job {self.job_id}")
        if not self.node.running:
            raise ParallelError(f"the node of job {self.job_id} has stopped")
        if values.shape != (self.size,) or values.dtype != np.float32:
            raise ParallelError(f"expected {self.size} float32 values, got {values.shape}")
        started = time.perf_counter()
        group = self.group
        bounds = self._bounds(group)
        self._reductions.new_step()
        announced = tuple(sorted(self._pending_joiners))
        mine = Contribution(weight, values, digest, announced)
        results: list[PartResult | None] = [None] * len(group)
        traffic = _Traffic()
        try:
            async with trio.open_nursery() as nursery:
                for part in range(len(group)):
                    nursery.start_soon(
                        self._resolve, step, part, group, bounds[part], mine, results, traffic
                    )
        except* ParallelError as errors:
            raise first_error(errors) from None
        if any(result is None for result in results):
            missing = [i for i, result in enumerate(results) if result is None]
            raise ParallelError(f"step {step}: no peer of the group could reduce parts {missing}")
        done = [r for r in results if r is not None]
        counted = set.intersection(*(set(r.contributors) for r in done))
        contributors = tuple(p for p in group if p in counted)
        joiners = tuple(sorted({j for r in done for j in r.joiners} - counted))
        next_group = contributors + joiners
        included = self.peer_id in counted
        self.group = next_group if included else ()
        self.completed_step = step
        self._forget(step)
        self._record_admissions(step, joiners, next_group, included)
        excluded = [p for p in group if p not in counted]
        if excluded:
            log.warning("job %s step %d: left out %s", self.job_id, step, ", ".join(excluded))
        return StepResult(
            step=step,
            average=np.concatenate([r.values for r in done]) if done else values[:0],
            group=group,
            contributors=contributors,
            next_group=next_group,
            joiners=joiners,
            included=included,
            bytes_sent=traffic.sent,
            bytes_received=traffic.received,
            seconds=time.perf_counter() - started,
            recovered_parts=traffic.recovered,
        )

    async def _resolve(
        self,
        step: int,
        part: int,
        group: tuple[str, ...],
        bounds: range,
        mine: Contribution,
        results: list[PartResult | None],
        traffic: _Traffic,
    ) -> None:
        """Get part `part` reduced: by its owner, else by the next peers in group order."""
        start, end = bounds.start, bounds.stop
        if start == end:  # the owner reduces nothing: nobody is left out of an empty part
            results[part] = PartResult(mine.values[:0], (), group, (), mine.weight)
            return
        share = Contribution(mine.weight, mine.values[start:end], mine.digest, mine.joiners)
        result: PartResult | None = None
        if group[part] not in self._reductions.suspects:
            result = await self._try(step, part, 0, group, share, traffic)
        if result is not None:
            self._reductions.settle(step, part, result)
        self._reductions.first_try(step, part).set()
        if result is None:  # did the reducer answer others before it failed?
            result = await self._fetch(step, part, group, traffic)
            if result is not None:
                self._reductions.settle(step, part, result)
        for attempt in range(1, len(group)):
            if result is not None:
                break
            result = await self._try(step, part, attempt, group, share, traffic)
            if result is not None:
                traffic.recovered += 1
                self._reductions.settle(step, part, result)
        if result is not None:
            results[part] = result

    async def _try(
        self,
        step: int,
        part: int,
        attempt: int,
        group: tuple[str, ...],
        share: Contribution,
        traffic: _Traffic,
    ) -> PartResult | None:
        owner = group[(part + attempt) % len(group)]
        if owner == self.peer_id:
            return await self._reduce_locally(step, part, attempt, group, share)
        if owner in self._reductions.suspects or not self.node.running:
            return None
        return await self._send(step, part, attempt, group, owner, share, traffic)

    async def _fetch(
        self, step: int, part: int, group: tuple[str, ...], traffic: _Traffic
    ) -> PartResult | None:
        """The part as its failed reducer gave it to another peer, if it did: every peer
        that lacks it asks the others before reducing it again, and each answers once its
        own first try is over, so either all peers use the reducer's result or none does."""
        if not self.node.running:
            return None
        peers = [
            p for p in group if p not in (self.peer_id, group[part], *self._reductions.suspects)
        ]
        found: list[PartResult] = []
        size = len(self._bounds(group)[part])

        async def ask(peer: str, cancel: trio.CancelScope) -> None:
            body = {"job": self.job_id, "step": step, "part": part}
            try:
                reply = await self._pool.request(
                    peer, FETCH, body, timeout=self.config.reply_timeout
                )
                sent = wire_size(FETCH, self.peer_id, body, ())
                traffic.sent += sent
                received = sum(len(p) for p in encode_message(reply))
                traffic.received += received
                self._count(step, sent, received)
                if reply.body.get("have") is True:
                    found.append(self._part_from_reply(reply, size))
                    cancel.cancel()
            except (RpcError, ProtocolError) as exc:
                log.info("job %s step %d: %s did not say whether it holds part %d: %s",
                         self.job_id, step, peer, part, exc)  # fmt: skip
                self._reductions.suspect(peer)

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(ask, peer, nursery.cancel_scope)
        return found[0] if found else None

    def _bounds(self, group: tuple[str, ...]) -> list[range]:
        return [range(a, b) for a, b in part_bounds(self.size, group, self.config.bandwidths)]

    async def _send(
        self,
        step: int,
        part: int,
        attempt: int,
        group: tuple[str, ...],
        owner: str,
        share: Contribution,
        traffic: _Traffic,
    ) -> PartResult | None:
        tensors = encode(share.values, self.config.compression)
        body = {
            "job": self.job_id,
            "step": step,
            "part": part,
            "attempt": attempt,
            "group": list(group),
            "weight": share.weight,
            "digest": share.digest,
            "joiners": list(share.joiners),
        }
        try:
            self.node.make_dialable(owner)
            reply = await self._pool.request(
                owner, REDUCE, body, timeout=self.config.reply_timeout, tensors=tensors
            )
            self._reductions.seen_connected.add(owner)
            sent = wire_size(REDUCE, self.peer_id, body, tensors)
            received = sum(len(p) for p in encode_message(reply))
            traffic.sent += sent
            traffic.received += received
            self._count(step, sent, received)
            return self._part_from_reply(reply, len(share.values))
        except (RpcError, ProtocolError) as exc:
            log.info("job %s step %d: reducer %s of part %d failed: %s", self.job_id, step,
                     owner, part, exc)  # fmt: skip
            self._reductions.suspect(owner)
            return None

    def _part_from_reply(self, reply: Message, size: int) -> PartResult:
        body = reply.body
        values = decode(reply.tensors, self.config.compression, size)
        return PartResult(
            values=values,
            tensors=reply.tensors,
            contributors=wire.peer_list(body, "contributors"),
            joiners=wire.peer_list(body, "joiners"),
            weight=wire.number(body, "weight"),
        )

    async def _reduce_locally(
        self, step: int, part: int, attempt: int, group: tuple[str, ...], share: Contribution
    ) -> PartResult | None:
        round_ = self._reductions.round(step, part, attempt, group)
        if round_ is None:
            raise ParallelError(
                f"step {step}: peers disagree on the group of job {self.job_id}; rejoin"
            )
        self._reductions.add(round_, self.peer_id, share)
        return await self._reductions.result_of(round_)

    # --- reducing ------------------------------------------------------------------------

    async def _serve(self, request: Message, caller: str) -> Reply:
        if request.type not in (REDUCE, FETCH, HELLO):
            raise RpcError("unknown_method", f"expected {REDUCE!r} or {FETCH!r}: {request.type!r}")
        self._serving += 1
        self._reductions.seen_connected.add(caller)
        try:
            if request.type == HELLO:
                return Reply(body={})
            if request.type == FETCH:
                return await self._serve_fetch(request, caller)
            return await self._serve_reduce(request, caller)
        finally:
            self._serving -= 1

    async def _serve_fetch(self, request: Message, caller: str) -> Reply:
        """Our result of a part whose reducer failed for the caller, once our own first
        try at it is over; `have: false` when we have none either."""
        step = wire.field(request.body, "step", int)
        part = wire.field(request.body, "part", int)
        if step <= self.completed_step - KEEP_STEPS:
            raise RpcError("stale_step", f"step {step} is over (we are at {self.completed_step})")
        with trio.move_on_after(self.config.reply_timeout):
            await self._reductions.first_try(step, part).wait()
        settled = self._reductions.settled.get((step, part))
        if settled is None:
            return Reply(body={"have": False})
        body = self._reply_body(settled)
        body["have"] = True
        self._count(step, wire_size(OK, self.peer_id, body, settled.tensors), 0)
        return Reply(body=body, tensors=settled.tensors)

    @staticmethod
    def _reply_body(result: PartResult) -> dict[str, Any]:
        return {
            "contributors": list(result.contributors),
            "joiners": list(result.joiners),
            "weight": result.weight,
        }

    async def _serve_reduce(self, request: Message, caller: str) -> Reply:
        body = request.body
        step = wire.field(body, "step", int)
        part = wire.field(body, "part", int)
        attempt = wire.field(body, "attempt", int)
        group = wire.peer_list(body, "group")
        weight = wire.number(body, "weight")
        digest = wire.field(body, "digest", str)[:128]
        joiners = wire.peer_list(body, "joiners")
        if caller not in group or not 0 <= part < len(group) or not 0 <= attempt < len(group):
            raise ProtocolError(f"part {part}, attempt {attempt} of a group of {len(group)}")
        if group[(part + attempt) % len(group)] != self.peer_id:
            raise RpcError("not_owner", f"part {part} attempt {attempt} is not ours to reduce")
        if step <= self.completed_step - KEEP_STEPS:
            raise RpcError("stale_step", f"step {step} is over (we are at {self.completed_step})")
        if not math.isfinite(weight) or weight < 0:
            raise ProtocolError(f"weight must be finite and ≥ 0, got {weight}")
        settled = self._reductions.settled.get((step, part))
        if settled is None or attempt == 0:
            size = len(self._bounds(group)[part])
            values = decode(request.tensors, self.config.compression, size)
            if not np.isfinite(values).all():
                raise RpcError("not_finite", "the contribution holds NaN or infinite values")
            round_ = self._reductions.round(step, part, attempt, group)
            if round_ is None:
                raise RpcError("group_mismatch", f"step {step} began with another group here")
            self._reductions.add(round_, caller, Contribution(weight, values, digest, joiners))
            settled = await self._reductions.result_of(round_)
        if settled is None:
            raise RpcError("no_result", f"part {part} of step {step} has no contribution")
        reply_body = self._reply_body(settled)
        self._count(
            step,
            wire_size(OK, self.peer_id, reply_body, settled.tensors),
            wire_size(REDUCE, caller, body, request.tensors),
        )
        return Reply(body=reply_body, tensors=settled.tensors)

    def _count(self, step: int, sent: int, received: int) -> None:
        counts = self.traffic.setdefault(step, [0, 0])
        counts[0] += sent
        counts[1] += received

    def _forget(self, step: int) -> None:
        self._reductions.forget_before(step - KEEP_STEPS + 1)
        self.traffic.pop(step - TRAFFIC_STEPS_KEPT, None)

    def _connected(self) -> set[str] | None:
        return set(self.node.connected_peers()) if self.node.running else None

    # --- joining -------------------------------------------------------------------------

    def announce(self, joiner: str) -> None:
        """Name `joiner` in our next contributions: the group admits it after that step."""
        self._pending_joiners.add(joiner)
        self._admissions.setdefault(joiner, _Admission())

    async def admitted(self, joiner: str, timeout: float) -> tuple[int, tuple[str, ...]]:
        """(the step after which `joiner` belongs to the group, the group it joins)."""
        admission = self._admissions.setdefault(joiner, _Admission())
        try:
            with trio.fail_after(timeout):
                await admission.done.wait()
        except trio.TooSlowError:
            self._pending_joiners.discard(joiner)
            raise ParallelError(f"{joiner} was not admitted within {timeout:g} s") from None
        finally:
            if admission.done.is_set():
                self._admissions.pop(joiner, None)
        return admission.step, admission.group

    def _record_admissions(
        self, step: int, joiners: tuple[str, ...], group: tuple[str, ...], included: bool
    ) -> None:
        if not included:
            return  # our announcements were not counted: they go out again next step
        for joiner in joiners:
            self._pending_joiners.discard(joiner)
            admission = self._admissions.get(joiner)
            if admission is not None and not admission.done.is_set():
                admission.step, admission.group = step, group
                admission.done.set()


def wire_size(
    method: str, sender: str, body: Mapping[str, Any], tensors: tuple[np.ndarray[Any, Any], ...]
) -> int:
    """Bytes a request takes on the stream (its request id at its widest)."""
    message = Message(method, 2**31, sender, body, tensors)
    return sum(len(part) for part in encode_message(message))


def theoretical_bytes_per_peer(size_bytes: int, peers: int) -> float:
    """The least an all-reduce can send per peer: 2·(n−1)/n of the vector."""
    return 2.0 * (peers - 1) / peers * size_bytes if peers > 1 else 0.0
