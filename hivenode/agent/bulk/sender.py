"""The sending side: `send_tensors` offers arrays to a peer and moves them by the fastest
path it can open, resuming after a broken channel, and returns once the receiver has
verified and taken them. `Upload` is the same transfer, one step at a time."""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import trio

from hivenode.agent import rpc
from hivenode.agent.bulk.channel import ChannelFault, FrameFilter, send_frames, tune_socket
from hivenode.agent.bulk.errors import BulkError
from hivenode.agent.bulk.keys import (
    KEY_BYTES,
    TOKEN_BYTES,
    TRANSFER_ID_BYTES,
    make_aead,
    preferred_ciphers,
)
from hivenode.agent.bulk.metrics import SENT as SENT_ROLE
from hivenode.agent.bulk.metrics import bulk_metrics
from hivenode.agent.bulk.wire import (
    ACCEPT,
    BULK_PROTOCOL,
    BULK_PROTOCOL_1_0,
    DATA,
    DONE,
    FRAME_BYTES,
    INTERRUPTED,
    OFFER,
    OFFER_LIMITS,
    RESUME,
    SENT,
    Manifest,
    byte_views,
    header_digest,
    payload_sha256,
    wire_arrays,
)
from hivenode.protocol.errors import ProtocolError
from hivenode.protocol.message import Message, TensorSpec
from hivenode.protocol.streams import read_message, write_message

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 3.0
"""How long the direct TCP connection may take before the libp2p stream carries the bytes."""
DEFAULT_MAX_RESUMES = 3
"""Resumes per transfer: enough for a flaky link, few enough that a peer or path that keeps
breaking the channel fails the transfer well before its deadline."""

Progress = Callable[[int, int], None]
"""Called with (bytes sent, total bytes); after a resume it goes on from the resumed frame."""

SENDER_PROTOCOLS = (BULK_PROTOCOL, BULK_PROTOCOL_1_0)
"""In order of preference: libp2p's multistream picks the first one the receiver serves."""

_request_ids = itertools.count(1)

__all__ = ["ChannelFault", "FrameFilter", "TransferReport", "Upload", "send_tensors"]


@dataclass(frozen=True)
class TransferReport:
    """How one transfer went.

    `path` is "bulk" (direct TCP channel) or "stream" (libp2p fallback), as the attempt that
    completed it went; `resumes` counts resumes after broken channels and `resent_bytes` the
    payload bytes written a second time because they were in flight when a channel broke.
    """

    path: str
    bytes: int
    seconds: float
    cipher: str | None
    resumes: int = 0
    resent_bytes: int = 0

    @property
    def mib_per_s(self) -> float:
        return self.bytes / 2**20 / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class _Accept:
    key: bytes
    token: bytes
    cipher: str
    host: str
    port: int
    transfer: bytes | None
    """None from a receiver that predates resumes."""
    next_frame: int


async def send_tensors(
    node: Any,
    peer_id: str,
    tensors: Sequence[np.ndarray[Any, Any]],
    *,
    meta: Mapping[str, Any] | None = None,
    timeout: float,
    max_resumes: int = DEFAULT_MAX_RESUMES,
    progress: Progress | None = None,
    frame_filter: FrameFilter | None = None,
    channel_fault: ChannelFault | None = None,
) -> TransferReport:
    """Send `tensors` (and a small `meta` map) to `peer_id` within `timeout` seconds.

    Returns once the receiver has checked the byte count and sha256 and its callback has
    taken the arrays; raises BulkError otherwise. A channel that breaks is resumed from the
    receiver's last verified frame, up to `max_resumes` times, all within `timeout`.
    `frame_filter` and `channel_fault` are test hooks (see channel), never set in production.
    """
    upload = Upload(
        node,
        peer_id,
        tensors,
        meta=meta,
        timeout=timeout,
        max_resumes=max_resumes,
        progress=progress,
        frame_filter=frame_filter,
        channel_fault=channel_fault,
    )
    try:
        await upload.offer()
        while True:
            report = await upload.send()
            if report is not None:
                return report
            await upload.resume()
    except BulkError as exc:
        metrics = bulk_metrics(node)
        if metrics is not None:
            metrics.send_failures.labels(code=exc.code).inc()
        raise


