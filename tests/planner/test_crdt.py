"""The gossiped Q-table CRDT: convergence under duplicated, reordered and lost deltas; forged,
replayed and oversized deltas; anti-entropy snapshots.

libp2p's message signing is stood in for by `sign`/`verify` below (signer id + payload): the
CRDT only ever sees the signer the agent verified, which is what these tests control.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivenode.planner.crdt import (
    MAX_ENTRIES_PER_DELTA,
    MAX_VISITS,
    DeltaRejected,
    QDelta,
    SwarmTable,
)
from hivenode.planner.qtable import QTable
from hivenode.planner.state import ACTIONS, STATE_SHAPE, TABLE_SHAPE, State
from hivenode.protocol.errors import ProtocolError
from hivenode.protocol.limits import MAX_GOSSIP_BYTES

ORIGINS = ("A", "B", "C")
KEYS = st.tuples(*(st.integers(0, n - 1) for n in TABLE_SHAPE))


def sign(signer: str, delta: QDelta) -> bytes:
    return signer.encode() + b"\0" + delta.to_wire()


def verify(signed: bytes) -> tuple[str, bytes] | None:
    signer, sep, data = signed.partition(b"\0")
    if not sep or signer.startswith(b"BAD"):
        return None
    return signer.decode(), data


def deliver(table: SwarmTable, signed: bytes, now: float | None = None) -> int:
    checked = verify(signed)
    assert checked is not None
    try:
        return table.apply(QDelta.from_wire(checked[1]), checked[0], now=now, signed=signed)
    except DeltaRejected:
        return 0


def learn(
    events: Sequence[tuple[int, tuple[int, ...], float]],
) -> tuple[dict[str, QTable], list[bytes]]:
    """Each event: an origin updates one cell; it publishes what changed since its last delta."""
    sources = {origin: QTable(origin) for origin in ORIGINS}
    published = dict.fromkeys(ORIGINS, -1)
    messages = []
    for step, (who, key, reward) in enumerate(events):
        origin = ORIGINS[who]
        source = sources[origin]
        source.update(State.from_index(key[:4]), ACTIONS[key[4]], reward, now=1.0 + step)
        for delta in source.swarm.deltas(since=published[origin], now=1.0 + step):
            messages.append(sign(origin, delta))
            published[origin] = delta.seq
    return sources, messages


def reference(sources: dict[str, QTable]) -> np.ndarray:
    """Visit-weighted mean over origins, computed with np.average cell by cell."""
    values = np.zeros(TABLE_SHAPE)
    for index in np.ndindex(TABLE_SHAPE):
        cells = [c for s in sources.values() if (c := s.swarm.cell(s.origin, index))]
        if cells:
            values[index] = np.average([c.mean for c in cells], weights=[c.visits for c in cells])
    return values


EVENTS = st.lists(
    st.tuples(st.integers(0, 2), KEYS, st.floats(-1, 1, allow_nan=False)), min_size=1, max_size=25
)


@settings(max_examples=60, deadline=None)
@given(EVENTS, st.data())
def test_duplicated_and_reordered_deltas_converge_to_the_same_table(
    events: list[tuple[int, tuple[int, ...], float]], data: st.DataObject
) -> None:
    sources, messages = learn(events)
    replicas = []
    for _ in range(3):
        order = data.draw(st.permutations(messages))
        extra = data.draw(st.lists(st.sampled_from(messages), max_size=10))
        replica = SwarmTable("R")
        for signed in [*order, *extra]:
            deliver(replica, signed)
        replicas.append(replica.merged()[0])
    assert all(np.array_equal(replicas[0], other) for other in replicas[1:])
    np.testing.assert_allclose(replicas[0], reference(sources), rtol=0, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(EVENTS, st.data())
def test_lost_deltas_converge_once_resent(
    events: list[tuple[int, tuple[int, ...], float]], data: st.DataObject
) -> None:
    sources, messages = learn(events)
    replicas = []
    for _ in range(2):
        kept = data.draw(st.lists(st.sampled_from(messages), max_size=len(messages)))
        replica = SwarmTable("R")
        for signed in kept:
            deliver(replica, signed)
        resend = [sign(o, d) for o, s in sources.items() for d in s.swarm.deltas(now=99.0)]
        for signed in data.draw(st.permutations(resend)):
            deliver(replica, signed)
        replicas.append(replica.merged())
    values, visits = replicas[0]
    assert np.array_equal(values, replicas[1][0]) and np.array_equal(visits, replicas[1][1])
    np.testing.assert_allclose(values, reference(sources), rtol=0, atol=1e-12)


def two_updates() -> tuple[QTable, list[QDelta]]:
    source = QTable("A")
    source.update(State(0, 0, 0, 0), ACTIONS[0], 0.5, now=1.0)
    first = source.swarm.deltas(now=1.0)
    source.update(State(0, 0, 0, 0), ACTIONS[0], 1.0, now=2.0)
    second = source.swarm.deltas(since=first[0].seq, now=2.0)
    return source, [*first, *second]


def test_a_delta_signed_by_someone_else_is_rejected() -> None:
    _, (delta, _) = two_updates()
    table = SwarmTable("R")
    with pytest.raises(DeltaRejected, match="signed by B"):
        table.apply(delta, "B")
    assert table.origins() == []


def test_a_replayed_or_stale_delta_is_rejected() -> None:
    _, (old, new) = two_updates()
    table = SwarmTable("R")
    assert table.apply(new, "A") == 1
    with pytest.raises(DeltaRejected, match="replay"):
        table.apply(new, "A")
    with pytest.raises(DeltaRejected, match="replay"):
        table.apply(old, "A")  # older seq for the same cell
    assert table.cell("A", (0, 0, 0, 0, 0)).mean == pytest.approx(0.75)  # type: ignore[union-attr]


def test_an_expired_delta_is_rejected_on_live_gossip() -> None:
    _, (delta, _) = two_updates()
    with pytest.raises(DeltaRejected, match="expired"):
        SwarmTable("R").apply(delta, "A", now=delta.timestamp + delta.ttl)


def test_the_nodes_own_echo_is_not_an_error() -> None:
    source, (_, delta) = two_updates()
    assert source.swarm.apply(delta, "A", signed=sign("A", delta)) == 0
    assert len(source.swarm.snapshot()) == 1


def test_a_node_that_lost_its_state_still_outranks_its_old_entries() -> None:
    _, (_, delta) = two_updates()
    peer = SwarmTable("P")
    peer.apply(delta, "A")
    reborn = QTable("A")
    reborn.update(State(0, 0, 0, 0), ACTIONS[0], -1.0, now=3.0)
    assert peer.apply(reborn.swarm.deltas(now=3.0)[0], "A") == 1
    assert peer.merged()[0][0, 0, 0, 0, 0] == -1.0


def test_the_whole_table_fits_one_gossip_message_and_splits_when_asked() -> None:
    table = SwarmTable("12D3KooW" + "x" * 44)
    for index in np.ndindex(TABLE_SHAPE):
        table.set_own(index, MAX_VISITS, -math.pi, now=2e12)
    (whole,) = table.deltas(now=2e9)
    assert len(whole.entries) == math.prod(TABLE_SHAPE) <= MAX_ENTRIES_PER_DELTA
    assert len(whole.to_wire()) < MAX_GOSSIP_BYTES
    parts = table.deltas(now=2e9, max_entries=100)
    assert [len(p.entries) for p in parts] == [100] * 7 + [20]
    replica = SwarmTable("R")
    for part in reversed(parts):
        replica.apply(QDelta.from_wire(part.to_wire()), table.own_origin)
    assert np.array_equal(replica.merged()[0], table.merged()[0])


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ([9, 0, 0, 0, 0, 1, 0.5, 1], "outside the table"),
        ([0, 0, 0, 0, 0, 0, 0.5, 1], "visits"),
        ([0, 0, 0, 0, 0, 1, float("nan"), 1], "finite"),
        ([0, 0, 0, 0, 0, 1, 1e9, 1], "finite"),
        ([0, 0, 0, 0, 0, 1, 0.5, 99], "newer than the delta"),
    ],
)
def test_malformed_entries_are_one_protocol_error(entry: list[object], reason: str) -> None:
    raw = {"origin": "A", "seq": 5, "timestamp": 1.0, "ttl": 60.0, "entries": [entry]}
    with pytest.raises(ProtocolError, match=reason):
        QDelta.from_wire(msgpack.packb(raw))


def test_a_cell_listed_twice_is_refused() -> None:
    entry = [0, 0, 0, 0, 0, 1, 0.5, 1]
    raw = {"origin": "A", "seq": 5, "timestamp": 1.0, "ttl": 60.0, "entries": [entry, entry]}
    with pytest.raises(ProtocolError, match="twice"):
        QDelta.from_mapping(raw)


def test_a_joining_node_pulls_a_snapshot_and_verifies_every_message() -> None:
    events = [(i % 3, (i % 4, i % 3, 0, 1, i % 5), i / 10 - 0.5) for i in range(12)]
    sources, messages = learn(events)
    server = SwarmTable("S")
    for signed in messages:
        deliver(server, signed, now=5.0)
    snapshot = server.snapshot()
    assert len(snapshot) <= len(messages)
    joiner = SwarmTable("J")
    forged = sign("B", QDelta(origin="A", seq=10**15, timestamp=1, ttl=60, entries=()))
    changed, refused = joiner.apply_snapshot(
        [*snapshot, b"BAD\0" + messages[0][2:], forged], verify
    )
    assert refused == 2 and changed > 0
    assert np.array_equal(joiner.merged()[0], server.merged()[0])
    np.testing.assert_allclose(joiner.merged()[0], reference(sources), atol=1e-12)


def test_evidence_stays_bounded_by_the_cells() -> None:
    source = QTable("A")
    server = SwarmTable("S")
    for step in range(30):
        source.update(State(0, 0, 0, 0), ACTIONS[step % 2], 0.1, now=1.0 + step)
        delta = source.swarm.deltas(since=-1, now=1.0 + step)[0]
        deliver(server, sign("A", delta))
    assert len(server.snapshot()) == 1


def test_json_round_trip_keeps_cells_and_only_verified_evidence() -> None:
    server = SwarmTable("S")
    _, messages = learn([(0, (0, 0, 0, 0, 0), 0.3), (1, (1, 1, 1, 1, 1), -0.2)])
    for signed in messages:
        deliver(server, signed)
    doc = server.to_json()
    again = SwarmTable.from_json(doc, verify)
    assert np.array_equal(again.merged()[0], server.merged()[0])
    assert again.snapshot() == server.snapshot()
    assert SwarmTable.from_json(doc).snapshot() == []  # no verifier: no evidence trusted


def test_state_shape_matches_the_legacy_table() -> None:
    assert (*STATE_SHAPE, len(ACTIONS)) == TABLE_SHAPE == (4, 3, 4, 3, 5)
