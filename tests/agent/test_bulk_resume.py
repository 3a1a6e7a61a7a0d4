"""A transfer whose channel breaks goes on from the receiver's last verified frame, with a
fresh key and token, for its own sender only, a bounded number of times, before its deadline;
and every transfer is counted in the node's metrics."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import numpy as np
import pytest
import trio
from swarm_helpers import wait_until
from test_bulk import pair, raw_channel, sample_tensors

from hivenode.agent import rpc
from hivenode.agent.bulk import BulkError, ChannelFault, Upload, send_tensors
from hivenode.agent.bulk.keys import TAG_BYTES
from hivenode.agent.bulk.wire import BULK_PROTOCOL, FRAME_BYTES, FRAME_HEADER, RESUME
from hivenode.agent.node import Node
from hivenode.protocol.message import Message
from hivenode.protocol.streams import read_message, write_message


def cut_first_attempt_at(frame: int) -> ChannelFault:
    return lambda attempt, index: attempt == 0 and index == frame


async def test_an_interrupted_256_mib_transfer_resumes_and_its_sha256_matches(
    tmp_path: Path,
) -> None:
    payload = np.random.default_rng(7).random(64 * 2**20, dtype=np.float32)  # 256 MiB
    async with pair(tmp_path) as p:
        report = await send_tensors(
            p.sender,
            p.receiver.peer_id,
            [payload],
            timeout=120,
            channel_fault=cut_first_attempt_at(100),
        )
        [(_, _, (got,))] = p.inbox.received
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert report.path == "bulk" and report.resumes == 1
    # frames 0-99 went once; only frame 100, half written when the connection broke (nothing
    # else was in flight), went a second time
    assert 0 < report.resent_bytes <= FRAME_BYTES


async def test_a_channel_that_keeps_breaking_fails_once_the_resumes_run_out(
    tmp_path: Path,
) -> None:
    """Each attempt gets one frame further than the last, so the transfer always progresses;
    the bound still holds."""
    async with pair(tmp_path) as p:
        with pytest.raises(BulkError) as caught:
            await send_tensors(
                p.sender,
                p.receiver.peer_id,
                sample_tensors(),  # 4 frames
                timeout=20,
                max_resumes=2,
                channel_fault=lambda attempt, index: index == attempt + 1,
            )
        assert caught.value.code == "rejected"
        assert p.inbox.received == [] and p.bulk.pending_transfers == 0
        resumes = p.receiver.metrics.value("hivenode_bulk_resumes_total", role="received")
        assert resumes == 2


async def ask_to_resume(node: Node, receiver: str, body: dict[str, bytes]) -> Message:
    """A resume request exactly as a sender writes it, from `node`."""
    from libp2p.custom_types import TProtocol
    from libp2p.peer.id import ID

    stream = await node.swarm.host.new_stream(ID.from_base58(receiver), [TProtocol(BULK_PROTOCOL)])
    adapter = rpc.StreamAdapter(stream)
    with trio.fail_after(10):
        await write_message(adapter, Message(RESUME, 1, node.peer_id, body))
        reply = await read_message(adapter)
    await rpc.close_quietly(stream)
    return reply


async def test_a_resume_request_from_another_peer_is_rejected(
    tmp_path: Path,
) -> None:
    """Even with the transfer's id and manifest digest (neither is a secret), only the peer
    libp2p authenticated as the sender may resume; the intruder does not disturb it."""
    sent = sample_tensors()
    async with pair(tmp_path, intruder=True) as p:
        assert p.intruder is not None
        upload = Upload(
            p.sender, p.receiver.peer_id, sent, timeout=20, channel_fault=cut_first_attempt_at(2)
        )
        await upload.offer()
        assert await upload.send() is None, "the channel broke; the receiver keeps the prefix"
        assert upload.transfer_id is not None
        stolen = {"transfer": upload.transfer_id, "manifest_digest": upload.manifest_digest}
        reply = await ask_to_resume(p.intruder, p.receiver.peer_id, stolen)
        assert reply.type == rpc.ERROR and reply.body["code"] == "rejected"
        assert p.bulk.rejections == [
            "rejected: no such transfer to resume (unknown, another peer's, or over)"
        ]
        await upload.resume()
        report = await upload.send()
    assert report is not None and report.resumes == 1
    [(origin, _, got)] = p.inbox.received
    assert origin == p.sender.peer_id
    assert [a.tobytes() for a in got] == [a.tobytes() for a in sent]


async def test_a_resume_after_the_deadline_is_rejected_and_the_prefix_freed(
    tmp_path: Path,
) -> None:
    async with pair(tmp_path, max_transfer_timeout=3.0) as p:
        upload = Upload(
            p.sender,
            p.receiver.peer_id,
            sample_tensors(),
            timeout=30,  # the receiver caps it at 3 s
            channel_fault=cut_first_attempt_at(2),
        )
        await upload.offer()
        assert await upload.send() is None
        assert p.bulk.pending_transfers == 1, "parked, awaiting a resume"
        await wait_until(lambda: p.bulk.pending_transfers == 0, 10, "the deadline to drop it")
        with pytest.raises(BulkError) as caught:
            await upload.resume()
        assert caught.value.code == "rejected"
        assert p.bulk.rejections == [
            "timeout: no resume came before the transfer's deadline",
            "rejected: no such transfer to resume (unknown, another peer's, or over)",
        ]
        assert p.inbox.received == []


def ciphertext(record: bytes) -> bytes:
    """A frame record without its header and tag: the AES-CTR / ChaCha20 keystream XOR data."""
    return record[FRAME_HEADER.size : -TAG_BYTES]


async def test_a_resume_gets_a_fresh_token_and_key_and_the_old_token_is_refused(
    tmp_path: Path,
) -> None:
    sent = sample_tensors()
    attempts: list[list[bytes]] = []
    async with pair(tmp_path) as p, trio.open_nursery() as nursery:

        def truncate_once(records: list[bytes]) -> list[bytes]:
            attempts.append(records)
            if len(attempts) == 1:
                return records[:3]  # the preamble, frames 0 and 1, then the connection ends
            # the resume's channel is about to open: race it with the first token
            old = attempts[0]
            nursery.start_soon(raw_channel, p.bulk.listen_address, [old[0], old[3]])
            return records

        report = await send_tensors(
            p.sender, p.receiver.peer_id, sent, timeout=20, frame_filter=truncate_once
        )
        await wait_until(lambda: bool(p.bulk.rejections), 5, "the old token to be refused")
    assert report.resumes == 1 and report.path == "bulk"
    assert p.bulk.rejections == ["rejected: unknown or already used token"]
    first, second = attempts
    assert len(first) == 5 and len(second) == 3, "the resume began at frame 2"
    assert first[0] != second[0], "a fresh token"
    # frame 2 under one key and nonce 2 twice would be the same bytes: they differ
    assert ciphertext(first[3]) != ciphertext(second[1]), "a fresh key"
    [(_, _, got)] = p.inbox.received
    assert [a.tobytes() for a in got] == [a.tobytes() for a in sent]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_transfers_are_counted_by_path_with_bytes_resumes_and_rejections(
    tmp_path: Path,
) -> None:
    sent = sample_tensors()
    size = sum(a.nbytes for a in sent)
    async with pair(tmp_path / "direct") as p:
        await send_tensors(p.sender, p.receiver.peer_id, sent, timeout=20)
        await send_tensors(
            p.sender, p.receiver.peer_id, sent, timeout=20, channel_fault=cut_first_attempt_at(1)
        )
        with pytest.raises(BulkError):
            await send_tensors(
                p.sender,
                p.receiver.peer_id,
                sent,
                timeout=20,
                frame_filter=lambda r: [r[0], r[1][:-1] + bytes([r[1][-1] ^ 1]), *r[2:]],
            )
        sender, receiver = p.sender.metrics.value, p.receiver.metrics.value
        assert sender("hivenode_bulk_transfers_total", role="sent", path="bulk") == 2
        assert sender("hivenode_bulk_bytes_total", role="sent", path="bulk") == 2 * size
        assert sender("hivenode_bulk_resumes_total", role="sent") == 1
        assert 0 < sender("hivenode_bulk_resent_bytes_total") <= FRAME_BYTES
        assert sender("hivenode_bulk_send_failures_total", code="rejected") == 1
        assert receiver("hivenode_bulk_transfers_total", role="received", path="bulk") == 2
        assert receiver("hivenode_bulk_bytes_total", role="received", path="bulk") == 2 * size
        assert receiver("hivenode_bulk_resumes_total", role="received") == 1
        assert receiver("hivenode_messages_rejected_total", where="bulk", reason="rejected") == 1
    unreachable = ("127.0.0.1", closed_port())
    async with pair(tmp_path / "fallback", advertised_address=unreachable) as p:
        report = await send_tensors(p.sender, p.receiver.peer_id, sent, timeout=30)
        assert report.path == "stream"
        assert p.sender.metrics.value("hivenode_bulk_transfers_total", role="sent", path="stream")
        assert p.receiver.metrics.value(
            "hivenode_bulk_transfers_total", role="received", path="stream"
        )
        assert not p.sender.metrics.value("hivenode_bulk_transfers_total", role="sent", path="bulk")
