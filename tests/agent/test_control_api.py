"""The control API's routing and its write protection (SO_PEERCRED uid check)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from hivenode.agent.control import ApiError, ControlApi, Request
from hivenode.agent.control_client import ControlError, call


def api() -> ControlApi:
    routes = ControlApi()

    async def hello(request: Request, params: dict[str, str]) -> Any:
        return {"hello": params.get("name", "world")}

    async def change(request: Request, params: dict[str, str]) -> Any:
        return {"changed": True, "uid": request.caller_uid}

    async def broken(request: Request, params: dict[str, str]) -> Any:
        raise ApiError(409, "already running")

    routes.route("GET", "/v1/hello", hello)
    routes.route("GET", "/v1/hello/{name}", hello)
    routes.route("POST", "/v1/change", change, mutating=True)
    routes.route("GET", "/v1/broken", broken)
    return routes


async def serve(tmp_path: Path, nursery: trio.Nursery) -> Path:
    path = tmp_path / "run" / "control.sock"
    await nursery.start(api().serve, path)
    return path


async def test_routes_answer_json_and_errors_have_statuses(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        path = await serve(tmp_path, nursery)
        assert oct(path.stat().st_mode & 0o777) == "0o660"
        assert await trio.to_thread.run_sync(call, path, "GET", "/v1/hello") == {"hello": "world"}
        assert await trio.to_thread.run_sync(call, path, "GET", "/v1/hello/bee") == {"hello": "bee"}
        for method, target, status in [
            ("GET", "/v1/nothing", 404),
            ("DELETE", "/v1/hello", 405),
            ("GET", "/v1/broken", 409),
        ]:
            try:
                await trio.to_thread.run_sync(call, path, method, target)
            except ControlError as exc:
                assert exc.status == status, target
            else:
                raise AssertionError(f"{method} {target} should fail")
        nursery.cancel_scope.cancel()
    assert not path.exists(), "the socket file is removed on the way out"


async def test_mutating_call_is_allowed_for_the_daemons_own_uid(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        path = await serve(tmp_path, nursery)
        reply = await trio.to_thread.run_sync(call, path, "POST", "/v1/change")
        assert reply == {"changed": True, "uid": os.getuid()}
        nursery.cancel_scope.cancel()


async def test_mutating_call_from_another_uid_is_refused(tmp_path: Path) -> None:
    if os.getuid() != 0:
        raise AssertionError("this test switches uid and must run as root (as CI does)")
    import shutil
    import tempfile

    reachable = Path(tempfile.mkdtemp(prefix="hivenode-uid-test-"))  # pytest's tmp is 0700
    reachable.chmod(0o755)
    async with trio.open_nursery() as nursery:
        path = await serve(reachable, nursery)
        path.parent.chmod(0o755)
        os.chmod(path, 0o666)  # let the other user reach the socket at all
        # import as root, then become `nobody` before connecting: SO_PEERCRED records the
        # credentials of whoever connect()s
        script = (
            "import os, sys\n"
            "from hivenode.agent.control_client import call, ControlError\n"
            "os.setgid(65534); os.setuid(65534)\n"
            f"try: call({str(path)!r}, 'POST', '/v1/change')\n"
            "except ControlError as e: print(e.status); sys.exit(0)\n"
            "print('allowed')\n"
        )
        result = await trio.to_thread.run_sync(
            lambda: subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        )
        nursery.cancel_scope.cancel()
    shutil.rmtree(reachable)
    assert result.stdout.strip() == "403", result.stderr


async def test_garbage_and_oversized_requests_get_http_errors(tmp_path: Path) -> None:
    import socket

    from hivenode.agent.control import MAX_REQUEST_BYTES

    async with trio.open_nursery() as nursery:
        path = await serve(tmp_path, nursery)

        def send(raw: bytes) -> bytes:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                sock.connect(str(path))
                # the server may answer and close before it has read it all
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(raw)
                return sock.recv(4096)

        garbage = await trio.to_thread.run_sync(send, b"\x00\x01 not http\r\n\r\n")
        assert garbage.startswith(b"HTTP/1.1 400")
        size = MAX_REQUEST_BYTES + 10
        big = f"POST /v1/change HTTP/1.1\r\nhost: x\r\ncontent-length: {size}\r\n\r\n"
        oversized = await trio.to_thread.run_sync(send, big.encode() + b"x" * size)
        assert oversized.startswith(b"HTTP/1.1 413")
        assert await trio.to_thread.run_sync(call, path, "GET", "/v1/hello") == {"hello": "world"}
        nursery.cancel_scope.cancel()
