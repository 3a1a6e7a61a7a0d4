"""Request/response over libp2p streams: one request and one reply per stream.

A request is a protocol `Message`; the reply is a Message of type `ok` or `error` with the same
request id. A handler that raises, or a request that does not decode, is answered with an
error and the server keeps serving: one bad peer must not take a handler down.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import trio

from hivenode.agent.errors import RpcError
from hivenode.protocol.errors import ProtocolError
from hivenode.protocol.limits import DEFAULT_LIMITS, Limits
from hivenode.protocol.message import Header, Message
from hivenode.protocol.streams import (
    read_header_or_end,
    read_message,
    read_payload,
    write_message,
)

log = logging.getLogger(__name__)

OK = "ok"
ERROR = "error"
RATE_LIMITED = "rate_limited"
"""The error code of a request over its peer's rate (see `agent.wire_guard`)."""
OPEN_STREAM_TIMEOUT = 3.0
"""Seconds a StreamPool waits to open a stream to a peer before calling it unreachable."""
SESSION_IDLE_S = 600.0
"""A session stream with no request for this long is closed by the server."""


@dataclass(frozen=True)
class Reply:
    """An `ok` reply that carries tensors as well as a body."""

    body: Mapping[str, Any]
    tensors: tuple[np.ndarray, ...] = ()


Handler = Callable[[Message, str], Awaitable[Reply | Mapping[str, Any]]]
"""Takes the request and the caller's peer id; returns the reply's body, or a Reply."""

RejectHook = Callable[[str, str], None]
"""Called with (protocol id, reason) for every request answered with an error."""

RequestCheck = Callable[[str, str], None]
"""Called with (protocol id, caller's peer id) once a request's header is read, before its
tensors are; raises RpcError to refuse it (`agent.wire_guard.WireGuard.check`)."""

_request_ids = itertools.count(1)


