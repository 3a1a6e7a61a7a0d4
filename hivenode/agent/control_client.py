"""Client of the control API: stdlib only, so `hivenode status` starts fast."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any


class ControlError(Exception):
    """The daemon could not be asked, or answered an error; the message says which."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class DaemonNotRunning(ControlError):
    """No daemon listens on the control socket (none there, or a stale one)."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self._path))
        self.sock = sock


def call(socket_path: Path, method: str, path: str, timeout: float = 15.0, body: Any = None) -> Any:
    """One JSON request to the daemon; returns the decoded reply or raises ControlError."""
    conn = _UnixConnection(socket_path, timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=payload, headers={"content-type": "application/json"})
        response = conn.getresponse()
        data = response.read()
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise DaemonNotRunning(
            f"the hivenode daemon is not running (no control socket at {socket_path}); "
            "start it with `hivenode run`"
        ) from exc
    except PermissionError as exc:
        raise ControlError(
            f"permission denied on {socket_path}: join the daemon's group or use sudo"
        ) from exc
    except TimeoutError as exc:
        raise ControlError(f"the daemon did not answer {path} within {timeout:g} s") from exc
    except OSError as exc:
        raise ControlError(f"cannot talk to the daemon at {socket_path}: {exc}") from exc
    finally:
        conn.close()
    try:
        decoded = json.loads(data)
    except ValueError as exc:
        raise ControlError(f"the daemon sent an unreadable reply to {path}") from exc
    if response.status != 200:
        message = decoded.get("error", "") if isinstance(decoded, dict) else ""
        raise ControlError(message or f"HTTP {response.status}", response.status)
    return decoded
