"""The receiving side: answers offers and resumes on `/hivenode/bulk/1.1.0` (and 1.0.0) and
runs the TCP listener.

One listener per node, bound to the node's own listen host, accepts only connections that
present a live token. A token is issued over a libp2p stream, which libp2p authenticated to
the offering peer, and works once, before its transfer's deadline, for the bytes its offer
declared. When a channel breaks, the transfer's verified prefix is kept (in memory) until the
deadline, and only the same peer may resume it, with a fresh key and token.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np
import trio

from hivenode.agent import rpc
from hivenode.agent.bulk.channel import ChannelBroken, read_preamble, tune_socket
from hivenode.agent.bulk.errors import BulkError
from hivenode.agent.bulk.inbound import Attempt, InboundTransfer, OnAbandoned, OnTensor
from hivenode.agent.bulk.keys import choose_cipher, fresh_transfer_id
from hivenode.agent.bulk.metrics import RECEIVED, bulk_metrics, count_rejection
from hivenode.agent.bulk.transfers import TransferTable
from hivenode.agent.bulk.wire import (
    ACCEPT,
    BULK_PROTOCOL,
    BULK_PROTOCOL_1_0,
    DATA,
    DONE,
    INTERRUPTED,
    OFFER,
    OFFER_LIMITS,
    RESUME,
    SENT,
    Manifest,
    byte_views,
    checked_sha256,
    header_digest,
    payload_sha256,
)
from hivenode.protocol.errors import ProtocolError
from hivenode.protocol.limits import Limits
from hivenode.protocol.message import Message
from hivenode.protocol.streams import read_message, write_message

log = logging.getLogger(__name__)

OnTensors = Callable[[str, Mapping[str, Any], tuple[np.ndarray[Any, Any], ...]], Awaitable[None]]
"""Called with (sender's peer id, the offer's meta, the arrays) once a transfer is verified."""

DEFAULT_MAX_TOTAL_BYTES = 4 * 1024**3
DEFAULT_MAX_PENDING = 16
DEFAULT_MAX_TRANSFER_TIMEOUT = 600.0
DEFAULT_MAX_RESUMES = 8
PREAMBLE_TIMEOUT = 5.0
"""A connection that does not present its token this fast is dropped (slowloris)."""
SETTLE_GRACE = 2.0
"""After its sender says the channel broke, how long the receiver still reads what reached it
before stopping the connection: a half-open one would otherwise hold the transfer to its
deadline, while a reset or closed one settles at once."""


class _Interrupted(Exception):
    """The channel broke and the transfer is kept for a resume."""

    def __init__(self, cause: BulkError) -> None:
        super().__init__(cause.message)
        self.cause = cause


class _Superseded(Exception):
    """A resume on another stream took this attempt's transfer over."""


