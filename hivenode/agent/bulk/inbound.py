"""What a receiver holds for one transfer from its offer to its end: the live attempt's
secrets, the verified prefix of the payload, the hash over it and the tensors handed on.

Everything here lives in memory only. The prefix grows only by frames that authenticated,
in order, so what it holds is always exactly the sender's first `verified_bytes` bytes; it
survives a broken connection (for a resume) and is dropped with the transfer.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from hivenode.agent.bulk.channel import ChannelBroken, receive_frames
from hivenode.agent.bulk.errors import BulkError
from hivenode.agent.bulk.keys import Secrets, make_aead
from hivenode.agent.bulk.wire import Manifest
from hivenode.protocol.message import build_tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorArrival:
    """One tensor whose bytes all authenticated, handed on while later ones still arrive.

    `array` is a read-only view over the transfer's buffer. The transfer may still fail
    afterwards (a later frame forged, the deadline, the whole-payload sha256): a consumer that
    accumulates arrivals must hold them per `transfer` until `on_tensors` confirms it, and
    drop them when `on_abandoned` names it.
    """

    peer_id: str
    meta: Mapping[str, Any]
    transfer: str
    """The transfer's id in hex, the same across its resumes."""
    index: int
    count: int
    array: np.ndarray[Any, Any]


OnTensor = Callable[[TensorArrival], Awaitable[None]]
"""Called once per tensor, in manifest order, as soon as all its bytes are authenticated."""

OnAbandoned = Callable[[str, str, BulkError], Awaitable[None]]
"""Called with (peer id, transfer id in hex, why) when a transfer that already handed a tensor
to `on_tensor` fails, so that the consumer drops what it accumulated."""


@dataclass(eq=False)
class Attempt:
    """One connection's worth of a transfer: its own fresh key and token, frames from
    `first_frame` on. It settles once: complete (every frame in), or with an error that is
    `resumable` when only the connection broke."""

    secrets: Secrets
    first_frame: int
    scope: trio.CancelScope | None = None
    """Cancels the channel's reading; set the moment the token is presented."""
    stop_reason: str = ""
    settled: trio.Event = field(default_factory=trio.Event)
    error: BulkError | None = None
    resumable: bool = False

    def settle(self, error: BulkError | None, *, resumable: bool = False) -> None:
        if self.settled.is_set():
            return
        self.error, self.resumable = error, resumable
        self.settled.set()


