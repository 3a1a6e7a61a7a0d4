"""Fixtures that run the real `hivenode` console script: CLI calls and daemons on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from hivenode.agent.control_client import ControlError, call
from hivenode.agent.paths import control_socket
from hivenode.sim.environment import isolated_environment

HIVENODE = Path(sys.executable).parent / "hivenode"
"""The console script of this virtualenv: what a user runs (not `python -m`)."""

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
CLI_TIMEOUT = 60.0

SHORT_ADVERTS = {"HIVENODE_ADVERT_PERIOD": "2", "HIVENODE_ADVERT_TTL_PERIODS": "2"}
"""Adverts every 2 s with a TTL of 2 periods, so that expiry is observable in a test."""


def short_tempdir() -> Path:
    """A fresh directory with a short path: a unix socket path must fit in 108 bytes."""
    base = "/tmp" if os.path.isdir("/tmp") else None
    return Path(tempfile.mkdtemp(prefix="hn-", dir=base))


def clean_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any HIVENODE_* or systemd variable, with the XDG
    directories under `home` so that no user config or socket on this machine leaks in."""
    env = isolated_environment()
    for name in ("XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_RUNTIME_DIR", "XDG_CACHE_HOME"):
        directory = home / "xdg" / name.lower()
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        env[name] = str(directory)
    env["COLUMNS"] = "120"  # rich reads it: the human tables must not depend on the terminal
    env.update(extra or {})
    return env


def run_cli(
    *args: str | Path, env: Mapping[str, str], timeout: float = CLI_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run `hivenode ARGS...` to completion (killed after `timeout`)."""
    return subprocess.run(
        [str(HIVENODE), *(str(a) for a in args)],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "condition"
) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Daemon:
    """One `hivenode run` process with its own state and runtime directories."""

    def __init__(
        self,
        name: str,
        base: Path,
        bootstrap: str | None = None,
        metrics_port: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.base = base
        self.state_dir = base / "state"
        self.runtime_dir = base / "run"
        self.socket_path = control_socket(self.runtime_dir)
        self.log_path = base / "daemon.log"
        self.env = clean_env(base, env)
        self.extra_env = dict(env or {})
        self.metrics_port = metrics_port
        args = [
            str(HIVENODE),
            "run",
            "--state-dir",
            str(self.state_dir),
            "--runtime-dir",
            str(self.runtime_dir),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ]
        if metrics_port is None:
            args.append("--no-metrics")
        else:
            args += ["--metrics-port", str(metrics_port)]
        if bootstrap is not None:
            args += ["--bootstrap", bootstrap]
        self._log = self.log_path.open("ab")  # a restarted daemon appends to the same log
        self.process = subprocess.Popen(
            args, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        self._status: dict[str, Any] | None = None

    # --- talking to it ---------------------------------------------------------------------

    def api(self, path: str) -> Any:
        """GET `path` on the control socket (the stdlib client the CLI uses)."""
        return call(self.socket_path, "GET", path, timeout=15.0)

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """`hivenode ARGS... --runtime-dir <ours>` with this daemon's environment."""
        return run_cli(*args, "--runtime-dir", self.runtime_dir, env=self.env, timeout=timeout)

    def cli_offline(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`hivenode ARGS...` with this daemon's environment, not pointed at its socket."""
        return run_cli(*args, env=self.env)

    def cli_json(self, *args: str) -> Any:
        result = self.cli(*args, "--json")
        assert result.returncode == 0, f"hivenode {' '.join(args)}: {result.stderr}"
        return json.loads(result.stdout)

    def peers(self) -> list[dict[str, Any]]:
        return list(self.api("/v1/peers"))

    def peer_ids(self) -> set[str]:
        return {row["peer_id"] for row in self.peers()}

    @property
    def status(self) -> dict[str, Any]:
        """The status read when it became ready (identity and addresses do not change)."""
        assert self._status is not None, "not started"
        return self._status

    @property
    def peer_id(self) -> str:
        return str(self.status["peer_id"])

    @property
    def addr(self) -> str:
        return str(self.status["addrs"][0])

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    # --- lifecycle -------------------------------------------------------------------------

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"daemon {self.name} exited with {self.process.returncode}:\n{self.log()}"
                )
            try:
                self._status = dict(self.api("/v1/status"))
                return
            except ControlError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"daemon {self.name} not ready in {timeout:g} s:\n{self.log()}"
                )
            time.sleep(0.1)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """The exit status, or None when it is still running after `timeout`."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        """SIGTERM, then SIGKILL if it lingers; remove its directories."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        if self.wait_exit() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()
        shutil.rmtree(self.base, ignore_errors=True)