class StreamAdapter:
    """Presents a libp2p stream as the wire layer's ByteStream (b"" at EOF)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def read(self, n: int) -> bytes:
        from libp2p.network.stream.exceptions import StreamEOF

        try:
            data: bytes = await self._stream.read(n)
        except StreamEOF:
            return b""
        return data

    async def write(self, data: bytes) -> None:
        await self._stream.write(data)


def error_reply(request: Message | None, sender: str, code: str, message: str) -> Message:
    return Message(
        type=ERROR,
        request_id=request.request_id if request else 0,
        sender=sender,
        body={"code": code, "message": message},
    )


class RpcServer:
    """Registers request handlers on a libp2p host."""

    def __init__(
        self,
        host: Any,
        own_peer_id: str,
        request_timeout: float,
        on_reject: RejectHook | None = None,
        check: RequestCheck | None = None,
    ) -> None:
        self._host = host
        self._own_peer_id = own_peer_id
        self._request_timeout = request_timeout
        self._on_reject = on_reject
        self._check = check

    def register(
        self,
        protocol_id: str,
        handler: Handler,
        limits: Limits = DEFAULT_LIMITS,
        timeout: float | None = None,
        session: bool = False,
    ) -> None:
        """Serve `protocol_id`; `timeout` overrides the server's for handlers that work
        long (a training round), and bounds reading, handling and replying together.

        `session`: a stream may carry one request after another (each answered before the
        next is read, each with its own `timeout`) until the caller ends it or stays idle
        for SESSION_IDLE_S; opening a py-libp2p stream costs milliseconds, a message does not.
        """
        from libp2p.custom_types import TProtocol

        limit = self._request_timeout if timeout is None else timeout

        async def on_stream(stream: Any) -> None:
            await self._serve(protocol_id, handler, limits, limit, session, stream)

        self._host.set_stream_handler(TProtocol(protocol_id), on_stream)

    async def _serve(
        self,
        protocol_id: str,
        handler: Handler,
        limits: Limits,
        timeout: float,
        session: bool,
        stream: Any,
    ) -> None:
        caller = str(stream.muxed_conn.peer_id)
        adapter = StreamAdapter(stream)
        try:
            first = True
            while await self._serve_next(
                protocol_id, handler, limits, timeout, first, adapter, caller
            ):
                if not session:
                    break
                first = False
        except Exception as exc:  # the caller went away mid-reply: nothing left to answer
            log.debug("stream %s from %s broke: %r", protocol_id, caller, exc)
        finally:
            with trio.move_on_after(1):
                await close_quietly(stream)

    async def _serve_next(
        self,
        protocol_id: str,
        handler: Handler,
        limits: Limits,
        timeout: float,
        first: bool,
        adapter: StreamAdapter,
        caller: str,
    ) -> bool:
        """Answer the next request on the stream; False once the stream should close.

        The first request must arrive within `timeout`; later ones (a session) may come
        after up to SESSION_IDLE_S of quiet, which ends the session without complaint."""
        request: Message | None = None
        deadline = trio.current_time() + timeout
        try:
            refusal: Message | None = None
            with trio.fail_after(timeout if first else SESSION_IDLE_S):
                header = await read_header_or_end(adapter, limits)
                if header is None:
                    if first:  # a stream that ends before its one request is a bad request
                        raise ProtocolError("stream ended after 0 of 4 bytes")
                    return False
                refusal = self._refusal(protocol_id, caller, header)
                if refusal is None:
                    request = await read_payload(adapter, header)
            deadline = trio.current_time() + timeout
            with trio.fail_at(deadline):
                if refusal is not None:
                    await write_message(adapter, refusal)
                    # tensors left unread on the stream would be taken for the next
                    # request: the session ends with this answer
                    return header.tensor_bytes == 0
                assert request is not None
                try:
                    reply = await self._dispatch(handler, request, caller)
                except RpcError as exc:
                    reply = self._reject(protocol_id, caller, request, exc.code, exc.message)
                except ProtocolError as exc:
                    reply = self._reject(protocol_id, caller, request, "bad_request", exc.reason)
                except Exception as exc:
                    log.exception("handler for %s failed on a request from %s", protocol_id, caller)
                    reply = self._reject(protocol_id, caller, request, "internal", repr(exc))
                await write_message(adapter, reply)
            return True
        except ProtocolError as exc:  # garbage on the stream: answer once, then drop it
            reply = self._reject(protocol_id, caller, request, "bad_request", exc.reason)
            with trio.move_on_at(deadline):
                await write_message(adapter, reply)
            return False
        except trio.TooSlowError:
            if request is not None:
                self._reject(
                    protocol_id, caller, request, "timeout", "request not completed in time"
                )
            return False

    def _refusal(self, protocol_id: str, caller: str, header: Header) -> Message | None:
        """The error answering a request the check refuses from its header (its tensors,
        up to the protocol's limit, are never read), else None."""
        if self._check is None:
            return None
        try:
            self._check(protocol_id, caller)
        except RpcError as exc:
            return self._reject(protocol_id, caller, header.to_message(()), exc.code, exc.message)
        return None

    async def _dispatch(self, handler: Handler, request: Message, caller: str) -> Message:
        result = await handler(request, caller)
        reply = result if isinstance(result, Reply) else Reply(body=result)
        return Message(
            type=OK,
            request_id=request.request_id,
            sender=self._own_peer_id,
            body=reply.body,
            tensors=reply.tensors,
        )

    def _reject(
        self, protocol_id: str, caller: str, request: Message | None, code: str, message: str
    ) -> Message:
        # a flood of refusals is logged once, by the check that refuses it
        level = logging.DEBUG if code == RATE_LIMITED else logging.WARNING
        log.log(level, "rejected a %s request from %s: %s: %s", protocol_id, caller, code, message)
        if self._on_reject is not None:
            self._on_reject(protocol_id, code)
        return error_reply(request, self._own_peer_id, code, message)


async def request(
    host: Any,
    peer_id: str,
    protocol_id: str,
    method: str,
    body: Mapping[str, Any] | None = None,
    *,
    timeout: float,
    limits: Limits = DEFAULT_LIMITS,
    tensors: tuple[np.ndarray, ...] = (),
) -> Message:
    """Send one request to `peer_id` on a stream of its own and return its `ok` reply; raise
    RpcError otherwise."""
    message = _request_message(host, method, body, tensors)
    stream = None
    try:
        with _as_rpc_errors(peer_id, protocol_id, timeout), trio.fail_after(timeout):
            stream = await open_stream(host, peer_id, protocol_id)
            reply = await _exchange(stream, message, limits)
    finally:
        if stream is not None:
            with trio.move_on_after(1):
                await close_quietly(stream)
    return _checked(reply, message, peer_id)


class StreamPool:
    """Requests to peers on one long-lived stream each, for a protocol served in session
    mode (`RpcServer.register(..., session=True)`): no stream to open per request.

    Requests to one peer go one at a time; a stream that failed, timed out or was
    cancelled mid-request is closed (a late reply must not answer the next request), and
    the next request opens a new one.
    """

    def __init__(self, host: Any, protocol_id: str, limits: Limits = DEFAULT_LIMITS) -> None:
        self._host = host
        self._protocol_id = protocol_id
        self._limits = limits
        self._streams: dict[str, Any] = {}
        self._locks: dict[str, trio.Lock] = {}

    async def request(
        self,
        peer_id: str,
        method: str,
        body: Mapping[str, Any] | None = None,
        *,
        timeout: float,
        tensors: tuple[np.ndarray, ...] = (),
    ) -> Message:
        message = _request_message(self._host, method, body, tensors)
        async with self._locks.setdefault(peer_id, trio.Lock()):
            done = False
            try:
                with _as_rpc_errors(peer_id, self._protocol_id, timeout), trio.fail_after(timeout):
                    stream = self._streams.get(peer_id)
                    if stream is None:
                        stream = await self._open(peer_id)
                        self._streams[peer_id] = stream
                    reply = await _exchange(stream, message, self._limits)
                done = True
            finally:
                if not done:
                    await self._drop(peer_id)
        return _checked(reply, message, peer_id)

    async def _open(self, peer_id: str) -> Any:
        # a live peer opens a stream in milliseconds; a dead one would hold us for
        # py-libp2p's own 10 s negotiation timeout, the rest of a round's deadline
        with trio.move_on_after(OPEN_STREAM_TIMEOUT):
            return await open_stream(self._host, peer_id, self._protocol_id)
        raise RpcError("unreachable", f"{peer_id}: no stream within {OPEN_STREAM_TIMEOUT:g} s")

    async def aclose(self) -> None:
        for peer_id in list(self._streams):
            await self._drop(peer_id)

    async def _drop(self, peer_id: str) -> None:
        stream = self._streams.pop(peer_id, None)
        if stream is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await close_quietly(stream)


async def open_stream(host: Any, peer_id: str, protocol_id: str) -> Any:
    from libp2p.custom_types import TProtocol
    from libp2p.network.exceptions import SwarmException
    from libp2p.peer.id import ID

    peer, protocols = ID.from_base58(peer_id), [TProtocol(protocol_id)]
    try:
        return await host.new_stream(peer, protocols)
    except SwarmException:
        # py-libp2p 0.8 can keep a connection that closed under it (e.g. the loser of two
        # peers dialling each other at once) in its list; while one is listed, new_stream
        # neither uses it nor dials: "No valid connections". Forget it and dial once more.
        if not forget_closed_connections(host, peer):
            raise
        return await host.new_stream(peer, protocols)


def forget_closed_connections(host: Any, peer: Any) -> int:
    """Drop `peer`'s closed connections from the swarm's records; how many there were."""
    network = host.get_network()
    closed = [c for c in list(network.connections.get(peer, ())) if c.is_closed]
    for connection in closed:
        network.remove_conn(connection)
    if closed:
        log.info("forgot %d closed connection(s) to %s", len(closed), peer)
    return len(closed)


def _request_message(
    host: Any, method: str, body: Mapping[str, Any] | None, tensors: tuple[np.ndarray, ...]
) -> Message:
    return Message(
        type=method,
        request_id=next(_request_ids),
        sender=str(host.get_id()),
        body=body or {},
        tensors=tensors,
    )


async def _exchange(stream: Any, message: Message, limits: Limits) -> Message:
    adapter = StreamAdapter(stream)
    await write_message(adapter, message)
    return await read_message(adapter, limits)


@contextmanager
def _as_rpc_errors(peer_id: str, protocol_id: str, timeout: float) -> Iterator[None]:
    """Every way a request can fail, as one RpcError with a code."""
    try:
        yield
    except trio.TooSlowError as exc:
        raise RpcError(
            "timeout", f"{peer_id} did not answer {protocol_id} in {timeout:g} s"
        ) from exc
    except ProtocolError as exc:
        raise RpcError("bad_reply", f"{peer_id} answered garbage: {exc.reason}") from exc
    except RpcError:
        raise
    except Exception as exc:  # libp2p raises a zoo of dial/stream errors
        raise RpcError("unreachable", f"{peer_id}: {type(exc).__name__}: {exc}") from exc


def _checked(reply: Message, message: Message, peer_id: str) -> Message:
    if reply.request_id != message.request_id:
        raise RpcError("bad_reply", f"{peer_id} answered request {reply.request_id}, not ours")
    if reply.type == ERROR:
        raise RpcError(str(reply.body.get("code", "error")), str(reply.body.get("message", "")))
    if reply.type != OK:
        raise RpcError("bad_reply", f"{peer_id} answered with unknown type {reply.type!r}")
    return reply


async def close_quietly(stream: Any) -> None:
    try:
        await stream.close()
    except Exception as exc:
        log.debug("closing a stream failed: %r", exc)
