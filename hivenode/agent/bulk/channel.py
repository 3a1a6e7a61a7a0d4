"""The fast path's byte channel: AEAD frames over one direct TCP connection.

Layout: a preamble (magic + the 128-bit token), then frames of `FRAME_HEADER` (ciphertext
length, last-frame flag) and the ciphertext with its 16-byte tag. Frame i is sealed with
nonce i and associated data (token, i, last flag, manifest digest), so a frame moved,
replayed, dropped, altered or taken from another transfer fails to authenticate.

AES-GCM seals a 1 MiB frame in ~0.13 ms with AES-NI (ChaCha20-Poly1305 ~0.3 ms), less than a
trio scheduling round, so frames are sealed and opened inline on the loop: a thread hop per
frame costs more than it saves (measured: 2 threads reached 1.26 GiB/s, inline 7.4 GiB/s).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import trio
from cryptography.exceptions import InvalidTag

from hivenode.agent.bulk.errors import BulkError
from hivenode.agent.bulk.keys import TAG_BYTES, Aead, associated_data, nonce
from hivenode.agent.bulk.wire import FRAME_HEADER, PREAMBLE_BYTES, PREAMBLE_MAGIC, Manifest

FrameFilter = Callable[[list[bytes]], list[bytes]]
"""Test hook: gets the records about to go on the wire (the preamble, then each frame's
header and ciphertext) and returns what is sent instead. Used to inject attacks."""

SOCKET_BUFFER_BYTES = 4 * 1024 * 1024


def preamble(token: bytes) -> bytes:
    return PREAMBLE_MAGIC + token


def tune_socket(sock: Any) -> None:
    """Larger kernel buffers: fewer wake-ups per MiB on both sides."""
    import socket

    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)


def _plaintexts(views: Sequence[memoryview], frame_bytes: int) -> Iterator[memoryview]:
    """The concatenated views cut into frames; copied only where a frame spans two views."""
    pending = bytearray()
    for view in views:
        start = 0
        while start < len(view):
            if pending:
                take = min(frame_bytes - len(pending), len(view) - start)
                pending += view[start : start + take]
                start += take
                if len(pending) == frame_bytes:
                    yield memoryview(bytes(pending))
                    pending.clear()
            elif len(view) - start >= frame_bytes:
                yield view[start : start + frame_bytes]
                start += frame_bytes
            else:
                pending += view[start:]
                start = len(view)
    if pending:
        yield memoryview(bytes(pending))


def seal_frames(
    aead: Aead,
    token: bytes,
    digest: bytes,
    manifest: Manifest,
    views: Sequence[memoryview],
) -> Iterator[memoryview]:
    """Each frame as it goes on the wire; the yielded view is reused by the next frame."""
    out = bytearray(FRAME_HEADER.size + manifest.frame_bytes + TAG_BYTES)
    whole = memoryview(out)
    count = manifest.frame_count
    plaintexts = _plaintexts(views, manifest.frame_bytes)
    for index in range(count):
        plain = next(plaintexts, memoryview(b""))
        last = index == count - 1
        sealed = len(plain) + TAG_BYTES
        FRAME_HEADER.pack_into(out, 0, sealed, 1 if last else 0)
        body = whole[FRAME_HEADER.size : FRAME_HEADER.size + sealed]
        aead.encrypt_into(nonce(index), plain, associated_data(token, index, last, digest), body)
        yield whole[: FRAME_HEADER.size + sealed]


async def send_frames(
    stream: trio.SocketStream,
    aead: Aead,
    token: bytes,
    digest: bytes,
    manifest: Manifest,
    views: Sequence[memoryview],
    progress: Callable[[int, int], None] | None = None,
    frame_filter: FrameFilter | None = None,
) -> None:
    """Write the preamble and every frame, then close our side of the connection."""
    frames = seal_frames(aead, token, digest, manifest, views)
    if frame_filter is not None:
        records = frame_filter([preamble(token), *(bytes(f) for f in frames)])
        for record in records:
            await stream.send_all(record)
    else:
        await stream.send_all(preamble(token))
        sent = 0
        for index, frame in enumerate(frames):
            await stream.send_all(frame)
            sent += manifest.frame_length(index)
            if progress is not None:
                progress(sent, manifest.total_bytes)
    await stream.send_eof()


async def read_preamble(sock: trio.socket.SocketType) -> bytes:
    """The token a connection presents (BulkError when it is not a bulk preamble)."""
    data = bytearray(PREAMBLE_BYTES)
    await _receive_exactly(sock, memoryview(data), "the preamble")
    if data[: len(PREAMBLE_MAGIC)] != PREAMBLE_MAGIC:
        raise BulkError("rejected", "the connection did not start with a bulk preamble")
    return bytes(data[len(PREAMBLE_MAGIC) :])


async def receive_frames(
    sock: trio.socket.SocketType,
    aead: Aead,
    token: bytes,
    digest: bytes,
    manifest: Manifest,
    payload: memoryview,
    on_opened: Callable[[int], None],
) -> None:
    """Open every frame into `payload` in order; `on_opened(end)` after each one.

    Any deviation (a length or flag not the expected one, a tag that fails, bytes after the
    last frame, an early end) raises BulkError("rejected"); the caller then discards
    `payload`, so nothing unauthenticated is ever handed on.
    """
    header = bytearray(FRAME_HEADER.size)
    sealed_buffer = memoryview(bytearray(manifest.frame_bytes + TAG_BYTES))
    count = manifest.frame_count
    offset = 0
    for index in range(count):
        last = index == count - 1
        await _receive_exactly(sock, memoryview(header), f"frame {index} of {count}")
        length, flag = FRAME_HEADER.unpack(header)
        plain_length = manifest.frame_length(index)
        if length != plain_length + TAG_BYTES:
            raise BulkError(
                "rejected",
                f"frame {index} declares {length} bytes, expected {plain_length + TAG_BYTES} "
                "(over the transfer's byte limit or out of order)",
            )
        if flag != (1 if last else 0):
            raise BulkError("rejected", f"frame {index} has last-frame flag {flag}, wrong")
        sealed = sealed_buffer[:length]
        await _receive_exactly(sock, sealed, f"frame {index} of {count}")
        ad = associated_data(token, index, last, digest)
        try:
            aead.decrypt_into(nonce(index), sealed, ad, payload[offset : offset + plain_length])
        except InvalidTag:
            raise BulkError(
                "rejected",
                f"frame {index} failed authentication (tampered, reordered, replayed or "
                "from another transfer)",
            ) from None
        offset += plain_length
        on_opened(offset)
    extra = await sock.recv(1)
    if extra:
        raise BulkError("rejected", "bytes after the last frame (over the transfer's byte limit)")


async def _receive_exactly(sock: trio.socket.SocketType, view: memoryview, what: str) -> None:
    got = 0
    while got < len(view):
        n = await sock.recv_into(view[got:])
        if n == 0:
            raise BulkError("rejected", f"the connection ended inside {what} (truncated)")
        got += n