class Upload:
    """One transfer to one peer, step by step: `offer()`, then `send()` until it returns a
    report, calling `resume()` each time it returns None (the channel broke and the receiver
    kept the transfer). Every step is bounded by the transfer's `timeout` from construction
    and raises BulkError."""

    def __init__(
        self,
        node: Any,
        peer_id: str,
        tensors: Sequence[np.ndarray[Any, Any]],
        *,
        meta: Mapping[str, Any] | None = None,
        timeout: float,
        max_resumes: int = DEFAULT_MAX_RESUMES,
        progress: Progress | None = None,
        frame_filter: FrameFilter | None = None,
        channel_fault: ChannelFault | None = None,
    ) -> None:
        self._node = node
        self._peer_id = peer_id
        self._own = str(node.peer_id)
        self._timeout = timeout
        self._started = time.perf_counter()
        self._deadline = trio.current_time() + timeout
        self._max_resumes = max_resumes
        self._progress = progress
        self._frame_filter = frame_filter
        self._channel_fault = channel_fault
        self._meta = dict(meta or {})
        self._arrays = wire_arrays(tensors)
        self._views = byte_views(self._arrays)
        self._total = sum(a.nbytes for a in self._arrays)
        self._manifest: Manifest | None = None
        self._sha: str | None = None
        self._manifest_digest = b""
        self._request_id = next(_request_ids)
        self._stream: Any = None
        self._accept: _Accept | None = None
        self._attempt = -1
        self._written_end = 0
        """Payload bytes up to the end of the last frame begun on any channel."""
        self._metrics = bulk_metrics(node)
        self.resumes = 0
        self.resent_bytes = 0

    @property
    def transfer_id(self) -> bytes | None:
        """The receiver's name for this transfer, once offered."""
        return self._accept.transfer if self._accept is not None else None

    @property
    def manifest_digest(self) -> bytes:
        """The digest every frame's associated data carries; a resume names it too."""
        return self._manifest_digest

    async def offer(self) -> None:
        """Offer the payload and take the receiver's key, token and address.

        With a 1.1.0 receiver the payload is hashed while it is sent (the sha256 follows in
        `bulk_sent`); a 1.0.0 one needs it in the offer, so it is hashed first (~0.15 s per
        256 MiB at 1.7 GiB/s, on the critical path)."""
        with self._bounded():
            await self._open_stream()
            if self._stream.get_protocol() == BULK_PROTOCOL_1_0:
                await self._hash()
            specs = tuple(TensorSpec.of(a) for a in self._arrays)
            manifest = Manifest(specs, self._total, self._sha or "", self._meta, FRAME_BYTES)
            manifest_bytes = manifest.to_wire()
            self._manifest = manifest
            self._manifest_digest = header_digest(manifest_bytes)
            body = {
                "manifest": manifest_bytes,
                "ciphers": preferred_ciphers(),
                "timeout": self._timeout,
                "max_resumes": self._max_resumes,
            }
            await self._exchange(Message(OFFER, self._request_id, self._own, body))

    async def resume(self) -> None:
        """Ask, on a new libp2p stream, to go on from the receiver's verified prefix.

        Why a fresh key and not only a fresh token: frames from the resume point on may already
        have gone out, sealed under the old key with the same frame indices as nonces. Were the
        key kept, resending them is safe only if each frame's plaintext is byte for byte the
        same, which the sender cannot promise for arrays a training loop may still write to
        (the payload's sha256 would catch the change, but only after the nonce had been
        reused: with AES-GCM that leaks the XOR of the two plaintexts and the key's
        authentication subkey, so forged frames would open). A fresh key makes nonce reuse
        impossible whatever the arrays do, for the cost of 32 random bytes.
        """
        if self._accept is None or self._accept.transfer is None:
            raise BulkError("rejected", "nothing to resume: no transfer offered, or an old peer")
        if self.resumes >= self._max_resumes:
            raise BulkError("rejected", f"the channel broke; {self.resumes} resumes, the limit")
        body = {"transfer": self._accept.transfer, "manifest_digest": self._manifest_digest}
        with self._bounded():
            await self._open_stream()
            await self._exchange(Message(RESUME, self._request_id, self._own, body))
        self.resumes += 1
        if self._metrics is not None:
            self._metrics.resumes.labels(role=SENT_ROLE).inc()

    async def send(self) -> TransferReport | None:
        """Carry the payload on the accepted attempt: the report once the receiver confirmed
        it, or None when the channel broke and the receiver keeps the transfer for `resume()`."""
        if self._accept is None or self._manifest is None or self._stream is None:
            raise RuntimeError("send() comes after offer() or resume()")
        accept, manifest = self._accept, self._manifest
        self._attempt += 1
        resent_before = self.resent_bytes
        adapter = rpc.StreamAdapter(self._stream)
        try:
            with self._bounded():
                path: str = "bulk"
                cipher: str | None = accept.cipher
                complete = True
                if accept.next_frame == manifest.frame_count:
                    pass  # every frame got there before the last channel broke
                elif (channel := await _connect(accept)) is not None:
                    async with trio.open_nursery() as nursery:
                        if self._sha is None:  # hash while sending: both only read the arrays
                            nursery.start_soon(self._hash)
                        complete = await self._send_on_channel(channel, accept, manifest)
                else:
                    path, cipher = "stream", None
                    log.info("no direct connection to %s; sending over libp2p", self._peer_id)
                    self.resent_bytes += self._written_end
                    self._written_end = self._total
                    sha = await self._hash()
                    data = self._message(DATA, {"sha256": sha}, tuple(self._arrays))
                    await write_message(adapter, data)
                    if self._progress is not None:
                        self._progress(self._total, self._total)
                if path == "bulk":
                    body = {"complete": complete, "sha256": await self._hash()}
                    await write_message(adapter, self._message(SENT, body))
                reply = await read_message(adapter, OFFER_LIMITS)
                if reply.type == rpc.ERROR and reply.body.get("code") == INTERRUPTED:
                    log.info("channel to %s broke: %s", self._peer_id, reply.body.get("message"))
                    return None
                _check_done(reply, self._total, await self._hash())
        finally:
            if self._metrics is not None and self.resent_bytes > resent_before:
                self._metrics.resent_bytes.inc(self.resent_bytes - resent_before)
            await self._close_stream()
        if self._metrics is not None:
            self._metrics.completed(SENT_ROLE, path, self._total)
        seconds = time.perf_counter() - self._started
        return TransferReport(path, self._total, seconds, cipher, self.resumes, self.resent_bytes)

    async def _hash(self) -> str:
        """The payload's sha256, computed once, in a worker thread (hashlib drops the GIL)."""
        if self._sha is None:
            self._sha = await trio.to_thread.run_sync(payload_sha256, self._views)
        return self._sha

    async def _open_stream(self) -> None:
        """A new stream to the peer, in the newest protocol version both sides speak."""
        from libp2p.custom_types import TProtocol
        from libp2p.peer.id import ID

        await self._close_stream()
        self._node.make_dialable(self._peer_id)
        protocols = [TProtocol(p) for p in SENDER_PROTOCOLS]
        host = self._node.swarm.host
        self._stream = await host.new_stream(ID.from_base58(self._peer_id), protocols)

    async def _exchange(self, request: Message) -> None:
        """Send an offer or resume on the open stream, and keep the accept it gets."""
        assert self._manifest is not None
        adapter = rpc.StreamAdapter(self._stream)
        await write_message(adapter, request)
        accept = _parse_accept(await read_message(adapter, OFFER_LIMITS), self._stream)
        if request.type == RESUME:
            assert self._accept is not None
            if accept.transfer != self._accept.transfer:
                raise BulkError("bad_reply", "the receiver resumed another transfer")
            valid = 0 <= accept.next_frame <= self._manifest.frame_count
        else:
            valid = accept.next_frame == 0
        if not valid:
            raise BulkError("bad_reply", f"the receiver asked for frame {accept.next_frame}")
        self._accept = accept

    async def _send_on_channel(
        self, channel: trio.SocketStream, accept: _Accept, manifest: Manifest
    ) -> bool:
        """Write the frames from the receiver's next one on; whether all of them went out."""
        resend_below = self._written_end

        def on_frame(index: int) -> None:
            start = index * manifest.frame_bytes
            end = start + manifest.frame_length(index)
            if start < resend_below:
                self.resent_bytes += min(end, resend_below) - start
            self._written_end = max(self._written_end, end)

        async with channel:
            tune_socket(channel.socket)
            try:
                await send_frames(
                    channel,
                    make_aead(accept.cipher, accept.key),
                    accept.token,
                    self._manifest_digest,
                    manifest,
                    self._views,
                    first_frame=accept.next_frame,
                    attempt=self._attempt,
                    on_frame=on_frame,
                    progress=self._progress,
                    frame_filter=self._frame_filter,
                    channel_fault=self._channel_fault,
                )
                return True
            except (trio.BrokenResourceError, OSError) as exc:
                # the receiver's answer on the stream says whether it keeps the prefix
                log.debug("direct channel to %s broke: %r", self._peer_id, exc)
                return False

    def _message(
        self, kind: str, body: dict[str, Any], tensors: tuple[np.ndarray[Any, Any], ...] = ()
    ) -> Message:
        return Message(kind, self._request_id, self._own, body, tensors)

    async def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with trio.move_on_after(1):
                await rpc.close_quietly(stream)

    @contextlib.contextmanager
    def _bounded(self) -> Iterator[None]:
        """The transfer's deadline, and every failure as a BulkError."""
        try:
            with trio.fail_at(self._deadline):
                yield
        except trio.TooSlowError as exc:
            raise BulkError(
                "timeout",
                f"sending {self._total} bytes to {self._peer_id} took over {self._timeout:g} s",
            ) from exc
        except BulkError:
            raise
        except ProtocolError as exc:
            raise BulkError("bad_reply", f"{self._peer_id} answered garbage: {exc.reason}") from exc
        except Exception as exc:  # libp2p raises a zoo of dial/stream errors
            raise BulkError("unreachable", f"{self._peer_id}: {type(exc).__name__}: {exc}") from exc


