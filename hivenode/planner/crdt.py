"""The swarm's Q-table as a CRDT, and the signed deltas that carry it on `hivenode/qtable/1`.

Every node keeps, per cell (state, action) and per origin node, that origin's own estimate:
(visits n, mean value v, origin sequence number s). Only the origin changes its cells, and
its sequence numbers grow, so each (origin, cell) is a last-writer-wins register ordered by s:
merging keeps the entry with the larger s. That merge is idempotent, commutative and
associative, so duplicated, reordered and lost-then-resent deltas all end in the same table.
The value the planner reads is the visit-weighted mean over origins:

    Q(c) = Σ_o n_o(c) · v_o(c) / Σ_o n_o(c),   visits(c) = Σ_o n_o(c)

summed over origins in sorted order, so replicas holding the same entries agree bit for bit.

Sequence numbers are a hybrid clock, s = max(s_prev + 1, now in ms): a node that lost its
state directory still outranks what it published before.

Trust: libp2p signs every gossip message; `SwarmTable.apply` takes the signer the agent
verified and rejects a delta whose origin is someone else (forged), that is expired, or that
brings no cell newer than what is held (a replay or stale copy: harmless, but not worth
re-processing). A signed origin can still lie about its own experience; the bounds on visits
and values below cap how far one origin can pull a cell. Anti-entropy hands a joining node the
*signed* messages that carry the current cells (`snapshot`), which it re-verifies one by one,
so the peer serving the snapshot cannot forge other origins' entries.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import model_validator

from hivenode.planner.state import TABLE_SHAPE, PlannerError
from hivenode.protocol.errors import ProtocolError
from hivenode.protocol.limits import MAX_GOSSIP_BYTES
from hivenode.protocol.records import Record

Key = tuple[int, int, int, int, int]
"""(complexity, dataset, nodes, latency, action): one cell of the table."""
WireEntry = tuple[int, int, int, int, int, int, float, int]
"""A cell on the wire: (*key, visits, mean, seq)."""

MAX_VISITS = 2**31
MAX_ABS_VALUE = 1_000.0
"""Rewards lie in [-1, 1] and γ < 1, so |Q| ≤ 1/(1-γ); anything far above is garbage."""
DELTA_TTL = 3600.0
ENTRY_WIRE_BYTES = 33
"""Most bytes one entry takes in msgpack: array header 1, five small ints 5, three 9-byte
numbers (visits, float64 mean, seq)."""
RECORD_OVERHEAD_BYTES = 1024
MAX_ENTRIES_PER_DELTA = (MAX_GOSSIP_BYTES - RECORD_OVERHEAD_BYTES) // ENTRY_WIRE_BYTES
"""1955: the whole 720-cell table fits in one delta; larger tables split (`deltas`)."""


Verify = Callable[[bytes], tuple[str, bytes] | None]
"""(signer, payload) of a signed gossip message whose signature holds, else None: the agent's
`verify_signed(message, QTABLE_TOPIC)`."""


class DeltaRejected(ProtocolError):
    """A delta this node will not apply; the message says why."""


class QDelta(Record):
    """One origin's cells as of sequence number `seq`."""

    entries: tuple[WireEntry, ...] = ()

    @model_validator(mode="after")
    def _valid(self) -> QDelta:
        if len(self.entries) > MAX_ENTRIES_PER_DELTA:
            raise ValueError(f"more than {MAX_ENTRIES_PER_DELTA} entries")
        seen: set[Key] = set()
        for *key, visits, mean, seq in self.entries:
            cell = _key(key)
            if cell in seen:
                raise ValueError(f"cell {cell} twice")
            seen.add(cell)
            if not 1 <= visits <= MAX_VISITS:
                raise ValueError(f"visits {visits} outside [1, {MAX_VISITS}]")
            if not (math.isfinite(mean) and abs(mean) <= MAX_ABS_VALUE):
                raise ValueError(f"value {mean} is not finite or exceeds {MAX_ABS_VALUE}")
            if not 0 <= seq <= self.seq:
                raise ValueError(f"cell seq {seq} is newer than the delta's {self.seq}")
        return self


def _verified(signed: bytes, verify: Verify) -> QDelta | None:
    """The delta in a signed message when the signature holds and the signer is its origin."""
    checked = verify(signed)
    if checked is None:
        return None
    try:
        delta = QDelta.from_wire(checked[1])
    except ProtocolError:
        return None
    return delta if delta.origin == checked[0] else None


