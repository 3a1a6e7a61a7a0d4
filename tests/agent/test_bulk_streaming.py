"""A receiver hands each tensor on as soon as its bytes are authenticated, in order and
once, while the rest of the transfer is still arriving; a transfer that fails afterwards is
named to the consumer so it can drop what it accumulated."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from test_bulk import Inbox, flip_byte, pair

from hivenode.agent.bulk import BulkError, TensorArrival, Upload, send_tensors
from hivenode.agent.bulk.wire import FRAME_BYTES


@dataclass
class Consumer:
    """Records every arrival, and how many transfers had completed when it came."""

    inbox: Inbox | None = None
    arrivals: list[TensorArrival] = field(default_factory=list)
    completed_before: list[int] = field(default_factory=list)
    abandoned: list[tuple[str, str, str]] = field(default_factory=list)

    async def on_tensor(self, arrival: TensorArrival) -> None:
        self.arrivals.append(arrival)
        self.completed_before.append(len(self.inbox.received) if self.inbox else -1)

    async def on_abandoned(self, peer: str, transfer: str, error: BulkError) -> None:
        self.abandoned.append((peer, transfer, error.code))


def tensors_across_frames() -> list[np.ndarray]:
    """Tensor ends at 1.5, 2.5 and 4.5 MiB (+ a little): frames 0-1, 2, 3-4, 4."""
    rng = np.random.default_rng(11)
    return [
        rng.standard_normal(3 * FRAME_BYTES // 8).astype(np.float32),
        rng.integers(0, 2**31, FRAME_BYTES // 8, dtype=np.int64),
        rng.standard_normal(FRAME_BYTES // 4).astype(np.float64),
        np.arange(10, dtype=np.int16),
    ]


def assert_same(arrival: TensorArrival, sent: np.ndarray) -> None:
    assert arrival.array.dtype == sent.dtype and arrival.array.shape == sent.shape
    assert arrival.array.tobytes() == sent.tobytes()


async def test_tensors_are_handed_on_in_order_before_the_transfer_completes(
    tmp_path: Path,
) -> None:
    sent = tensors_across_frames()
    consumer = Consumer()
    async with pair(
        tmp_path, on_tensor=consumer.on_tensor, on_abandoned=consumer.on_abandoned
    ) as p:
        consumer.inbox = p.inbox
        await send_tensors(p.sender, p.receiver.peer_id, sent, meta={"round": 2}, timeout=20)
    assert [a.index for a in consumer.arrivals] == [0, 1, 2, 3]
    assert consumer.completed_before == [0, 0, 0, 0], "each before the completion callback"
    for arrival, tensor in zip(consumer.arrivals, sent, strict=True):
        assert_same(arrival, tensor)
        assert arrival.peer_id == p.sender.peer_id and arrival.meta == {"round": 2}
        assert arrival.count == 4 and not arrival.array.flags.writeable
    assert len({a.transfer for a in consumer.arrivals}) == 1
    assert len(p.inbox.received) == 1 and consumer.abandoned == []


async def test_a_tensor_is_handed_on_while_the_rest_is_still_missing_and_never_twice(
    tmp_path: Path,
) -> None:
    """The channel breaks in frame 3: tensors 0 and 1 (ending in frames 1 and 2) are out
    already, before anything of tensor 2's end exists on the receiver; the resume hands on
    only the others."""
    sent = tensors_across_frames()
    consumer = Consumer()
    async with pair(tmp_path, on_tensor=consumer.on_tensor) as p:
        consumer.inbox = p.inbox
        upload = Upload(
            p.sender,
            p.receiver.peer_id,
            sent,
            timeout=20,
            channel_fault=lambda attempt, index: attempt == 0 and index == 3,
        )
        await upload.offer()
        assert await upload.send() is None
        assert [a.index for a in consumer.arrivals] == [0, 1]
        assert p.inbox.received == []
        await upload.resume()
        assert await upload.send() is not None
    assert [a.index for a in consumer.arrivals] == [0, 1, 2, 3]
    for arrival, tensor in zip(consumer.arrivals, sent, strict=True):
        assert_same(arrival, tensor)
    [(_, _, got)] = p.inbox.received
    assert [a.tobytes() for a in got] == [a.tobytes() for a in sent]


async def test_a_forgery_after_a_handed_on_tensor_abandons_the_transfer(tmp_path: Path) -> None:
    """What per-tensor delivery means for the threat model: tensors before a forged frame were
    authentic and are handed on; the transfer then fails, the consumer is told to drop them,
    and the completion callback never runs."""
    sent = tensors_across_frames()
    consumer = Consumer()
    async with pair(
        tmp_path, on_tensor=consumer.on_tensor, on_abandoned=consumer.on_abandoned
    ) as p:
        with pytest.raises(BulkError) as caught:
            await send_tensors(
                p.sender,
                p.receiver.peer_id,
                sent,
                timeout=20,
                # records: [preamble, frame 0, ..., frame 4]; frame 3 is forged
                frame_filter=lambda r: [*r[:4], flip_byte(r[4], 99), *r[5:]],
            )
    assert caught.value.code == "rejected"
    assert [a.index for a in consumer.arrivals] == [0, 1]
    for arrival, tensor in zip(consumer.arrivals, sent, strict=False):
        assert_same(arrival, tensor)
    assert consumer.abandoned == [(p.sender.peer_id, consumer.arrivals[0].transfer, "rejected")]
    assert p.inbox.received == []


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_the_libp2p_fallback_hands_on_every_tensor_too(tmp_path: Path) -> None:
    sent = tensors_across_frames()
    consumer = Consumer()
    unreachable = ("127.0.0.1", closed_port())
    async with pair(tmp_path, on_tensor=consumer.on_tensor, advertised_address=unreachable) as p:
        consumer.inbox = p.inbox
        report = await send_tensors(p.sender, p.receiver.peer_id, sent, timeout=30)
    assert report.path == "stream"
    assert [a.index for a in consumer.arrivals] == [0, 1, 2, 3]
    assert consumer.completed_before == [0, 0, 0, 0]
    for arrival, tensor in zip(consumer.arrivals, sent, strict=True):
        assert_same(arrival, tensor)


async def test_the_sha256_still_gates_completion_when_the_sender_changes_its_arrays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames authenticate what the sender sealed; the sha256 is what it meant to send. A
    training loop that writes to an array mid-transfer makes them differ: tensors already
    handed on were authentic frames, and the transfer still fails before `on_tensors`.

    1.0.0 hashes before sending, which makes the change land after the hash for certain."""
    from hivenode.agent.bulk import sender
    from hivenode.agent.bulk.wire import BULK_PROTOCOL_1_0

    monkeypatch.setattr(sender, "SENDER_PROTOCOLS", (BULK_PROTOCOL_1_0,))
    sent = tensors_across_frames()
    consumer = Consumer()

    def train_while_sending(attempt: int, index: int) -> bool:
        if index == 1:
            sent[2][-1] += 1.0  # in frame 4, not sealed yet
        return False

    async with pair(
        tmp_path, on_tensor=consumer.on_tensor, on_abandoned=consumer.on_abandoned
    ) as p:
        with pytest.raises(BulkError) as caught:
            await send_tensors(
                p.sender, p.receiver.peer_id, sent, timeout=20, channel_fault=train_while_sending
            )
    assert caught.value.code == "rejected"
    assert [a.index for a in consumer.arrivals] == [0, 1, 2, 3], "every frame authenticated"
    assert [code for _, _, code in consumer.abandoned] == ["rejected"]
    assert p.inbox.received == []