class BulkReceiver:
    """Serves bulk transfers to `node`; start it with `await nursery.start(receiver.run)`.

    `on_tensors` gets every verified transfer. `on_tensor`, when given, gets each tensor as
    soon as its bytes are authenticated, before the whole payload's sha256 is checked (see
    `inbound.TensorArrival`); `on_abandoned` then tells of a transfer that failed after it.
    `max_resumes` caps the resumes of one transfer (the sender's own cap may be lower).
    `advertised_address` overrides the (host, port) told to senders, e.g. a NAT mapping; by
    default the listener's port with an empty host, which the sender reads as "the address
    you reached me at over libp2p".
    """

    def __init__(
        self,
        node: Any,
        on_tensors: OnTensors,
        *,
        on_tensor: OnTensor | None = None,
        on_abandoned: OnAbandoned | None = None,
        max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_transfer_timeout: float = DEFAULT_MAX_TRANSFER_TIMEOUT,
        max_resumes: int = DEFAULT_MAX_RESUMES,
        advertised_address: tuple[str, int] | None = None,
    ) -> None:
        self._node = node
        self._on_tensors = on_tensors
        self._on_tensor = on_tensor
        self._limits = Limits(
            max_header_bytes=OFFER_LIMITS.max_header_bytes,
            max_tensors=4096,
            max_total_bytes=max_total_bytes,
        )
        self._max_pending = max_pending
        self._max_transfer_timeout = max_transfer_timeout
        self._max_resumes = max_resumes
        self._advertised = advertised_address
        self._transfers = TransferTable(on_abandoned, self._reject)
        self._listen_port: int | None = None
        self._metrics = bulk_metrics(node)
        self.rejections: list[str] = []
        """Why each refused offer, resume or connection was refused, oldest first (bounded)."""

    @property
    def listen_address(self) -> tuple[str, int]:
        if self._listen_port is None:
            raise RuntimeError("the bulk receiver is not running")
        return _listen_host(self._node.settings.listen_addrs), self._listen_port

    @property
    def pending_transfers(self) -> int:
        """Transfers accepted and not finished: in progress, or parked awaiting a resume."""
        return len(self._transfers)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen for channels and answer offers until cancelled."""
        from libp2p.custom_types import TProtocol

        host = _listen_host(self._node.settings.listen_addrs)
        listeners = await trio.open_tcp_listeners(0, host=host)
        self._listen_port = int(listeners[0].socket.getsockname()[1])
        libp2p_host = self._node.swarm.host
        for protocol, sha_deferred in ((BULK_PROTOCOL, True), (BULK_PROTOCOL_1_0, False)):
            handler = functools.partial(self._serve_stream, sha_deferred=sha_deferred)
            libp2p_host.set_stream_handler(TProtocol(protocol), handler)
        log.info("bulk receiver listening on %s:%d", host, self._listen_port)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._transfers.expire_parked)
                task_status.started(self)
                await trio.serve_listeners(self._serve_channel, listeners, handler_nursery=nursery)
        finally:
            self._listen_port = None
            self._transfers.close()
            for protocol in (BULK_PROTOCOL, BULK_PROTOCOL_1_0):
                try:
                    libp2p_host.remove_stream_handler(TProtocol(protocol))
                except Exception as exc:  # the host may already be gone
                    log.debug("removing the bulk handler failed: %r", exc)

    def _reject(self, peer: str, error: BulkError) -> None:
        log.warning("bulk transfer from %s refused: %s", peer, error)
        self.rejections.append(f"{error.code}: {error.message}")
        del self.rejections[:-100]
        count_rejection(self._node, error.code)

    # --- the libp2p side: offers and resumes ------------------------------------------------

    async def _serve_stream(self, stream: Any, *, sha_deferred: bool) -> None:
        """One offer or resume. `sha_deferred` (1.1.0): the payload's sha256 comes with
        `bulk_sent` or `bulk_data`, not in the manifest."""
        caller = str(stream.muxed_conn.peer_id)
        adapter = rpc.StreamAdapter(stream)
        own = str(self._node.peer_id)
        request: Message | None = None
        transfer: InboundTransfer | None = None
        attempt: Attempt | None = None
        try:
            with trio.fail_after(self._node.settings.request_timeout):
                request = await read_message(adapter, OFFER_LIMITS)
                if request.type == OFFER:
                    transfer = self._open(caller, request, sha_deferred)
                elif request.type == RESUME:
                    transfer = await self._reopen(caller, request)
                else:
                    raise BulkError("bad_offer", f"expected {OFFER!r} or {RESUME!r}")
            attempt = self._transfers.start_attempt(transfer)
            with trio.fail_at(transfer.deadline):
                await write_message(adapter, self._accept(request, transfer, attempt))
                follow_up = await read_message(adapter, _follow_up_limits(transfer.manifest))
                sha = _expected_sha256(transfer.manifest, follow_up)
                tensors, path = await self._settle(transfer, attempt, follow_up, sha)
                await self._hand_on(transfer, tensors)
            self._transfers.finish(transfer)
            if self._metrics is not None:
                self._metrics.completed(RECEIVED, path, transfer.manifest.total_bytes)
            body = {"bytes": transfer.manifest.total_bytes, "sha256": sha}
            await write_message(adapter, Message(DONE, request.request_id, own, body))
        except _Interrupted as exc:
            assert transfer is not None
            log.info("bulk channel from %s broke, kept for a resume: %s", caller, exc.cause)
            self._transfers.park(transfer)
            await _reply_error(adapter, request, own, BulkError(INTERRUPTED, exc.cause.message))
        except _Superseded:
            await _reply_error(adapter, request, own, BulkError("superseded", "resumed elsewhere"))
        except (BulkError, ProtocolError, trio.TooSlowError) as exc:
            error = _as_bulk_error(exc)
            self._reject(caller, error)
            if transfer is not None and transfer.attempt is attempt:
                await self._transfers.abandon(transfer, error)
            await _reply_error(adapter, request, own, error)
        except Exception as exc:  # the sender went away mid-transfer
            log.debug("bulk stream from %s broke: %r", caller, exc)
            if transfer is not None and transfer.attempt is attempt:
                broke = BulkError("unreachable", "the libp2p stream broke")
                await self._transfers.abandon(transfer, broke)
        finally:
            with trio.move_on_after(1):
                await rpc.close_quietly(stream)

    def _open(self, caller: str, offer: Message, sha_deferred: bool) -> InboundTransfer:
        manifest_bytes, ciphers = offer.body.get("manifest"), offer.body.get("ciphers")
        timeout, max_resumes = offer.body.get("timeout"), offer.body.get("max_resumes", 0)
        if not isinstance(manifest_bytes, bytes) or not isinstance(ciphers, list):
            raise BulkError("bad_offer", "an offer carries manifest (bytes) and ciphers (list)")
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise BulkError("bad_offer", "an offer carries a positive timeout")
        if not isinstance(max_resumes, int) or max_resumes < 0:
            raise BulkError("bad_offer", "max_resumes must be a count")
        manifest = Manifest.from_wire(manifest_bytes, self._limits, sha_deferred=sha_deferred)
        try:
            cipher = choose_cipher([c for c in ciphers if isinstance(c, str)])
        except ValueError as exc:
            raise BulkError("bad_offer", str(exc)) from exc
        if len(self._transfers) >= self._max_pending:
            raise BulkError("busy", f"{len(self._transfers)} transfers pending; retry later")
        held = self._transfers.held_bytes()
        if held + manifest.total_bytes > self._limits.max_total_bytes:
            raise BulkError("busy", f"{held} bytes pending; this offer would pass the limit")
        transfer = InboundTransfer(
            id=fresh_transfer_id(),
            peer_id=caller,
            cipher=cipher,
            manifest=manifest,
            digest=header_digest(manifest_bytes),
            deadline=trio.current_time() + min(float(timeout), self._max_transfer_timeout),
            max_resumes=min(max_resumes, self._max_resumes),
        )
        self._transfers.add(transfer)
        return transfer

    async def _reopen(self, caller: str, request: Message) -> InboundTransfer:
        """The caller's parked transfer, its old attempt stopped, ready for a new attempt."""
        transfer_id, digest = request.body.get("transfer"), request.body.get("manifest_digest")
        transfer = self._transfers.find(transfer_id) if isinstance(transfer_id, bytes) else None
        # one answer for "unknown", "another peer's" and "over": no oracle for transfer ids
        if transfer is None or transfer.peer_id != caller or digest != transfer.digest:
            raise BulkError(
                "rejected", "no such transfer to resume (unknown, another peer's, or over)"
            )
        if transfer.resumes >= transfer.max_resumes:
            raise BulkError("rejected", f"already resumed {transfer.resumes} times, the limit")
        self._transfers.serve(transfer)
        old = transfer.attempt
        if old is not None and not old.settled.is_set():
            # a half-open channel, or a resume that overtook the old stream: the owner has
            # moved on, so stop reading and go on from what is verified
            transfer.attempt = None  # the old stream's handler now leaves the transfer alone
            try:
                await self._transfers.stop_attempt(old, "superseded by a resume")
            except BaseException:  # timed out (a slow on_tensor): parked again, it expires
                self._transfers.park(transfer)
                raise
            if old.error is not None and not old.resumable:
                await self._transfers.abandon(transfer, old.error)
                raise old.error
        if not self._transfers.holds(transfer):
            raise BulkError("rejected", "the transfer ended while the resume was asked for")
        transfer.resumes += 1
        if self._metrics is not None:
            self._metrics.resumes.labels(role=RECEIVED).inc()
        return transfer

    def _accept(self, request: Message, transfer: InboundTransfer, attempt: Attempt) -> Message:
        host, port = self._advertised or ("", self.listen_address[1])
        body = {
            "key": attempt.secrets.key,
            "token": attempt.secrets.token,
            "cipher": transfer.cipher,
            "host": host,
            "port": port,
            "transfer": transfer.id,
            "next_frame": attempt.first_frame,
        }
        return Message(ACCEPT, request.request_id, str(self._node.peer_id), body)

    async def _settle(
        self, transfer: InboundTransfer, attempt: Attempt, follow_up: Message, sha: str
    ) -> tuple[tuple[np.ndarray[Any, Any], ...], str]:
        """The verified arrays and the path they took, once this attempt is over; raises
        _Interrupted when it broke and may resume."""
        if follow_up.type == DATA:
            return await self._take_fallback(transfer, attempt, follow_up, sha), "stream"
        if follow_up.type != SENT:
            raise BulkError("bad_offer", f"expected {SENT!r} or {DATA!r}, got {follow_up.type!r}")
        if follow_up.body.get("complete") is False:
            with trio.move_on_after(SETTLE_GRACE):
                await attempt.settled.wait()
            self._transfers.stop_attempt_nowait(attempt, "its sender saw the connection break")
        await attempt.settled.wait()
        if transfer.attempt is not attempt:
            raise _Superseded
        if attempt.error is None:
            await transfer.hash_verified()  # no-op unless a resume found every frame in
            if self._on_tensor is not None:
                await transfer.deliver_verified(self._on_tensor)
            if transfer.sha.hexdigest() != sha:
                raise BulkError("rejected", "the payload's sha256 differs from the sender's")
            return transfer.arrays(), "bulk"
        if not attempt.resumable:
            raise attempt.error
        if transfer.resumes < transfer.max_resumes and trio.current_time() < transfer.deadline:
            raise _Interrupted(attempt.error)
        used = f"{transfer.resumes} resume{'s' * (transfer.resumes != 1)}"
        raise BulkError(attempt.error.code, f"{attempt.error.message}; {used}, none left")

    async def _take_fallback(
        self, transfer: InboundTransfer, attempt: Attempt, data: Message, expected_sha: str
    ) -> tuple[np.ndarray[Any, Any], ...]:
        """The payload as the libp2p stream carried it (the channel was unreachable)."""
        await self._transfers.stop_attempt(attempt, "the sender fell back to the libp2p stream")
        if transfer.attempt is not attempt:
            raise _Superseded
        manifest = transfer.manifest
        shapes = [(a.dtype.str, a.shape) for a in data.tensors]
        if shapes != [(s.dtype.str, s.shape) for s in manifest.specs]:
            raise BulkError("rejected", "the payload's tensors differ from the offer's")
        views = byte_views(data.tensors)
        sha = await trio.to_thread.run_sync(payload_sha256, views)
        if sha != expected_sha:
            raise BulkError("rejected", f"payload hashes to {sha}, the sender said {expected_sha}")
        if transfer.delivered and not _starts_with(views, transfer):
            # tensors already handed on came from an earlier channel: the sha must cover them
            raise BulkError("rejected", "the payload differs from the part received before")
        for index in range(transfer.delivered, len(manifest.specs)):
            if self._on_tensor is not None:
                await self._on_tensor(transfer.arrival(index, data.tensors[index]))
            transfer.delivered = index + 1
        return data.tensors

    async def _hand_on(
        self, transfer: InboundTransfer, tensors: tuple[np.ndarray[Any, Any], ...]
    ) -> None:
        try:
            await self._on_tensors(transfer.peer_id, transfer.manifest.meta, tensors)
        except BulkError:
            raise
        except Exception as exc:
            log.exception("the bulk consumer failed on a transfer from %s", transfer.peer_id)
            raise BulkError("refused", f"the receiver's consumer failed: {exc!r:.200}") from exc

    # --- the TCP side: channels -------------------------------------------------------------

    async def _serve_channel(self, stream: trio.SocketStream) -> None:
        peer = "a TCP peer"
        try:
            peer = "{}:{}".format(*stream.socket.getpeername()[:2])
            with trio.fail_after(PREAMBLE_TIMEOUT):
                token = await read_preamble(stream.socket)
            found = self._transfers.take_token(token)
            if found is None:
                raise BulkError("rejected", "unknown or already used token")
        except (BulkError, trio.TooSlowError, OSError, trio.BrokenResourceError) as exc:
            self._reject(peer, _as_bulk_error(exc))
            with trio.move_on_after(1):
                await stream.aclose()
            return
        transfer, attempt = found
        attempt.scope = trio.CancelScope()  # before any checkpoint: a stop must find it
        try:
            tune_socket(stream.socket)
            with trio.fail_at(transfer.deadline):
                await transfer.receive(stream.socket, attempt, self._on_tensor)
            attempt.settle(None)
        except ChannelBroken as exc:
            attempt.settle(exc, resumable=True)
        except (BulkError, trio.TooSlowError, OSError, trio.BrokenResourceError) as exc:
            attempt.settle(_as_bulk_error(exc))
        finally:
            attempt.settle(BulkError("closed", "the receiver stopped"))  # if cancelled
            with trio.move_on_after(1):
                await stream.aclose()