def _parse_accept(reply: Message, stream: Any) -> _Accept:
    _raise_if_error(reply)
    body = reply.body
    key, token, cipher = body.get("key"), body.get("token"), body.get("cipher")
    host, port = body.get("host"), body.get("port")
    transfer, next_frame = body.get("transfer"), body.get("next_frame", 0)
    transfer_ok = transfer is None or (
        isinstance(transfer, bytes) and len(transfer) == TRANSFER_ID_BYTES
    )
    if (
        reply.type != ACCEPT
        or not isinstance(key, bytes) or len(key) != KEY_BYTES
        or not isinstance(token, bytes) or len(token) != TOKEN_BYTES
        or not isinstance(cipher, str)
        or not isinstance(host, str)
        or not isinstance(port, int) or not 0 < port < 65536
        or not transfer_ok
        or not isinstance(next_frame, int)
    ):  # fmt: skip
        raise BulkError("bad_reply", "the receiver's accept is malformed")
    if not host:  # "the address you reached me at"
        remote = stream.get_remote_address()
        host = remote[0] if remote else "127.0.0.1"
    return _Accept(key, token, cipher, host, port, transfer, next_frame)


async def _connect(accept: _Accept) -> trio.SocketStream | None:
    """The direct channel, or None when it cannot be opened (NAT, firewall, relay)."""
    with trio.move_on_after(CONNECT_TIMEOUT):
        try:
            return await trio.open_tcp_stream(accept.host, accept.port)
        except OSError as exc:
            log.info("direct channel to %s:%d failed: %s", accept.host, accept.port, exc)
    return None


def _raise_if_error(reply: Message) -> None:
    if reply.type == rpc.ERROR:
        code, message = reply.body.get("code", "error"), reply.body.get("message", "")
        raise BulkError(str(code), str(message))


def _check_done(reply: Message, total: int, sha: str) -> None:
    _raise_if_error(reply)
    if reply.type != DONE:
        raise BulkError("bad_reply", f"expected {DONE!r}, got {reply.type!r:.40}")
    if reply.body.get("bytes") != total or reply.body.get("sha256") != sha:
        raise BulkError("bad_reply", "the receiver confirmed other bytes than were sent")
