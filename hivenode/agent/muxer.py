"""The stream muxers of a hivenode host: yamux sized to Noise, and a wider yamux between peers.

py-libp2p 0.8.1's yamux sends DATA frames of 64 KiB (header included). Noise carries at most
65519 plaintext bytes in one message, so every frame is split into a full Noise message and a
17-byte one: twice the encryptions, length prefixes, socket writes and reads. Two muxers fix it:

- `/yamux/1.0.0` (any libp2p peer): standard yamux in every way (256 KiB initial window, the
  same flow control and autotuning) except that a frame is at most
  `NOISE_SIZED_MAX_FRAME_BYTES`. The yamux spec leaves frame size to the sender, and these
  frames are 17 bytes shorter than plain py-libp2p's own, so any peer that reads plain
  py-libp2p reads them.
- `/hivenode/yamux/1.0.0` (offered first, so multistream-select picks it only when both ends
  are hivenode and say so): ~1 MiB frames and a 16 MiB initial window on every stream. Both
  ends start from that window, so neither sends past what the other expects.

py-libp2p's yamux takes the stream class, frame size and window from module globals and
builds its own `Yamux` for `/yamux/1.0.0` whatever `muxer_opt` says; the classes here override
exactly those points, per host, and leave every other yamux connection in the process as
py-libp2p ships it.

`hivenode_muxer_options()` and `install_hivenode_muxers()` set a host up; `muxer_of()` and
`frame_stats_of()` tell what a connection negotiated and the largest frames it carried.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import trio
from libp2p.custom_types import TMuxerOptions, TProtocol
from libp2p.io.utils import read_exactly
from libp2p.stream_muxer.mplex.mplex import MPLEX_PROTOCOL_ID, Mplex
from libp2p.stream_muxer.muxer_multistream import MuxerMultistream
from libp2p.stream_muxer.yamux import yamux as upstream
from libp2p.stream_muxer.yamux.yamux import HEADER_SIZE, Yamux, YamuxStream

YAMUX_PROTOCOL: Final = str(upstream.PROTOCOL_ID)
"""The standard yamux protocol id, `/yamux/1.0.0`."""
HIVENODE_YAMUX_PROTOCOL: Final = "/hivenode/yamux/1.0.0"
"""Yamux with wide frames and windows, spoken only between hivenode peers."""

HIVENODE_YAMUX: Final = "hivenode-yamux"
YAMUX: Final = "yamux"
MPLEX: Final = "mplex"
UNKNOWN_MUXER: Final = "unknown"
_MUXER_NAMES: Final = {
    HIVENODE_YAMUX_PROTOCOL: HIVENODE_YAMUX,
    YAMUX_PROTOCOL: YAMUX,
    str(MPLEX_PROTOCOL_ID): MPLEX,
}

NOISE_MAX_PLAINTEXT_BYTES: Final = 65535 - 16
"""Plaintext one Noise transport message carries: its 65535-byte limit less the 16-byte tag."""
NOISE_SIZED_MAX_FRAME_BYTES: Final = NOISE_MAX_PLAINTEXT_BYTES
"""Largest yamux frame, header included, on `/yamux/1.0.0`: exactly one Noise message."""
HIVENODE_MAX_FRAME_BYTES: Final = 16 * NOISE_MAX_PLAINTEXT_BYTES
"""Largest yamux frame, header included, on `/hivenode/yamux/1.0.0`: 1 MiB less 272 bytes, so
that a full frame is exactly 16 full Noise messages (a 1 MiB frame would need a 17th for its
last 272 bytes)."""
HIVENODE_INITIAL_WINDOW_BYTES: Final = 16 * 1024 * 1024
"""Initial send and receive window of every stream on `/hivenode/yamux/1.0.0`: py-libp2p's
autotuning grows a busy stream's window to this size (its MAX_WINDOW_SIZE) anyway; starting
there spares a transfer the ramp. It exposes nothing new to a hostile peer: py-libp2p 0.8.1
buffers DATA past the receive window with only a warning, so the window never bounded memory."""


def _with_globals(function: Callable[..., Any], **names: Any) -> Callable[..., Any]:
    """A copy of `function` that sees `names` in place of its module's globals of that name.

    py-libp2p's yamux reads its frame size, initial window and stream class from module globals
    (MAX_MESSAGE_SIZE, DEFAULT_WINDOW_SIZE, YamuxStream) inside long methods. Assigning those
    globals would change every yamux connection of the process, plain peers' included; copying
    the methods would fork ~400 lines of upstream code. A copy of the function object that looks
    the names up in its own dict changes them for our subclasses only, and leaves the code
    upstream's. The dict is a snapshot of the module at import: yamux.py never reassigns its
    globals at run time.
    """
    code = function.__code__
    missing = sorted(set(names) - set(code.co_names))
    if missing:
        # A py-libp2p whose method no longer reads these names would silently ignore the
        # override; refuse to import rather than run with standard frames unnoticed.
        raise ImportError(
            f"py-libp2p's {function.__qualname__} no longer reads {', '.join(missing)}: "
            "hivenode.agent.muxer must be adapted to this py-libp2p version"
        )
    copy = types.FunctionType(
        code,
        {**function.__globals__, **names},
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__ = function.__qualname__
    copy.__doc__ = function.__doc__
    return copy


class NoiseSizedYamuxStream(YamuxStream):  # type: ignore[misc]  # libp2p is untyped here
    """A standard yamux stream whose frames each fit one Noise message."""

    _write_frames = _with_globals(YamuxStream.write, MAX_MESSAGE_SIZE=NOISE_SIZED_MAX_FRAME_BYTES)
    # go-yamux's rule: read credit goes back once half the window is read. py-libp2p's
    # default (PY_YAMUX_RELEASE_ON_READ) sends a WINDOW_UPDATE after every read instead, so
    # each small request and reply cost its reader one more frame: a Noise message and a
    # send() (a tenth of an inference worker's CPU per request)
    _auto_tune_and_send_window_update = _with_globals(
        YamuxStream._auto_tune_and_send_window_update, _yamux_release_on_read=lambda: False
    )

    async def write(self, data: bytes) -> None:
        # upstream cuts each frame's payload out of `data`, then prepends the header: cut
        # from a memoryview, the payload is copied once (into the frame) instead of twice
        await self._write_frames(memoryview(data).cast("B"))


class HivenodeYamuxStream(NoiseSizedYamuxStream):
    """A stream of `/hivenode/yamux/1.0.0`: wide frames, and a window that starts wide."""

    __init__ = _with_globals(
        YamuxStream.__init__, DEFAULT_WINDOW_SIZE=HIVENODE_INITIAL_WINDOW_BYTES
    )
    _write_frames = _with_globals(YamuxStream.write, MAX_MESSAGE_SIZE=HIVENODE_MAX_FRAME_BYTES)
    # read(-1) releases window credit in slices of MAX_MESSAGE_SIZE and joins them with
    # bytes +=, which copies quadratically in the slice count: wider slices, fewer copies
    read = _with_globals(YamuxStream.read, MAX_MESSAGE_SIZE=HIVENODE_MAX_FRAME_BYTES)


@dataclass(frozen=True)
class FrameStats:
    """The largest yamux frames a connection carried so far, header included, in bytes."""

    largest_sent: int
    largest_received: int


class NoiseSizedYamux(Yamux):  # type: ignore[misc]
    """Standard yamux (`/yamux/1.0.0`) whose frames fit one Noise message each."""

    # Both methods build streams with the module's `YamuxStream`: build ours instead
    open_stream = _with_globals(Yamux.open_stream, YamuxStream=NoiseSizedYamuxStream)
    handle_incoming = _with_globals(Yamux.handle_incoming, YamuxStream=NoiseSizedYamuxStream)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.largest_frame_sent = 0
        self.largest_frame_received = 0

    async def _write_frame(self, data: bytes) -> None:
        # every frame of every stream goes out here: the wire truth, whatever built it
        self.largest_frame_sent = max(self.largest_frame_sent, len(data))
        await super()._write_frame(data)

    async def _read_data_body(self, length: int) -> bytes:
        # every DATA frame's body (SYN-carried ones included) is read here
        self.largest_frame_received = max(self.largest_frame_received, HEADER_SIZE + length)
        # Upstream reads through read_exactly, which copies the body twice more after the
        # secure session assembled it; that session already returns all `length` bytes
        # unless the connection ends, so only a short read takes upstream's path. The
        # timeout is upstream's (PY_YAMUX_DATA_READ_TIMEOUT, 60 s by default).
        with trio.fail_after(upstream._yamux_data_read_timeout()):
            body: bytes = await self.secured_conn.read(length)
            if len(body) < length:
                body += await read_exactly(self.secured_conn, length - len(body))
        return body

    def frame_stats(self) -> FrameStats:
        return FrameStats(self.largest_frame_sent, self.largest_frame_received)


class HivenodeYamux(NoiseSizedYamux):
    """`/hivenode/yamux/1.0.0`: yamux with ~1 MiB frames and 16 MiB initial windows."""

    open_stream = _with_globals(Yamux.open_stream, YamuxStream=HivenodeYamuxStream)
    handle_incoming = _with_globals(Yamux.handle_incoming, YamuxStream=HivenodeYamuxStream)


class HivenodeMuxerMultistream(MuxerMultistream):  # type: ignore[misc]
    """py-libp2p's muxer negotiation, building the class registered for the chosen protocol.

    Upstream's `new_conn` builds its own `Yamux` whenever `/yamux/1.0.0` is negotiated, whatever
    class `muxer_opt` registered for it; this one always builds the registered class.
    """

    async def new_conn(self, conn: Any, peer_id: Any) -> Any:
        protocol, muxer_class = await self._selector.select(
            conn, conn.is_initiator, self.negotiate_timeout
        )
        return self._annotate_connection(muxer_class(conn, peer_id), conn, protocol)


def hivenode_muxer_options() -> TMuxerOptions:
    """The muxers a hivenode host offers, in order of preference (the first is proposed first).

    Mplex stays last, as in py-libp2p's defaults, so hivenode reaches every peer plain
    py-libp2p reaches.
    """
    return {
        TProtocol(HIVENODE_YAMUX_PROTOCOL): HivenodeYamux,
        TProtocol(YAMUX_PROTOCOL): NoiseSizedYamux,
        TProtocol(MPLEX_PROTOCOL_ID): Mplex,
    }


def install_hivenode_muxers(host: Any) -> None:
    """Make `host` (built with `muxer_opt=hivenode_muxer_options()`) build the registered muxers.

    Call it before the host listens or dials. It replaces the host's own muxer negotiation
    object, keeping its protocols, their order and its timeout; other hosts in the process are
    untouched.
    """
    upgrader = host.get_network().upgrader
    current = upgrader.muxer_multistream
    upgrader.muxer_multistream = HivenodeMuxerMultistream(
        current.transports, current.negotiate_timeout
    )


def _muxed_conn(stream_or_conn: Any) -> Any:
    """The muxed connection under a libp2p stream, swarm connection or muxed connection."""
    return getattr(stream_or_conn, "muxed_conn", stream_or_conn)


def muxer_of(stream_or_conn: Any) -> str:
    """Which muxer carries a stream or connection: "hivenode-yamux", "yamux", "mplex" or
    "unknown". Works on any py-libp2p host's streams, not only hivenode's."""
    protocol = getattr(_muxed_conn(stream_or_conn), "negotiated_muxer_protocol", None)
    return _MUXER_NAMES.get(str(protocol), UNKNOWN_MUXER)


def frame_stats_of(stream_or_conn: Any) -> FrameStats | None:
    """The largest frames a hivenode muxer carried; None for a muxer that does not count."""
    conn = _muxed_conn(stream_or_conn)
    if isinstance(conn, NoiseSizedYamux):
        return conn.frame_stats()
    return None
