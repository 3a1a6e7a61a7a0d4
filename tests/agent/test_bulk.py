"""Tensors move between real nodes over the authenticated fast path, and every attack on
its TCP channel is refused with nothing handed to the application."""

from __future__ import annotations

import enum
import os
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from swarm_helpers import local_swarm, wait_until

from hivenode.agent.bulk import BulkError, BulkReceiver, send_tensors
from hivenode.agent.bulk.wire import FRAME_BYTES, FRAME_HEADER
from hivenode.agent.node import Node


@dataclass
class Inbox:
    received: list[tuple[str, Mapping[str, Any], tuple[np.ndarray, ...]]] = field(
        default_factory=list
    )

    async def __call__(
        self, sender: str, meta: Mapping[str, Any], tensors: tuple[np.ndarray, ...]
    ) -> None:
        self.received.append((sender, meta, tensors))


@dataclass
class Pair:
    sender: Node
    receiver: Node
    bulk: BulkReceiver
    inbox: Inbox
    intruder: Node | None = None
    """A third peer, connected to the receiver, when asked for."""


@asynccontextmanager
async def pair(
    tmp_path: Path, *, intruder: bool = False, **receiver_options: Any
) -> AsyncIterator[Pair]:
    async with local_swarm(tmp_path) as start:
        receiver = await start("receiver")
        sender = await start("sender", bootstrap=[receiver])
        third = await start("intruder", bootstrap=[receiver]) if intruder else None
        inbox = Inbox()
        async with trio.open_nursery() as nursery:
            bulk = BulkReceiver(receiver, inbox, **receiver_options)
            await nursery.start(bulk.run)
            yield Pair(sender, receiver, bulk, inbox, third)
            nursery.cancel_scope.cancel()


