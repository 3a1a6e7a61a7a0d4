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
- a reducer that fails (stream error, no reply in `reply_timeout`) is replaced: each peer
  that lacked its part sends the part to the next peer in group order (attempt 1, 2, ...),
  which reduces it again from the survivors, or hands out the failed reducer's result when
  it already got it;
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
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from hivenode.agent.errors import RpcError
from hivenode.agent.node import Node
from hivenode.agent.rpc import Reply, StreamPool
from hivenode.parallel import wire
from hivenode.parallel.compression import Compression, Vector, decode, encode
from hivenode.parallel.errors import ParallelError
from hivenode.parallel.parts import part_bounds
from hivenode.parallel.router import ParallelRouter
from hivenode.parallel.wire import ALLREDUCE_PROTOCOL
from hivenode.protocol.errors import ProtocolError
from hivenode.protocol.message import Message, encode_message

log = logging.getLogger(__name__)

REDUCE = "reduce"
KEEP_STEPS = 2
"""Results of this many recent steps are kept for peers that recover a part late."""
MAX_OPEN_ROUNDS = 4096
"""Rounds a peer may make us hold at once; more is refused (a hostile peer cannot balloon us)."""
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
class PartResult:
    """One part averaged by its reducer, as every peer receives it."""

    values: Vector
    tensors: tuple[np.ndarray[Any, Any], ...]
    contributors: tuple[str, ...]
    joiners: tuple[str, ...]
    weight: float


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
class _Contribution:
    weight: float
    values: Vector
    digest: str
    joiners: tuple[str, ...]