class Daemons:
    """Starts daemons and stops every one of them on close."""

    def __init__(self) -> None:
        self._started: list[Daemon] = []

    def start(
        self,
        name: str = "node",
        *,
        bootstrap: Daemon | str | None = None,
        metrics_port: int | None = None,
        short_adverts: bool = False,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
    ) -> Daemon:
        """Start `hivenode run` (joining through `bootstrap`); by default wait until its
        control socket answers /v1/status. `short_adverts`: see SHORT_ADVERTS."""
        address = bootstrap.addr if isinstance(bootstrap, Daemon) else bootstrap
        variables = {**(SHORT_ADVERTS if short_adverts else {}), **(env or {})}
        daemon = Daemon(name, short_tempdir(), address, metrics_port, variables)
        self._started.append(daemon)
        if wait:
            daemon.wait_ready()
        return daemon

    def restart(self, daemon: Daemon, bootstrap: Daemon | None = None) -> Daemon:
        """A new `hivenode run` on `daemon`'s directories (same identity and state), which
        must have exited; it listens on a new port, so it joins through `bootstrap`."""
        assert daemon.process.poll() is not None, "stop it first"
        address = bootstrap.addr if bootstrap is not None else None
        again = Daemon(daemon.name, daemon.base, address, daemon.metrics_port, daemon.extra_env)
        self._started.append(again)
        again.wait_ready()
        return again

    def close(self) -> None:
        for daemon in self._started:  # all at once: each takes a moment to leave
            if daemon.process.poll() is None:
                daemon.signal(signal.SIGTERM)
        for daemon in reversed(self._started):
            daemon.close()


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    """A factory of daemons that live as long as the test."""
    pool = Daemons()
    yield pool
    pool.close()


class Pair:
    """Daemon A (with metrics on `a.metrics_port`) and daemon B, which joined through A;
    both with SHORT_ADVERTS, so that a test can watch adverts come and expire."""

    def __init__(self, pool: Daemons) -> None:
        self.a = pool.start("a", metrics_port=free_tcp_port(), short_adverts=True)
        self.b = pool.start("b", bootstrap=self.a, short_adverts=True)

    def wait_until_acquainted(self, timeout: float = 20.0) -> None:
        """Until each daemon's peer table holds the other."""
        wait_for(
            lambda: self.b.peer_id in self.a.peer_ids() and self.a.peer_id in self.b.peer_ids(),
            timeout,
            what="A and B to list each other as peers",
        )


@pytest.fixture(scope="session")
def pair() -> Iterator[Pair]:
    """Two daemons shared by the tests that only read from them."""
    pool = Daemons()
    try:
        yield Pair(pool)
    finally:
        pool.close()


@pytest.fixture
def home() -> Iterator[Path]:
    """A short-path scratch directory for one test."""
    path = short_tempdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def env(home: Path) -> dict[str, str]:
    """A clean environment for a CLI call (no HIVENODE_*, private XDG directories)."""
    return clean_env(home)


@pytest.fixture
def cli(env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    """`cli("status", "--json", env=...)` runs the console script; `env` defaults to the
    clean environment of this test."""

    def invoke(
        *args: str | Path, env: Mapping[str, str] = env, timeout: float = CLI_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, env=env, timeout=timeout)

    return invoke
