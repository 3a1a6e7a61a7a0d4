"""The reducer's side of the all-reduce: the rounds in which a peer averages the parts it owns.

A round is one part, at one attempt, of one step. It takes contributions until every
expected peer sent one or is given up (its stream failed, it disconnected, or the round's
deadline passed), then averages them once, off the event loop, for every waiter.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from hivenode.agent.errors import RpcError
from hivenode.protocol.compression import Compression, Vector, decode, encode

log = logging.getLogger(__name__)

MAX_OPEN_ROUNDS = 4096
"""Rounds a peer may make us hold at once; more is refused (a hostile peer cannot balloon us)."""
LIVENESS_POLL_S = 0.1
"""While a round waits for a contribution it checks this often that the peer is connected."""


@dataclass(frozen=True)
class PartResult:
    """One part averaged by its reducer, as every peer receives it."""

    values: Vector
    tensors: tuple[np.ndarray[Any, Any], ...]
    contributors: tuple[str, ...]
    joiners: tuple[str, ...]
    weight: float


@dataclass(frozen=True)
class Contribution:
    weight: float
    values: Vector
    digest: str
    joiners: tuple[str, ...]


@dataclass
class Round:
    step: int
    part: int
    attempt: int
    group: tuple[str, ...]
    expected: frozenset[str]
    deadline: float
    contributions: dict[str, Contribution] = field(default_factory=dict)
    closed: trio.Event = field(default_factory=trio.Event)
    """Set once no more contributions are taken (all came, or the rest are given up)."""
    done: trio.Event = field(default_factory=trio.Event)
    """Set once `result` is final."""
    result: PartResult | None = None
    lock: trio.Lock = field(default_factory=trio.Lock)


class Reductions:
    """The rounds one peer hosts for one job, and what it knows of the others this step.

    `connected()` lists the peers the node holds connections to (None once it stopped)."""

    def __init__(
        self,
        job_id: str,
        peer_timeout: float,
        compression: Compression,
        connected: Callable[[], set[str] | None],
    ) -> None:
        self.job_id = job_id
        self.peer_timeout = peer_timeout
        self.compression = compression
        self._connected = connected
        self.rounds: dict[tuple[int, int, int], Round] = {}
        self.settled: dict[tuple[int, int], PartResult] = {}
        """(step, part) → the part's result as this peer holds it, however it got it."""
        self.first_tries: dict[tuple[int, int], trio.Event] = {}
        self.suspects: set[str] = set()
        """Peers given up this step: their streams failed or they disconnected."""
        self.seen_connected: set[str] = set()

    def new_step(self) -> None:
        self.suspects = set()

    def round(self, step: int, part: int, attempt: int, group: tuple[str, ...]) -> Round | None:
        """The round for this key (created on first use); None when it began with another
        group."""
        key = (step, part, attempt)
        round_ = self.rounds.get(key)
        if round_ is None:
            if len(self.rounds) >= MAX_OPEN_ROUNDS:
                raise RpcError("busy", "too many parts in flight")
            # reducers of earlier attempts failed: nobody waits for their contributions
            skipped = {group[(part + a) % len(group)] for a in range(attempt)}
            round_ = Round(
                step,
                part,
                attempt,
                group,
                frozenset(group) - skipped,
                trio.current_time() + self.peer_timeout,
            )
            self.rounds[key] = round_
        elif round_.group != group:
            return None
        return round_

    def add(self, round_: Round, peer: str, contribution: Contribution) -> None:
        if round_.closed.is_set():
            return  # too late: the reply tells the peer it was not counted
        round_.contributions[peer] = contribution
        self._maybe_close(round_)

    async def result_of(self, round_: Round) -> PartResult | None:
        """Wait for the contributions (bounded by the round's deadline), then average them,
        off the event loop, once for every waiter."""
        while not round_.closed.is_set() and trio.current_time() < round_.deadline:
            with trio.move_on_at(min(round_.deadline, trio.current_time() + LIVENESS_POLL_S)):
                await round_.closed.wait()
            self._check_liveness(round_)
        self._close(round_)
        async with round_.lock:
            if not round_.done.is_set() and round_.contributions:
                result = await trio.to_thread.run_sync(self._reduce, round_)
                if not round_.done.is_set():  # unless a settled result came meanwhile
                    round_.result = result
            round_.done.set()
        return round_.result

    def settle(self, step: int, part: int, result: PartResult) -> None:
        """The part's result is known here: recovery rounds we host for it hand this one
        out (the failed reducer reached us before it failed: others may hold it too)."""
        self.settled[(step, part)] = result
        for (s, p, attempt), round_ in self.rounds.items():
            if s == step and p == part and attempt > 0 and not round_.done.is_set():
                round_.result = result
                round_.closed.set()
                round_.done.set()

    def suspect(self, peer: str) -> None:
        """Its stream failed: no round waits for it any longer this step."""
        self.suspects.add(peer)
        for round_ in list(self.rounds.values()):
            if not round_.closed.is_set():
                self._maybe_close(round_)

    def first_try(self, step: int, part: int) -> trio.Event:
        """Set once this peer's first try at the part (asking its own reducer) is over."""
        event = self.first_tries.get((step, part))
        if event is None:
            if len(self.first_tries) >= MAX_OPEN_ROUNDS:
                raise RpcError("busy", "too many parts in flight")
            event = self.first_tries[(step, part)] = trio.Event()
        return event

    def forget_before(self, step: int) -> None:
        self.rounds = {k: r for k, r in self.rounds.items() if k[0] >= step}
        self.settled = {k: r for k, r in self.settled.items() if k[0] >= step}
        self.first_tries = {k: e for k, e in self.first_tries.items() if k[0] >= step}

    def _maybe_close(self, round_: Round) -> None:
        if not round_.expected - self.suspects - round_.contributions.keys():
            self._close(round_)

    def _check_liveness(self, round_: Round) -> None:
        """A missing contributor we were connected to and are no longer is gone: its node
        stopped or its connection broke, and waiting out the timeout would gain nothing."""
        connected = self._connected()
        if round_.closed.is_set() or connected is None:
            return
        self.seen_connected |= connected
        for peer in round_.expected - round_.contributions.keys() - self.suspects:
            if peer in self.seen_connected and peer not in connected:
                log.info("job %s: %s disconnected; not waiting for it", self.job_id, peer)
                self.suspect(peer)

    def _close(self, round_: Round) -> None:
        if round_.closed.is_set():
            return
        missing = round_.expected - round_.contributions.keys()
        if missing:
            log.info(
                "job %s step %d part %d: reduced without %s",
                self.job_id,
                round_.step,
                round_.part,
                ", ".join(sorted(missing)),
            )
        round_.closed.set()

    def _reduce(self, round_: Round) -> PartResult:
        """The weighted mean of the majority digest's contributions, accumulated in float64
        in group order (every reducer adds in the same order)."""
        counted = majority(round_.contributions)
        order = [p for p in round_.group if p in counted]
        total = sum(counted[p].weight for p in order)
        size = len(counted[order[0]].values)
        accumulator = np.zeros(size, dtype=np.float64)
        for peer in order:
            scale = counted[peer].weight if total > 0 else 1.0
            accumulator += counted[peer].values.astype(np.float64) * scale
        mean = (accumulator / (total if total > 0 else len(order))).astype(np.float32)
        tensors = encode(mean, self.compression)
        # decode what we send: this replica must apply exactly what the others receive
        values = decode(tensors, self.compression, size)
        joiners = sorted({j for p in order for j in counted[p].joiners})
        return PartResult(values, tensors, tuple(order), tuple(joiners), total)


def majority(contributions: Mapping[str, Contribution]) -> dict[str, Contribution]:
    """The contributions of the most common parameter digest (ties: the smallest digest)."""
    counts = Counter(c.digest for c in contributions.values())
    best = min(counts, key=lambda digest: (-counts[digest], digest))
    return {peer: c for peer, c in contributions.items() if c.digest == best}
