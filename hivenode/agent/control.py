"""The control API: HTTP/1.1 + JSON on a unix socket in the runtime dir (mode 0660).

Reads are open to whoever can reach the socket (the daemon's group); calls that change
anything are refused unless the caller's uid (SO_PEERCRED) is the daemon's or root.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import trio

from hivenode.agent.errors import AgentError

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1024 * 1024
REQUEST_TIMEOUT = 30.0


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: bytes
    caller_uid: int | None


@dataclass(frozen=True)
class Response:
    status: int
    payload: Any

    def encode(self) -> bytes:
        return json.dumps(self.payload).encode()


class ApiError(AgentError):
    """A control-API call failed; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


Route = Callable[[Request, dict[str, str]], Awaitable[Any]]


class ControlApi:
    """Routes `METHOD /path/{param}` to coroutines that return JSON-able values."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, list[str], Route, bool]] = []

    def route(self, method: str, pattern: str, handler: Route, *, mutating: bool = False) -> None:
        self._routes.append((method, pattern.strip("/").split("/"), handler, mutating))

    async def dispatch(self, request: Request) -> Response:
        parts = request.path.split("?")[0].strip("/").split("/")
        allowed = False
        for method, pattern, handler, mutating in self._routes:
            params = _match(pattern, parts)
            if params is None:
                continue
            allowed = True
            if method != request.method:
                continue
            if mutating and not _may_mutate(request.caller_uid):
                return Response(403, {"error": "only the daemon's user or root may do this"})
            try:
                return Response(200, await handler(request, params))
            except ApiError as exc:
                return Response(exc.status, {"error": str(exc)})
            except AgentError as exc:
                return Response(502, {"error": str(exc)})
            except Exception as exc:  # a route's bug must not end the control API's nursery
                log.exception("control API: %s %s failed", request.method, request.path)
                return Response(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})
        if allowed:
            return Response(405, {"error": f"{request.method} not allowed on {request.path}"})
        return Response(404, {"error": f"no such endpoint: {request.path}"})

    async def serve(self, path: Path, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on `path` (0660) until cancelled; the socket file is removed on the way out."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(path))
        os.chmod(path, 0o660)
        sock.listen(64)
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(self._serve_connection, stream)
        finally:
            path.unlink(missing_ok=True)
            await listener.aclose()

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(REQUEST_TIMEOUT):
                try:
                    request = await _read_request(stream)
                except (h11.RemoteProtocolError, ApiError) as exc:
                    status = exc.status if isinstance(exc, ApiError) else 400
                    reply = Response(status, {"error": str(exc)})
                    await _send(stream, h11.Connection(h11.SERVER), reply)
                    return
                if request is None:
                    return
                response = await self.dispatch(request[1])
                await _send(stream, request[0], response)


def _match(pattern: list[str], parts: list[str]) -> dict[str, str] | None:
    if len(pattern) != len(parts):
        return None
    params = {}
    for want, got in zip(pattern, parts, strict=True):
        if want.startswith("{") and want.endswith("}"):
            params[want[1:-1]] = got
        elif want != got:
            return None
    return params


def _may_mutate(uid: int | None) -> bool:
    return uid is not None and uid in (0, os.getuid())


def _peer_uid(stream: trio.SocketStream) -> int | None:
    try:
        creds = stream.socket.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
        )
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


async def _read_request(stream: trio.SocketStream) -> tuple[h11.Connection, Request] | None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            if not data and head is None:
                return None
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_REQUEST_BYTES:
                raise ApiError(413, f"request body over {MAX_REQUEST_BYTES} bytes")
        elif isinstance(event, h11.EndOfMessage) and head is not None:
            request = Request(
                head.method.decode(), head.target.decode(), bytes(body), _peer_uid(stream)
            )
            return conn, request
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def _send(stream: trio.SocketStream, conn: h11.Connection, response: Response) -> None:
    body = response.encode()
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        ("connection", "close"),
    ]
    try:
        await stream.send_all(conn.send(h11.Response(status_code=response.status, headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError) as exc:
        log.debug("control client went away: %r", exc)