@dataclass
class _Round:
    """The reduction of one part, at one attempt, of one step, on its reducer."""

    step: int
    part: int
    attempt: int
    group: tuple[str, ...]
    expected: frozenset[str]
    deadline: float
    contributions: dict[str, _Contribution] = field(default_factory=dict)
    done: trio.Event = field(default_factory=trio.Event)
    result: PartResult | None = None


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
        self._rounds: dict[tuple[int, int, int], _Round] = {}
        self._settled: dict[tuple[int, int], PartResult] = {}
        self._suspects: set[str] = set()
        self._pending_joiners: set[str] = set()
        self._admissions: dict[str, _Admission] = {}
        self._serving = 0
        router.attach(ALLREDUCE_PROTOCOL, job_id, self._serve)

    async def aclose(self) -> None:
        """Stop serving once the replies in flight are written (bounded), close streams."""
        with trio.move_on_after(CLOSE_GRACE_S):
            while self._serving:
                await trio.sleep(0.01)
        self._router.detach(ALLREDUCE_PROTOCOL, self.job_id)
        await self._pool.aclose()

    # --- the step ------------------------------------------------------------------------

    async def allreduce(
        self, step: int, values: Vector, weight: float, digest: str = ""
    ) -> StepResult:
        """The weighted average of every group member's `values` for `step`."""
        if self.peer_id not in self.group:
            raise ParallelError(f"{self.peer_id} is not in the group of job {self.job_id}")
        if values.shape != (self.size,) or values.dtype != np.float32:
            raise ParallelError(f"expected {self.size} float32 values, got {values.shape}")
        started = time.perf_counter()
        group = self.group
        bounds = part_bounds(self.size, group, self.config.bandwidths)
        self._suspects = set()
        announced = tuple(sorted(self._pending_joiners))
        mine = _Contribution(weight, values, digest, announced)
        results: list[PartResult | None] = [None] * len(group)
        traffic = _Traffic()
        async with trio.open_nursery() as nursery:
            for part in range(len(group)):
                nursery.start_soon(
                    self._resolve, step, part, group, bounds[part], mine, results, traffic
                )
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
        bounds: tuple[int, int],
        mine: _Contribution,
        results: list[PartResult | None],
        traffic: _Traffic,
    ) -> None:
        """Get part `part` reduced: by its owner, else by the next peers in group order."""
        start, end = bounds
        share = _Contribution(mine.weight, mine.values[start:end], mine.digest, mine.joiners)
        for attempt in range(len(group)):
            owner = group[(part + attempt) % len(group)]
            if owner in self._suspects:
                continue
            if owner == self.peer_id:
                result = await self._reduce_locally(step, part, attempt, group, share)
            else:
                result = await self._send(step, part, attempt, group, owner, share, traffic)
            if result is not None:
                results[part] = result
                traffic.recovered += attempt > 0
                self._settle(step, part, result)
                await self._part_resolved(step, part, owner)
                return

    async def _part_resolved(self, step: int, part: int, owner: str) -> None:
        """Called as each part arrives; fault-injecting subclasses stop the peer here."""

    async def _send(
        self,
        step: int,
        part: int,
        attempt: int,
        group: tuple[str, ...],
        owner: str,
        share: _Contribution,
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
            traffic.sent += wire_size(REDUCE, body, tensors)
            traffic.received += sum(len(p) for p in encode_message(reply))
            return self._part_from_reply(reply, len(share.values))
        except (RpcError, ProtocolError) as exc:
            log.info("job %s step %d: reducer %s of part %d failed: %s", self.job_id, step,
                     owner, part, exc)  # fmt: skip
            self._suspect(owner)
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
        self, step: int, part: int, attempt: int, group: tuple[str, ...], share: _Contribution
    ) -> PartResult | None:
        round_ = self._round(step, part, attempt, group)
        if round_ is None:
            raise ParallelError(
                f"step {step}: peers disagree on the group of job {self.job_id}; rejoin"
            )
        self._add(round_, self.peer_id, share)
        return await self._result_of(round_)

    # --- reducing ------------------------------------------------------------------------

    async def _serve(self, request: Message, caller: str) -> Reply:
        if request.type != REDUCE:
            raise RpcError("unknown_method", f"expected {REDUCE!r}, got {request.type!r}")
        self._serving += 1
        try:
            return await self._serve_reduce(request, caller)
        finally:
            self._serving -= 1

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
        settled = self._settled.get((step, part))
        if settled is None or attempt == 0:
            start, end = part_bounds(self.size, group, self.config.bandwidths)[part]
            values = decode(request.tensors, self.config.compression, end - start)
            if not np.isfinite(values).all():
                raise RpcError("not_finite", "the contribution holds NaN or infinite values")
            round_ = self._round(step, part, attempt, group)
            if round_ is None:
                raise RpcError("group_mismatch", f"step {step} began with another group here")
            self._add(round_, caller, _Contribution(weight, values, digest, joiners))
            settled = await self._result_of(round_)
        if settled is None:
            raise RpcError("no_result", f"part {part} of step {step} has no contribution")
        return Reply(
            body={
                "contributors": list(settled.contributors),
                "joiners": list(settled.joiners),
                "weight": settled.weight,
            },
            tensors=settled.tensors,
        )

    def _round(
        self, step: int, part: int, attempt: int, group: tuple[str, ...]
    ) -> _Round | None:
        """The round for this key (created on first use); None when it began with another
        group."""
        key = (step, part, attempt)
        round_ = self._rounds.get(key)
        if round_ is None:
            if len(self._rounds) >= MAX_OPEN_ROUNDS:
                raise RpcError("busy", "too many parts in flight")
            # reducers of earlier attempts failed: nobody waits for their contributions
            skipped = {group[(part + a) % len(group)] for a in range(attempt)}
            round_ = _Round(
                step,
                part,
                attempt,
                group,
                frozenset(group) - skipped,
                trio.current_time() + self.config.peer_timeout,
            )
            self._rounds[key] = round_
        elif round_.group != group:
            return None
        return round_

    def _add(self, round_: _Round, peer: str, contribution: _Contribution) -> None:
        if round_.done.is_set():
            return  # too late: the reply tells the peer it was not counted
        round_.contributions[peer] = contribution
        self._maybe_finish(round_)

    def _maybe_finish(self, round_: _Round) -> None:
        waiting = round_.expected - self._suspects - round_.contributions.keys()
        if not waiting:
            self._finish(round_)

    async def _result_of(self, round_: _Round) -> PartResult | None:
        with trio.move_on_at(round_.deadline):
            await round_.done.wait()
        self._finish(round_)
        return round_.result

    def _finish(self, round_: _Round) -> None:
        if round_.done.is_set():
            return
        if round_.contributions:
            round_.result = self._reduce(round_)
        round_.done.set()

    def _reduce(self, round_: _Round) -> PartResult:
        counted = _majority(round_.contributions)
        order = [p for p in round_.group if p in counted]
        total = sum(counted[p].weight for p in order)
        size = len(counted[order[0]].values)
        accumulator = np.zeros(size, dtype=np.float64)
        for peer in order:
            scale = counted[peer].weight if total > 0 else 1.0
            accumulator += counted[peer].values.astype(np.float64) * scale
        mean = (accumulator / (total if total > 0 else len(order))).astype(np.float32)
        tensors = encode(mean, self.config.compression)
        # decode what we send: this replica must apply exactly what the others receive
        values = decode(tensors, self.config.compression, size)
        joiners = sorted({j for p in order for j in counted[p].joiners})
        return PartResult(values, tensors, tuple(order), tuple(joiners), total)

    def _settle(self, step: int, part: int, result: PartResult) -> None:
        """The part's result is known here: recovery rounds we host for it hand this one
        out (the failed reducer reached us before it failed: others may hold it too)."""
        self._settled[(step, part)] = result
        for (s, p, attempt), round_ in self._rounds.items():
            if s == step and p == part and attempt > 0 and not round_.done.is_set():
                round_.result = result
                round_.done.set()

    def _suspect(self, peer: str) -> None:
        """Its stream failed: no round of this step waits for it any longer."""
        self._suspects.add(peer)
        for round_ in list(self._rounds.values()):
            if not round_.done.is_set():
                self._maybe_finish(round_)

    def _forget(self, step: int) -> None:
        horizon = step - KEEP_STEPS + 1
        self._rounds = {k: r for k, r in self._rounds.items() if k[0] >= horizon}
        self._settled = {k: r for k, r in self._settled.items() if k[0] >= horizon}

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


def _majority(contributions: Mapping[str, _Contribution]) -> dict[str, _Contribution]:
    """The contributions of the most common parameter digest (ties: the smallest digest)."""
    counts = Counter(c.digest for c in contributions.values())
    best = min(counts, key=lambda digest: (-counts[digest], digest))
    return {peer: c for peer, c in contributions.items() if c.digest == best}


def wire_size(method: str, body: Mapping[str, Any], tensors: tuple[np.ndarray[Any, Any], ...]) -> int:
    """Bytes a request takes on the stream (its request id at its widest)."""
    message = Message(method, 2**31, "", body, tensors)
    return sum(len(part) for part in encode_message(message))


def theoretical_bytes_per_peer(size_bytes: int, peers: int) -> float:
    """The least an all-reduce can send per peer: 2·(n−1)/n of the vector."""
    return 2.0 * (peers - 1) / peers * size_bytes if peers > 1 else 0.0
