"""Reading and writing messages on a byte stream, without depending on libp2p's stream type.

Every loop here either makes progress or raises, so only a stream that never delivers bytes
can stall a read; callers bound that with a trio timeout.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Final, Protocol

import numpy as np

from hivenode.protocol.errors import ProtocolError
from hivenode.protocol.limits import DEFAULT_LIMITS, Limits
from hivenode.protocol.message import (
    HEADER_PREFIX_BYTES,
    Header,
    Message,
    build_tensors,
    encode_message,
    header_length,
    parse_header,
)

READ_CHUNK_BYTES: Final = 1024 * 1024
"""Most bytes asked of the stream in one read."""

WRITE_CHUNK_BYTES: Final = 4 * 1024 * 1024
"""Most bytes handed to the stream in one write; smaller parts are joined up to this."""


class ByteStream(Protocol):
    """The part of a libp2p stream the wire layer uses."""

    async def read(self, n: int) -> bytes:
        """Up to `n` bytes; fewer is allowed, b"" means the stream has ended."""
        ...

    async def write(self, data: bytes) -> None: ...


async def read_into(stream: ByteStream, buffer: bytearray | memoryview) -> None:
    """Fill `buffer` from `stream`, in reads of at most READ_CHUNK_BYTES."""
    view = memoryview(buffer).cast("B")
    filled = 0
    while filled < len(view):
        wanted = min(len(view) - filled, READ_CHUNK_BYTES)
        chunk = await stream.read(wanted)
        if not chunk:
            raise ProtocolError(f"stream ended after {filled} of {len(view)} bytes")
        if len(chunk) > wanted:
            raise ProtocolError(f"stream returned {len(chunk)} bytes when asked for {wanted}")
        view[filled : filled + len(chunk)] = chunk
        filled += len(chunk)


async def read_exactly(stream: ByteStream, n: int) -> bytes:
    """Exactly `n` bytes from `stream`; a ProtocolError if it ends first."""
    buffer = bytearray(n)
    await read_into(stream, buffer)
    return bytes(buffer)


async def read_message(stream: ByteStream, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Read one message; its arrays are writable views over one buffer holding all tensors.

    Each length the peer declares is checked against `limits` before it is read or allocated.
    """
    message = await read_message_or_end(stream, limits)
    if message is None:
        raise ProtocolError("stream ended after 0 of 4 bytes")
    return message


async def read_message_or_end(
    stream: ByteStream, limits: Limits = DEFAULT_LIMITS
) -> Message | None:
    """The next message, or None when the stream ends cleanly before it (a session's end)."""
    header = await read_header_or_end(stream, limits)
    return None if header is None else await read_payload(stream, header)


async def read_header_or_end(stream: ByteStream, limits: Limits = DEFAULT_LIMITS) -> Header | None:
    """The next message's header (its tensor bytes still on the stream), or None when the
    stream ends cleanly before it. A server can refuse a request from its header alone,
    without reading (or holding) the tensors it declares."""
    first = await stream.read(HEADER_PREFIX_BYTES)
    if not first:
        return None
    if len(first) > HEADER_PREFIX_BYTES:
        raise ProtocolError(f"stream returned {len(first)} bytes when asked for 4")
    prefix = first + await read_exactly(stream, HEADER_PREFIX_BYTES - len(first))
    length = header_length(prefix, limits)
    return parse_header(await read_exactly(stream, length), limits)


async def read_payload(stream: ByteStream, header: Header) -> Message:
    """The rest of the message `header` began: its tensors, read into one buffer."""
    # np.empty, not bytearray: a bytearray zero-fills (commits) the declared size before a
    # byte arrives, so an 87-byte message declaring 1 GiB of tensors cost 1 GiB; untouched
    # pages of np.empty cost nothing, and pages fill only as the bytes really come
    payload = np.empty(header.tensor_bytes, dtype=np.uint8)
    await read_into(stream, payload.data)
    return header.to_message(build_tensors(header.tensors, payload.data))


async def write_message(stream: ByteStream, msg: Message) -> None:
    """Write `msg` in writes of at most WRITE_CHUNK_BYTES."""
    for chunk in _chunks(encode_message(msg), WRITE_CHUNK_BYTES):
        await stream.write(chunk)


def _chunks(parts: Iterable[bytes | memoryview], size: int) -> Iterator[bytes]:
    """The bytes of `parts` in order, cut into pieces of at most `size`.

    Small neighbouring parts are joined so a message of small tensors is one write; a full
    piece of a large part goes out on its own, copied only once into the bytes the stream takes.
    """
    pending = bytearray()
    for part in parts:
        view = memoryview(part).cast("B")
        for start in range(0, len(view), size):
            piece = view[start : start + size]
            if len(pending) + len(piece) > size:
                yield bytes(pending)
                pending.clear()
            if len(piece) == size:
                yield bytes(piece)
            else:
                pending += piece
    if pending:
        yield bytes(pending)