async def _reply_error(adapter: Any, request: Message | None, own: str, error: BulkError) -> None:
    with trio.move_on_after(1):
        try:
            await write_message(adapter, rpc.error_reply(request, own, error.code, error.message))
        except Exception as exc:
            log.debug("could not tell the sender why: %r", exc)


def _expected_sha256(manifest: Manifest, follow_up: Message) -> str:
    """The payload's sha256: the manifest's (1.0.0) or the one sent with the payload (1.1.0)."""
    if manifest.sha256:
        return manifest.sha256
    try:
        return checked_sha256(follow_up.body.get("sha256"))
    except ProtocolError as exc:
        raise BulkError(
            "bad_offer", f"{follow_up.type} without the payload's {exc.reason}"
        ) from exc


def _follow_up_limits(manifest: Manifest) -> Limits:
    return Limits(
        max_header_bytes=64 * 1024,
        max_tensors=len(manifest.specs),
        max_total_bytes=manifest.total_bytes,
    )


def _starts_with(views: list[memoryview], transfer: InboundTransfer) -> bool:
    """Whether the concatenated `views` begin with the transfer's verified prefix."""
    assert transfer.payload is not None
    prefix = np.frombuffer(transfer.payload[: transfer.verified_bytes], np.uint8)
    at = 0
    for view in views:
        take = min(len(view), len(prefix) - at)
        if not np.array_equal(np.frombuffer(view[:take], np.uint8), prefix[at : at + take]):
            return False  # (memoryview's == unpacks item by item: slow on MiBs)
        at += take
        if at == len(prefix):
            break
    return True


def _listen_host(listen_addrs: list[str]) -> str:
    """The IPv4/IPv6 host of the node's first TCP listen address (the channel binds there)."""
    for addr in listen_addrs:
        parts = addr.split("/")
        if len(parts) > 4 and parts[1] in ("ip4", "ip6") and parts[3] == "tcp":
            return parts[2]
    return "0.0.0.0"


def _as_bulk_error(exc: BaseException) -> BulkError:
    if isinstance(exc, BulkError):
        return exc
    if isinstance(exc, trio.TooSlowError):
        return BulkError("timeout", "the transfer did not complete before its deadline")
    if isinstance(exc, ProtocolError):
        return BulkError("bad_offer", exc.reason)
    return BulkError("rejected", f"the connection broke: {type(exc).__name__}: {exc}")