async def test_a_resume_without_a_channel_falls_back_and_hands_on_only_the_rest(
    tmp_path: Path,
) -> None:
    """The channel breaks in frame 3 (tensors 0 and 1 handed on); by the resume the receiver's
    port is unreachable, so the libp2p stream carries the whole payload: the part received
    before must match it, and only tensors 2 and 3 are handed on."""
    sent = tensors_across_frames()
    consumer = Consumer()
    async with pair(tmp_path, on_tensor=consumer.on_tensor) as p:
        consumer.inbox = p.inbox
        upload = Upload(
            p.sender,
            p.receiver.peer_id,
            sent,
            timeout=30,
            channel_fault=lambda attempt, index: attempt == 0 and index == 3,
        )
        await upload.offer()
        assert await upload.send() is None
        assert [a.index for a in consumer.arrivals] == [0, 1]
        p.bulk._advertised = ("127.0.0.1", closed_port())  # the path to the port is gone
        await upload.resume()
        report = await upload.send()
    assert report is not None and report.path == "stream" and report.resumes == 1
    assert report.resent_bytes == 4 * FRAME_BYTES, "frames 0-3 had gone out on the channel"
    assert [a.index for a in consumer.arrivals] == [0, 1, 2, 3]
    for arrival, tensor in zip(consumer.arrivals, sent, strict=True):
        assert_same(arrival, tensor)
    [(_, _, got)] = p.inbox.received
    assert [a.tobytes() for a in got] == [a.tobytes() for a in sent]