def sample_tensors() -> list[np.ndarray]:
    rng = np.random.default_rng(4)
    return [
        rng.standard_normal(3 * FRAME_BYTES // 4 + 1001).astype(np.float32),  # > 3 frames
        rng.integers(-(2**40), 2**40, size=(7, 3), dtype=np.int64),
        rng.standard_normal((5, 9)).astype(np.float16),
        np.array([True, False, True]),
        np.zeros((0, 4), np.float64),
    ]


async def test_tensors_arrive_identical_as_views_over_one_buffer(tmp_path: Path) -> None:
    sent = sample_tensors()
    seen: list[tuple[int, int]] = []
    async with pair(tmp_path) as p:
        report = await send_tensors(
            p.sender,
            p.receiver.peer_id,
            sent,
            meta={"round": 3},
            timeout=20,
            progress=lambda done, total: seen.append((done, total)),
        )
    total = sum(a.nbytes for a in sent)
    assert report.path == "bulk" and report.bytes == total and report.cipher is not None
    assert seen[-1] == (total, total) and len(seen) == 4
    [(origin, meta, got)] = p.inbox.received
    assert origin == p.sender.peer_id and meta == {"round": 3}
    for before, after in zip(sent, got, strict=True):
        assert after.dtype == before.dtype and after.shape == before.shape
        assert after.tobytes() == before.tobytes()
    addresses = [a.__array_interface__["data"][0] for a in got]
    for previous, nxt, array in zip(addresses, addresses[1:], got, strict=False):
        assert nxt == previous + array.nbytes, "each array follows the last in one buffer"
    assert all(not a.flags.owndata for a in got), "views, not copies"


class Fault(enum.Enum):
    TAMPERED_FRAME = "tampered"
    REORDERED_FRAMES = "reordered"
    TRUNCATED_STREAM = "truncated"
    TRUNCATED_WITH_FORGED_LAST_FLAG = "truncated_forged_flag"
    REPLAYED_FRAME = "replayed_frame"
    BYTES_AFTER_LAST_FRAME = "trailing"


def flip_byte(record: bytes, at: int) -> bytes:
    changed = bytearray(record)
    changed[at] ^= 0x01
    return bytes(changed)


def forge_last_flag(record: bytes) -> bytes:
    length, _ = FRAME_HEADER.unpack_from(record)
    return FRAME_HEADER.pack(length, 1) + record[FRAME_HEADER.size :]


# records: [preamble, frame 0, frame 1, frame 2, frame 3 (last)]
ATTACKS: dict[Fault, Callable[[list[bytes]], list[bytes]]] = {
    Fault.TAMPERED_FRAME: lambda r: [*r[:2], flip_byte(r[2], 1000), *r[3:]],
    Fault.REORDERED_FRAMES: lambda r: [r[0], r[2], r[1], *r[3:]],
    Fault.TRUNCATED_STREAM: lambda r: r[:-1],
    Fault.TRUNCATED_WITH_FORGED_LAST_FLAG: lambda r: [*r[:-2], forge_last_flag(r[-2])],
    Fault.REPLAYED_FRAME: lambda r: [*r[:2], r[1], *r[3:]],
    Fault.BYTES_AFTER_LAST_FRAME: lambda r: [*r, r[-1]],
}


@pytest.mark.parametrize("fault", list(Fault), ids=lambda f: f.value)
async def test_each_attack_on_the_channel_is_rejected_and_nothing_delivered(
    tmp_path: Path, fault: Fault
) -> None:
    """The filter runs again on every resume: a truncation is resumed (it looks like a broken
    connection) until the resumes run out; a forgery ends the transfer at once."""
    async with pair(tmp_path) as p:
        with pytest.raises(BulkError) as caught:
            await send_tensors(
                p.sender,
                p.receiver.peer_id,
                sample_tensors(),
                timeout=20,
                frame_filter=ATTACKS[fault],
            )
        assert caught.value.code == "rejected"
        assert p.inbox.received == []
        assert len(p.bulk.rejections) == 1
        assert p.bulk.pending_transfers == 0, "nothing of it is kept"
        # the receiver keeps serving honest senders
        report = await send_tensors(p.sender, p.receiver.peer_id, sample_tensors(), timeout=20)
        assert report.path == "bulk" and len(p.inbox.received) == 1


async def raw_channel(address: tuple[str, int], records: list[bytes]) -> None:
    """A connection from outside libp2p sending `records` as they are."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        try:
            for record in records:
                await stream.send_all(record)
            await stream.send_eof()
            with trio.move_on_after(5):
                assert await stream.receive_some(1) == b"", "the receiver closes, never answers"
        except trio.BrokenResourceError:
            pass  # closed on us mid-send: refused


async def test_a_replayed_token_is_refused(tmp_path: Path) -> None:
    captured: list[bytes] = []

    def capture(records: list[bytes]) -> list[bytes]:
        captured.extend(records)
        return records

    async with pair(tmp_path) as p:
        await send_tensors(
            p.sender, p.receiver.peer_id, sample_tensors(), timeout=20, frame_filter=capture
        )
        await raw_channel(p.bulk.listen_address, captured)
        await wait_until(lambda: bool(p.bulk.rejections), 5, "the replay to be refused")
        assert p.bulk.rejections == ["rejected: unknown or already used token"]
        assert len(p.inbox.received) == 1


async def test_a_forged_token_is_refused_while_an_offer_is_pending(tmp_path: Path) -> None:
    """A token binds the channel to the peer the libp2p stream authenticated: whoever does
    not hold it (any other peer, any on-path attacker) cannot open a channel by guessing."""
    async with pair(tmp_path) as p, trio.open_nursery() as nursery:

        def race_a_forger(records: list[bytes]) -> list[bytes]:
            forged = [records[0][:4] + os.urandom(16), records[1]]
            nursery.start_soon(raw_channel, p.bulk.listen_address, forged)
            return records

        report = await send_tensors(
            p.sender, p.receiver.peer_id, sample_tensors(), timeout=20, frame_filter=race_a_forger
        )
        assert report.path == "bulk"
        await wait_until(lambda: bool(p.bulk.rejections), 5, "the forger to be refused")
        assert p.bulk.rejections == ["rejected: unknown or already used token"]
        assert len(p.inbox.received) == 1


async def test_an_offer_over_the_receivers_byte_limit_is_refused(tmp_path: Path) -> None:
    async with pair(tmp_path, max_total_bytes=1024 * 1024) as p:
        with pytest.raises(BulkError) as caught:
            await send_tensors(p.sender, p.receiver.peer_id, sample_tensors(), timeout=20)
        assert caught.value.code == "too_large"
        assert p.inbox.received == []


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_the_libp2p_stream_carries_the_bytes_when_the_channel_is_unreachable(
    tmp_path: Path,
) -> None:
    sent = sample_tensors()
    async with pair(tmp_path, advertised_address=("127.0.0.1", closed_port())) as p:
        report = await send_tensors(p.sender, p.receiver.peer_id, sent, timeout=30)
    assert report.path == "stream" and report.cipher is None
    [(_, _, got)] = p.inbox.received
    assert [a.tobytes() for a in got] == [a.tobytes() for a in sent]


async def test_a_failing_consumer_is_reported_to_the_sender(tmp_path: Path) -> None:
    async with pair(tmp_path) as p:

        async def refuse(sender: str, meta: Mapping[str, Any], tensors: Any) -> None:
            raise BulkError("refused", "not in a round")

        p.bulk._on_tensors = refuse
        with pytest.raises(BulkError) as caught:
            await send_tensors(p.sender, p.receiver.peer_id, sample_tensors(), timeout=20)
        assert caught.value.code == "refused"


async def test_a_sender_that_speaks_only_1_0_is_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1.0.0 carries the sha256 in the offer; 1.1.0 after the payload. A receiver serves both."""
    from hivenode.agent.bulk import sender
    from hivenode.agent.bulk.wire import BULK_PROTOCOL_1_0

    monkeypatch.setattr(sender, "SENDER_PROTOCOLS", (BULK_PROTOCOL_1_0,))
    sent = sample_tensors()
    async with pair(tmp_path) as p:
        report = await send_tensors(p.sender, p.receiver.peer_id, sent, timeout=20)
    assert report.path == "bulk"
    [(_, _, got)] = p.inbox.received
    assert [a.tobytes() for a in got] == [a.tobytes() for a in sent]
