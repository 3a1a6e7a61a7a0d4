"""The receiving side: answers offers on `/hivenode/bulk/1.0.0` and runs the TCP listener.

One listener per node, bound to the node's own listen host, accepts only connections that
present a live token. A token is issued over a libp2p stream, which libp2p authenticated to
the offering peer, and works once, before its deadline, for the bytes its offer declared.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from hivenode.agent import rpc
from hivenode.agent.bulk.channel import read_preamble, receive_frames, tune_socket
from hivenode.agent.bulk.errors import BulkError
from hivenode.agent.bulk.keys import Secrets, choose_cipher, make_aead
from hivenode.agent.bulk.wire import (
    ACCEPT,
    BULK_PROTOCOL,
    DATA,
    DONE,
    OFFER,
    OFFER_LIMITS,
    SENT,
    Manifest,
    byte_views,
    header_digest,
    payload_sha256,
)
from hivenode.protocol.errors import ProtocolError
from hivenode.protocol.limits import Limits
from hivenode.protocol.message import Message, build_tensors
from hivenode.protocol.streams import read_message, write_message

log = logging.getLogger(__name__)

OnTensors = Callable[[str, Mapping[str, Any], tuple[np.ndarray[Any, Any], ...]], Awaitable[None]]
"""Called with (sender's peer id, the offer's meta, the arrays) once a transfer is verified."""

DEFAULT_MAX_TOTAL_BYTES = 4 * 1024**3
DEFAULT_MAX_PENDING = 16
DEFAULT_MAX_TRANSFER_TIMEOUT = 600.0
PREAMBLE_TIMEOUT = 5.0
"""A connection that does not present its token this fast is dropped (slowloris)."""


@dataclass(eq=False)
class _Ticket:
    """One offer accepted and not yet settled: what its token entitles the bearer to."""

    peer_id: str
    secrets: Secrets
    cipher: str
    manifest: Manifest
    digest: bytes
    deadline: float
    done: trio.Event = field(default_factory=trio.Event)
    payload: bytearray | None = None
    error: BulkError | None = None


class BulkReceiver:
    """Serves bulk transfers to `node`; start it with `await nursery.start(receiver.run)`.

    `advertised_address` overrides the (host, port) told to senders, e.g. a NAT mapping; by
    default the listener's port with an empty host, which the sender reads as "the address
    you reached me at over libp2p".
    """

    def __init__(
        self,
        node: Any,
        on_tensors: OnTensors,
        *,
        max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_transfer_timeout: float = DEFAULT_MAX_TRANSFER_TIMEOUT,
        advertised_address: tuple[str, int] | None = None,
    ) -> None:
        self._node = node
        self._on_tensors = on_tensors
        self._limits = Limits(
            max_header_bytes=OFFER_LIMITS.max_header_bytes,
            max_tensors=4096,
            max_total_bytes=max_total_bytes,
        )
        self._max_pending = max_pending
        self._max_transfer_timeout = max_transfer_timeout
        self._advertised = advertised_address
        self._tickets: dict[bytes, _Ticket] = {}
        self._listen_port: int | None = None
        self.rejections: list[str] = []
        """Why each refused offer or connection was refused, oldest first (bounded)."""

    @property
    def listen_address(self) -> tuple[str, int]:
        if self._listen_port is None:
            raise RuntimeError("the bulk receiver is not running")
        return _listen_host(self._node.settings.listen_addrs), self._listen_port

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen for channels and answer offers until cancelled."""
        from libp2p.custom_types import TProtocol

        host = _listen_host(self._node.settings.listen_addrs)
        listeners = await trio.open_tcp_listeners(0, host=host)
        self._listen_port = int(listeners[0].socket.getsockname()[1])
        libp2p_host = self._node.swarm.host
        libp2p_host.set_stream_handler(TProtocol(BULK_PROTOCOL), self._serve_offer)
        log.info("bulk receiver listening on %s:%d", host, self._listen_port)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self)
                await trio.serve_listeners(self._serve_channel, listeners, handler_nursery=nursery)
        finally:
            self._listen_port = None
            for ticket in self._tickets.values():
                ticket.error = BulkError("closed", "the receiver stopped")
                ticket.done.set()
            self._tickets.clear()
            try:
                libp2p_host.remove_stream_handler(TProtocol(BULK_PROTOCOL))
            except Exception as exc:  # the host may already be gone
                log.debug("removing the bulk handler failed: %r", exc)

    def _reject(self, peer: str, error: BulkError) -> None:
        log.warning("bulk transfer from %s refused: %s", peer, error)
        self.rejections.append(f"{error.code}: {error.message}")
        del self.rejections[:-100]

    # --- the libp2p side: offers ------------------------------------------------------------

    async def _serve_offer(self, stream: Any) -> None:
        caller = str(stream.muxed_conn.peer_id)
        adapter = rpc.StreamAdapter(stream)
        own = str(self._node.peer_id)
        offer: Message | None = None
        ticket: _Ticket | None = None
        try:
            with trio.fail_after(self._node.settings.request_timeout):
                offer = await read_message(adapter, OFFER_LIMITS)
            manifest, manifest_bytes, cipher, timeout = self._check_offer(offer)
            with trio.fail_after(timeout):
                ticket = self._issue(caller, manifest, manifest_bytes, cipher, timeout)
                await write_message(adapter, self._accept(offer, ticket))
                limits = Limits(
                    max_header_bytes=64 * 1024,
                    max_tensors=len(manifest.specs),
                    max_total_bytes=manifest.total_bytes,
                )
                follow_up = await read_message(adapter, limits)
                tensors = await self._collect(ticket, follow_up)
                await self._on_tensors(caller, manifest.meta, tensors)
            body = {"bytes": manifest.total_bytes, "sha256": manifest.sha256}
            await write_message(adapter, Message(DONE, offer.request_id, own, body))
        except (BulkError, ProtocolError, trio.TooSlowError) as exc:
            error = _as_bulk_error(exc)
            if ticket is None or error is not ticket.error:  # the channel's side logged it
                self._reject(caller, error)
            with trio.move_on_after(1):
                try:
                    reply = rpc.error_reply(offer, own, error.code, error.message)
                    await write_message(adapter, reply)
                except Exception as write_exc:
                    log.debug("could not tell %s why: %r", caller, write_exc)
        except Exception as exc:  # the sender went away mid-transfer
            log.debug("bulk stream from %s broke: %r", caller, exc)
        finally:
            if ticket is not None:
                self._tickets.pop(ticket.secrets.token, None)
            with trio.move_on_after(1):
                await rpc.close_quietly(stream)

    def _check_offer(self, offer: Message) -> tuple[Manifest, bytes, str, float]:
        if offer.type != OFFER:
            raise BulkError("bad_offer", f"expected {OFFER!r}, got {offer.type!r:.40}")
        manifest_bytes, ciphers = offer.body.get("manifest"), offer.body.get("ciphers")
        timeout = offer.body.get("timeout")
        if not isinstance(manifest_bytes, bytes) or not isinstance(ciphers, list):
            raise BulkError("bad_offer", "an offer carries manifest (bytes) and ciphers (list)")
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise BulkError("bad_offer", "an offer carries a positive timeout")
        manifest = Manifest.from_wire(manifest_bytes, self._limits)
        try:
            cipher = choose_cipher([c for c in ciphers if isinstance(c, str)])
        except ValueError as exc:
            raise BulkError("bad_offer", str(exc)) from exc
        return manifest, manifest_bytes, cipher, min(float(timeout), self._max_transfer_timeout)

    def _issue(
        self, caller: str, manifest: Manifest, manifest_bytes: bytes, cipher: str, timeout: float
    ) -> _Ticket:
        pending = self._tickets.values()
        if len(self._tickets) >= self._max_pending:
            raise BulkError("busy", f"{len(self._tickets)} transfers pending; retry later")
        held = sum(t.manifest.total_bytes for t in pending) + manifest.total_bytes
        if held > self._limits.max_total_bytes:
            raise BulkError("busy", f"{held} bytes would be pending, over the receiver's limit")
        ticket = _Ticket(
            peer_id=caller,
            secrets=Secrets.fresh(),
            cipher=cipher,
            manifest=manifest,
            digest=header_digest(manifest_bytes),
            deadline=trio.current_time() + timeout,
        )
        self._tickets[ticket.secrets.token] = ticket
        return ticket

    def _accept(self, offer: Message, ticket: _Ticket) -> Message:
        host, port = self._advertised or ("", self.listen_address[1])
        body = {
            "key": ticket.secrets.key,
            "token": ticket.secrets.token,
            "cipher": ticket.cipher,
            "host": host,
            "port": port,
        }
        return Message(ACCEPT, offer.request_id, str(self._node.peer_id), body)

    async def _collect(
        self, ticket: _Ticket, follow_up: Message
    ) -> tuple[np.ndarray[Any, Any], ...]:
        """The verified arrays, whichever path the payload took."""
        manifest = ticket.manifest
        if follow_up.type == SENT:
            await ticket.done.wait()
            if ticket.error is not None:
                raise ticket.error
            assert ticket.payload is not None
            return build_tensors(manifest.specs, ticket.payload)
        if follow_up.type != DATA:
            raise BulkError("bad_offer", f"expected {SENT!r} or {DATA!r}, got {follow_up.type!r}")
        self._tickets.pop(ticket.secrets.token, None)  # the fast path was not taken: void it
        shapes = [(a.dtype.str, a.shape) for a in follow_up.tensors]
        if shapes != [(s.dtype.str, s.shape) for s in manifest.specs]:
            raise BulkError("rejected", "the payload's tensors differ from the offer's")
        sha = await trio.to_thread.run_sync(payload_sha256, byte_views(follow_up.tensors))
        if sha != manifest.sha256:
            raise BulkError(
                "rejected", f"payload hashes to {sha}, the offer said {manifest.sha256}"
            )
        return follow_up.tensors

    # --- the TCP side: channels -------------------------------------------------------------

    async def _serve_channel(self, stream: trio.SocketStream) -> None:
        ticket: _Ticket | None = None
        peer = "a TCP peer"
        try:
            peer = "{}:{}".format(*stream.socket.getpeername()[:2])
            with trio.fail_after(PREAMBLE_TIMEOUT):
                token = await read_preamble(stream.socket)
            ticket = self._tickets.pop(token, None)  # popped: a token works once
            if ticket is None:
                raise BulkError("rejected", "unknown or already used token")
            tune_socket(stream.socket)
            with trio.fail_after(max(0.0, ticket.deadline - trio.current_time())):
                ticket.payload = await self._receive(stream, ticket)
        except (BulkError, trio.TooSlowError, OSError, trio.BrokenResourceError) as exc:
            error = _as_bulk_error(exc)
            self._reject(peer, error)
            if ticket is not None:
                ticket.error = error
        finally:
            if ticket is not None:
                ticket.done.set()
            with trio.move_on_after(1):
                await stream.aclose()

    async def _receive(self, stream: trio.SocketStream, ticket: _Ticket) -> bytearray:
        """Open every frame into one buffer while a thread hashes what is already opened."""
        manifest = ticket.manifest
        payload = bytearray(manifest.total_bytes)
        view = memoryview(payload)
        digest = hashlib.sha256()
        opened_send, opened_receive = trio.open_memory_channel[int](math.inf)

        async def hash_opened() -> None:
            hashed = 0
            async for end in opened_receive:
                while True:  # catch up in one go with whatever else was opened meanwhile
                    try:
                        end = opened_receive.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await trio.to_thread.run_sync(digest.update, view[hashed:end])
                hashed = end

        aead = make_aead(ticket.cipher, ticket.secrets.key)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hash_opened)
                async with opened_send:
                    await receive_frames(
                        stream.socket,
                        aead,
                        ticket.secrets.token,
                        ticket.digest,
                        manifest,
                        view,
                        opened_send.send_nowait,
                    )
        except BaseExceptionGroup as group:
            raise _first_failure(group) from None
        if digest.hexdigest() != manifest.sha256:
            raise BulkError("rejected", "the payload's sha256 differs from the offer's")
        return payload


def _listen_host(listen_addrs: list[str]) -> str:
    """The IPv4/IPv6 host of the node's first TCP listen address (the channel binds there)."""
    for addr in listen_addrs:
        parts = addr.split("/")
        if len(parts) > 4 and parts[1] in ("ip4", "ip6") and parts[3] == "tcp":
            return parts[2]
    return "0.0.0.0"


def _first_failure(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception that failed a two-task nursery (the other task was only cancelled)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_failure(exc)
        if not isinstance(exc, trio.Cancelled):
            return exc
    return group


def _as_bulk_error(exc: BaseException) -> BulkError:
    if isinstance(exc, BulkError):
        return exc
    if isinstance(exc, trio.TooSlowError):
        return BulkError("timeout", "the transfer did not complete before its deadline")
    if isinstance(exc, ProtocolError):
        return BulkError("bad_offer", exc.reason)
    return BulkError("rejected", f"the connection broke: {type(exc).__name__}: {exc}")