@dataclass(eq=False)
class InboundTransfer:
    """A transfer a receiver accepted and has not finished: see the module docstring."""

    id: bytes
    peer_id: str
    cipher: str
    manifest: Manifest
    digest: bytes
    deadline: float
    max_resumes: int
    resumes: int = 0
    attempt: Attempt | None = None
    payload: memoryview | None = None
    """Allocated when a live token is first presented, never before (see `receiver`)."""
    verified_frames: int = 0
    verified_bytes: int = 0
    hashed_bytes: int = 0
    delivered: int = 0
    """Tensors handed to `on_tensor` so far; each exactly once, across resumes too."""
    receiving: bool = False
    sha: Any = field(default_factory=hashlib.sha256)
    _changed: trio.Event = field(default_factory=trio.Event)

    @property
    def hex_id(self) -> str:
        return self.id.hex()

    @property
    def complete(self) -> bool:
        return self.verified_frames == self.manifest.frame_count

    def advance(self, frames: int, end: int) -> None:
        """Frames up to `frames` (bytes up to `end`) are in the buffer and authenticated."""
        self.verified_frames, self.verified_bytes = frames, end
        self._notify()

    def stop_receiving(self) -> None:
        self.receiving = False
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def receive(
        self, sock: trio.socket.SocketType, attempt: Attempt, on_tensor: OnTensor | None
    ) -> None:
        """Open this attempt's frames into the buffer while one task hashes and another hands
        on what is verified; ChannelBroken when the connection ends early or is stopped (the
        helpers first finish with the verified prefix, so a resume goes on from there)."""
        view = self.allocate()  # only now that a live token was presented
        aead = make_aead(self.cipher, attempt.secrets.key)
        assert attempt.scope is not None
        broken: ChannelBroken | None = None
        self.receiving = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.hash_verified)
                if on_tensor is not None:
                    nursery.start_soon(self.deliver_verified, on_tensor)
                try:
                    with attempt.scope:
                        await receive_frames(
                            sock,
                            aead,
                            attempt.secrets.token,
                            self.digest,
                            self.manifest,
                            view,
                            self.advance,
                            attempt.first_frame,
                        )
                except ChannelBroken as exc:
                    broken = exc
                finally:
                    self.stop_receiving()
                if attempt.scope.cancelled_caught and not self.complete:
                    broken = ChannelBroken(f"the channel was stopped: {attempt.stop_reason}")
        except BaseExceptionGroup as group:
            raise _consumer_error(_first_failure(group)) from None
        if broken is not None:
            raise broken

    async def hash_verified(self) -> None:
        """Hash the verified prefix as it grows, in a worker thread (hashlib drops the GIL),
        until the payload is hashed or the attempt stops receiving."""
        assert self.payload is not None
        view = self.payload
        while self.hashed_bytes < self.manifest.total_bytes:
            end = self.verified_bytes
            if end > self.hashed_bytes:
                # not abandoned on cancel: `sha` must have taken exactly [hashed, end) when
                # `hashed_bytes` moves, or a resume would hash a byte twice or never
                await trio.to_thread.run_sync(self.sha.update, view[self.hashed_bytes : end])
                self.hashed_bytes = end
            elif self.receiving:
                await self._changed.wait()
            else:
                return

    async def deliver_verified(self, on_tensor: OnTensor) -> None:
        """Hand each tensor to `on_tensor` once its last byte is verified, in order, until all
        are handed on or the attempt stops receiving (a resume goes on from there)."""
        ends = self.manifest.tensor_ends
        while self.delivered < len(ends):
            if self.verified_bytes >= ends[self.delivered]:
                index = self.delivered
                await on_tensor(self.arrival(index, self.tensor(index)))
                self.delivered = index + 1
            elif self.receiving:
                await self._changed.wait()
            else:
                return

    def tensor(self, index: int) -> np.ndarray[Any, Any]:
        assert self.payload is not None
        spec = self.manifest.specs[index]
        end = self.manifest.tensor_ends[index]
        view = self.payload[end - spec.nbytes : end]
        array = np.frombuffer(view, dtype=spec.dtype).reshape(spec.shape)
        array.flags.writeable = False  # the consumer must not write into the shared buffer
        return array

    def arrival(self, index: int, array: np.ndarray[Any, Any]) -> TensorArrival:
        return TensorArrival(
            self.peer_id, self.manifest.meta, self.hex_id, index, len(self.manifest.specs), array
        )

    def allocate(self) -> memoryview:
        """The payload buffer: fresh private anonymous pages, faulted in (zeroed by the kernel)
        as frames are opened into them.

        Measured on the 2-core box, opening 256 MiB of frames into: a `bytearray` 0.16-0.20 s
        CPU, plus its zero-fill blocking the event loop 0.3-0.45 s before the first frame is
        read; `np.empty` 0.05 s when transparent huge pages are at hand but 0.4-0.5 s when the
        kernel must compact for them (numpy asks for them on big buffers, and this box's THP
        defrag setting makes the fault wait); this mmap 0.12-0.14 s, steadily."""
        if self.payload is None:
            self.payload = _fresh_pages(self.manifest.total_bytes)
        return self.payload

    def arrays(self) -> tuple[np.ndarray[Any, Any], ...]:
        assert self.payload is not None
        return build_tensors(self.manifest.specs, self.payload)


def _fresh_pages(size: int) -> memoryview:
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    if size == 0 or not hasattr(mmap, "MAP_ANONYMOUS"):  # mmap refuses 0 bytes; not on Windows
        return memoryview(bytearray(size))
    return memoryview(mmap.mmap(-1, size, flags=flags))


def _first_failure(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception that failed a nursery (the other tasks were only cancelled)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_failure(exc)
        if not isinstance(exc, trio.Cancelled):
            return exc
    return group


def _consumer_error(exc: BaseException) -> BaseException:
    """A failure of `on_tensor` (anything but ours or the network's) as the sender sees it."""
    if isinstance(exc, (BulkError, trio.TooSlowError, OSError, trio.BrokenResourceError)):
        return exc
    if isinstance(exc, Exception):
        log.error("on_tensor failed", exc_info=exc)
        return BulkError("refused", f"the receiver's consumer failed: {exc!r:.200}")
    return exc