def _key(values: Any) -> Key:
    key = tuple(int(v) for v in values)
    if len(key) != len(TABLE_SHAPE) or not all(
        0 <= v < n for v, n in zip(key, TABLE_SHAPE, strict=True)
    ):
        raise ValueError(f"cell {key} outside the table {TABLE_SHAPE}")
    return key  # type: ignore[return-value]


@dataclass(frozen=True)
class Cell:
    visits: int
    mean: float
    seq: int


def _cell(entry: WireEntry) -> Cell:
    return Cell(int(entry[5]), float(entry[6]), int(entry[7]))


@dataclass
class _Evidence:
    signed: bytes
    cells: dict[Key, Cell]
    """The cells the message carries."""


class SwarmTable:
    """Every origin's cells; `own_origin` is this node (its peer id)."""

    def __init__(self, own_origin: str) -> None:
        self.own_origin = own_origin
        self._cells: dict[str, dict[Key, Cell]] = {}
        self._clock: dict[str, int] = {}
        self._evidence: dict[str, list[_Evidence]] = {}
        self._merged: tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]] | None = None

    def cell(self, origin: str, key: Key) -> Cell | None:
        return self._cells.get(origin, {}).get(key)

    def origins(self) -> list[str]:
        return sorted(self._cells)

    def cells(self, origin: str) -> list[tuple[Key, Cell]]:
        """One origin's cells in key order."""
        return sorted(self._cells.get(origin, {}).items())

    def set_own(self, key: Key, visits: int, mean: float, now: float) -> Cell:
        """Record this node's new estimate for `key` under a fresh sequence number."""
        seq = max(self._clock.get(self.own_origin, 0) + 1, int(now * 1000))
        cell = Cell(visits, float(mean), seq)
        self._put(self.own_origin, _key(key), cell)
        return cell

    def deltas(
        self,
        origin: str | None = None,
        since: int = -1,
        *,
        now: float,
        ttl: float = DELTA_TTL,
        max_entries: int = MAX_ENTRIES_PER_DELTA,
    ) -> list[QDelta]:
        """`origin`'s cells changed after `since` (all of them with -1, for a resend), as deltas
        of at most `max_entries` cells each, oldest first."""
        origin = origin or self.own_origin
        changed = sorted(
            ((key, cell) for key, cell in self._cells.get(origin, {}).items() if cell.seq > since),
            key=lambda item: (item[1].seq, item[0]),
        )
        out = []
        for start in range(0, len(changed), max_entries):
            chunk = changed[start : start + max_entries]
            entries = tuple((*key, c.visits, c.mean, c.seq) for key, c in chunk)
            seq = max(c.seq for _, c in chunk)
            out.append(QDelta(origin=origin, seq=seq, timestamp=now, ttl=ttl, entries=entries))
        return out

    def apply(
        self, delta: QDelta, signer: str, *, now: float | None = None, signed: bytes | None = None
    ) -> int:
        """Merge a delta that `signer` signed; the number of cells it changed.

        `now` (live gossip) enforces the TTL; leave it None for a snapshot's old messages.
        `signed` (the whole signed pubsub message) is kept as evidence for `snapshot`.
        Raises DeltaRejected when forged, expired, or (from another origin) stale.
        """
        if delta.origin != signer:
            raise DeltaRejected(f"delta from origin {delta.origin} was signed by {signer}")
        if now is not None and delta.is_expired(now):
            raise DeltaRejected(f"delta {delta.origin}#{delta.seq} expired")
        cells = {_key(entry[:5]): entry for entry in delta.entries}
        changed = 0
        for key, entry in cells.items():
            held = self.cell(delta.origin, key)
            if held is None or entry[7] > held.seq:
                self._put(delta.origin, key, _cell(entry))
                changed += 1
        if signed is not None:
            self._keep(delta.origin, signed, {key: _cell(entry) for key, entry in cells.items()})
        if not changed and delta.origin != self.own_origin:
            raise DeltaRejected(f"delta {delta.origin}#{delta.seq} brings nothing new (replay)")
        return changed

    def absorb(self, other: SwarmTable) -> int:
        """Merge another table's cells with the same rule but no signatures: for a file the
        user chose to trust (`hivenode qtable import`); the number of cells changed."""
        changed = 0
        for origin in other.origins():
            for key, cell in other.cells(origin):
                held = self.cell(origin, key)
                if held is None or cell.seq > held.seq:
                    self._put(origin, key, cell)
                    changed += 1
        return changed

    def snapshot(self) -> list[bytes]:
        """The signed messages that together carry every current cell they can vouch for."""
        return [e.signed for origin in self.origins() for e in self._evidence.get(origin, [])]

    def merged(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
        """(values, visits) arrays of TABLE_SHAPE; see the module docstring's formula."""
        if self._merged is None:
            weighted = np.zeros(TABLE_SHAPE)
            visits = np.zeros(TABLE_SHAPE, dtype=np.int64)
            for origin in self.origins():
                for key, cell in self._cells[origin].items():
                    weighted[key] += cell.visits * cell.mean
                    visits[key] += cell.visits
            values = np.divide(weighted, visits, out=np.zeros(TABLE_SHAPE), where=visits > 0)
            self._merged = (values, visits)
        return self._merged

    def rename_origin(self, old: str, new: str) -> None:
        """Adopt cells recorded under a placeholder origin (an import before the node had a
        peer id) as `new`'s own; they are re-stamped so peers take them."""
        moved = self._cells.pop(old, {})
        self._clock.pop(old, None)
        self._evidence.pop(old, None)
        for key, cell in sorted(moved.items(), key=lambda item: item[1].seq):
            ours = self.cell(new, key)
            if ours is None or ours.visits < cell.visits:
                seq = self._clock.get(new, 0) + 1
                self._put(new, key, Cell(cell.visits, cell.mean, max(seq, cell.seq)))

    def to_json(self) -> dict[str, Any]:
        return {
            "own_origin": self.own_origin,
            "origins": {
                origin: {
                    "clock": self._clock.get(origin, 0),
                    "cells": [[*key, c.visits, c.mean, c.seq] for key, c in sorted(cells.items())],
                    "evidence": [
                        base64.b64encode(e.signed).decode("ascii")
                        for e in self._evidence.get(origin, [])
                    ],
                }
                for origin, cells in sorted(self._cells.items())
            },
        }

    @classmethod
    def from_json(cls, doc: Any, verify: Verify | None = None) -> SwarmTable:
        """The table `to_json` wrote. Kept signed messages are re-checked with `verify` and
        dropped without it (a table file is not proof of what other nodes signed)."""
        try:
            table = cls(str(doc["own_origin"]))
            for origin, data in doc["origins"].items():
                for *key, visits, mean, seq in data["cells"]:
                    table._put(origin, _key(key), Cell(int(visits), float(mean), int(seq)))
                table._clock[origin] = max(table._clock.get(origin, 0), int(data["clock"]))
                for text in data.get("evidence", []) if verify is not None else []:
                    table._keep_verified(origin, base64.b64decode(text), verify)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            # OverflowError: int(Infinity), which JSON happily parses
            raise PlannerError(f"not a Q-table document: {type(exc).__name__} {exc}") from exc
        return table

    def apply_snapshot(self, messages: list[bytes], verify: Verify) -> tuple[int, int]:
        """Merge a peer's `snapshot` (anti-entropy on join): (cells changed, messages
        refused). Each message is re-verified: the serving peer vouches for nothing."""
        changed = refused = 0
        for signed in messages:
            delta = _verified(signed, verify)
            try:
                if delta is None:
                    raise DeltaRejected("bad signature or undecodable delta")
                changed += self.apply(delta, delta.origin, signed=signed)
            except DeltaRejected:
                refused += 1
        return changed, refused

    def _put(self, origin: str, key: Key, cell: Cell) -> None:
        self._cells.setdefault(origin, {})[key] = cell
        self._clock[origin] = max(self._clock.get(origin, 0), cell.seq)
        self._merged = None

    def _keep_verified(self, origin: str, signed: bytes, verify: Verify | None) -> None:
        delta = None if verify is None else _verified(signed, verify)
        if delta is not None and delta.origin == origin:
            self._keep(origin, signed, {_key(e[:5]): _cell(e) for e in delta.entries})

    def _keep(self, origin: str, signed: bytes, cells: dict[Key, Cell]) -> None:
        """Keep a signed message while it carries at least one current cell; drop the ones
        it supersedes, so evidence stays bounded by the number of cells."""
        kept = [*self._evidence.get(origin, []), _Evidence(signed, cells)]
        current = self._cells.get(origin, {})
        needed: list[_Evidence] = []
        covered: set[Key] = set()
        for evidence in reversed(kept):  # newest first: it wins the cells it shares
            useful = {
                key
                for key, cell in evidence.cells.items()
                if key not in covered and current.get(key) == cell
            }
            if useful:
                needed.append(evidence)
                covered |= useful
        self._evidence[origin] = needed[::-1]
