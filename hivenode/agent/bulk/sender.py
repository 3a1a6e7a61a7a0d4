"""The sending side: `send_tensors` offers arrays to a peer and moves them by the fastest
path it can open, returning once the receiver has verified and taken them."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import trio

from hivenode.agent import rpc
from hivenode.agent.bulk.channel import FrameFilter, send_frames, tune_socket
from hivenode.agent.bulk.errors import BulkError
from hivenode.agent.bulk.keys import KEY_BYTES, TOKEN_BYTES, make_aead, preferred_ciphers
from hivenode.agent.bulk.wire import (
    ACCEPT,
    BULK_PROTOCOL,
    DATA,
    DONE,
    FRAME_BYTES,
    OFFER,
    OFFER_LIMITS,
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

Progress = Callable[[int, int], None]
"""Called with (bytes sent, total bytes)."""

_request_ids = itertools.count(1)

__all__ = ["FrameFilter", "TransferReport", "send_tensors"]


@dataclass(frozen=True)
class TransferReport:
    """How one transfer went: `path` is "bulk" (direct TCP channel) or "stream" (libp2p)."""

    path: str
    bytes: int
    seconds: float
    cipher: str | None

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


async def send_tensors(
    node: Any,
    peer_id: str,
    tensors: Sequence[np.ndarray[Any, Any]],
    *,
    meta: Mapping[str, Any] | None = None,
    timeout: float,
    progress: Progress | None = None,
    frame_filter: FrameFilter | None = None,
) -> TransferReport:
    """Send `tensors` (and a small `meta` map) to `peer_id` within `timeout` seconds.

    Returns once the receiver has checked the byte count and sha256 and its callback has
    taken the arrays; raises BulkError otherwise. `frame_filter` is a test hook (see
    channel.FrameFilter), never set in production.
    """
    started = time.perf_counter()
    arrays = wire_arrays(tensors)
    views = byte_views(arrays)
    sha = await trio.to_thread.run_sync(payload_sha256, views)
    specs = tuple(TensorSpec.of(a) for a in arrays)
    total = sum(spec.nbytes for spec in specs)
    manifest = Manifest(specs, total, sha, dict(meta or {}), FRAME_BYTES)
    manifest_bytes = manifest.to_wire()
    node.make_dialable(peer_id)
    own = str(node.peer_id)
    request_id = next(_request_ids)
    stream = None
    try:
        with trio.fail_after(timeout):
            stream = await _open_stream(node, peer_id)
            adapter = rpc.StreamAdapter(stream)
            offer_body = {
                "manifest": manifest_bytes,
                "ciphers": preferred_ciphers(),
                "timeout": timeout,
            }
            await write_message(adapter, Message(OFFER, request_id, own, offer_body))
            accept = _parse_accept(await read_message(adapter, OFFER_LIMITS), stream)
            channel = await _connect(accept)
            if channel is not None:
                path, cipher = "bulk", accept.cipher
                await _send_on_channel(
                    channel, accept, manifest, manifest_bytes, views, progress, frame_filter
                )
                await write_message(adapter, Message(SENT, request_id, own, {}))
            else:
                path, cipher = "stream", None
                log.info("no direct connection to %s; sending over the libp2p stream", peer_id)
                await write_message(adapter, Message(DATA, request_id, own, {}, tuple(arrays)))
                if progress is not None:
                    progress(total, total)
            _check_done(await read_message(adapter, OFFER_LIMITS), manifest)
    except trio.TooSlowError as exc:
        raise BulkError(
            "timeout", f"sending {total} bytes to {peer_id} took over {timeout:g} s"
        ) from exc
    except BulkError:
        raise
    except ProtocolError as exc:
        raise BulkError("bad_reply", f"{peer_id} answered garbage: {exc.reason}") from exc
    except Exception as exc:  # libp2p raises a zoo of dial/stream errors
        raise BulkError("unreachable", f"{peer_id}: {type(exc).__name__}: {exc}") from exc
    finally:
        if stream is not None:
            with trio.move_on_after(1):
                await rpc.close_quietly(stream)
    return TransferReport(path, total, time.perf_counter() - started, cipher)


async def _open_stream(node: Any, peer_id: str) -> Any:
    from libp2p.custom_types import TProtocol
    from libp2p.peer.id import ID

    return await node.swarm.host.new_stream(ID.from_base58(peer_id), [TProtocol(BULK_PROTOCOL)])


def _parse_accept(reply: Message, stream: Any) -> _Accept:
    _raise_if_error(reply)
    body = reply.body
    key, token, cipher = body.get("key"), body.get("token"), body.get("cipher")
    host, port = body.get("host"), body.get("port")
    if (
        reply.type != ACCEPT
        or not isinstance(key, bytes) or len(key) != KEY_BYTES
        or not isinstance(token, bytes) or len(token) != TOKEN_BYTES
        or not isinstance(cipher, str)
        or not isinstance(host, str)
        or not isinstance(port, int) or not 0 < port < 65536
    ):  # fmt: skip
        raise BulkError("bad_reply", "the receiver's accept is malformed")
    if not host:  # "the address you reached me at"
        remote = stream.get_remote_address()
        host = remote[0] if remote else "127.0.0.1"
    return _Accept(key, token, cipher, host, port)


async def _connect(accept: _Accept) -> trio.SocketStream | None:
    """The direct channel, or None when it cannot be opened (NAT, firewall, relay)."""
    with trio.move_on_after(CONNECT_TIMEOUT):
        try:
            return await trio.open_tcp_stream(accept.host, accept.port)
        except OSError as exc:
            log.info("direct channel to %s:%d failed: %s", accept.host, accept.port, exc)
    return None


async def _send_on_channel(
    channel: trio.SocketStream,
    accept: _Accept,
    manifest: Manifest,
    manifest_bytes: bytes,
    views: Sequence[memoryview],
    progress: Progress | None,
    frame_filter: FrameFilter | None,
) -> None:
    async with channel:
        tune_socket(channel.socket)
        aead = make_aead(accept.cipher, accept.key)
        digest = header_digest(manifest_bytes)
        try:
            await send_frames(
                channel, aead, accept.token, digest, manifest, views, progress, frame_filter
            )
        except (trio.BrokenResourceError, OSError) as exc:
            # the receiver dropped the channel: its reply on the stream says why
            log.debug("direct channel closed by the receiver: %r", exc)


def _raise_if_error(reply: Message) -> None:
    if reply.type == rpc.ERROR:
        code, message = reply.body.get("code", "error"), reply.body.get("message", "")
        raise BulkError(str(code), str(message))


def _check_done(reply: Message, manifest: Manifest) -> None:
    _raise_if_error(reply)
    if reply.type != DONE:
        raise BulkError("bad_reply", f"expected {DONE!r}, got {reply.type!r:.40}")
    if (
        reply.body.get("bytes") != manifest.total_bytes
        or reply.body.get("sha256") != manifest.sha256
    ):
        raise BulkError("bad_reply", "the receiver confirmed other bytes than were sent")
