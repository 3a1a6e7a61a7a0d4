"""Shared helpers for the benchmark scripts: arguments, output, statistics, daemon processes.

Every benchmark prints human figures, or with --json exactly one JSON object on stdout;
progress always goes to stderr so `--json` output can be piped straight into `jq`.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from hivenode.sim.environment import isolated_environment

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


# --- arguments and output ------------------------------------------------------------------


def make_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--json", action="store_true", help="print exactly one JSON object on stdout"
    )
    return parser


def progress(message: str) -> None:
    """Progress for the person watching; never on stdout."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    """What the figures were measured on, recorded with them."""
    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpus": psutil.cpu_count(logical=True),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


def emit(result: dict[str, Any], as_json: bool, rows: list[tuple[str, Any]], title: str) -> None:
    """One JSON object, or a two-column table of the figures that matter to a person."""
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return
    width = max((len(name) for name, _ in rows), default=0)
    print(title)
    print("-" * len(title))
    for name, value in rows:
        print(f"{name:<{width}}  {fmt(value)}")


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "PASS" if value else "FAIL"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


# --- statistics ----------------------------------------------------------------------------


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile: with 15 samples p90 is the 14th smallest, a real sample."""
    if not values:
        return None
    ordered = sorted(values)
    rank = math.ceil(round(fraction * len(ordered), 9))  # round: 0.9 * 10 is 9.000…02
    return ordered[min(max(rank, 1), len(ordered)) - 1]


def rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


# --- processes -----------------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    env = isolated_environment()
    env["PYTHONUNBUFFERED"] = "1"
    return env


def hivenode_command() -> list[str]:
    """The `hivenode` script of this interpreter's environment (the venv under test)."""
    beside = Path(sys.executable).with_name("hivenode")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("hivenode")
    if found:
        return [found]
    return [sys.executable, "-m", "hivenode.cli"]


def control_call(runtime_dir: Path, path: str, timeout: float = 5.0) -> Any:
    from hivenode.agent.control_client import call
    from hivenode.agent.paths import SOCKET_NAME

    return call(runtime_dir / SOCKET_NAME, "GET", path, timeout=timeout)


class Daemon:
    """A real `hivenode run` on 127.0.0.1 with its own temp config, state and runtime dirs.

    The config file is empty and passed explicitly, so neither the user's nor /etc's
    config is read; HIVENODE_* and systemd variables are removed from its environment.
    """

    def __init__(self, name: str, bootstrap: list[str] | None = None) -> None:
        self.name = name
        self.bootstrap = bootstrap or []
        self._tmp = tempfile.TemporaryDirectory(prefix=f"hivenode-bench-{name}-")
        self.base = Path(self._tmp.name)
        self.runtime_dir = self.base / "run"
        self.log_path = self.base / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        config = self.base / "config.toml"
        config.write_text("# empty: benchmark daemons use defaults plus flags\n")
        cmd = [
            *hivenode_command(),
            "run",
            "--config", str(config),
            "--listen", "/ip4/127.0.0.1/tcp/0",
            "--no-metrics",
            "--state-dir", str(self.base / "state"),
            "--runtime-dir", str(self.runtime_dir),
            "--log-level", "WARNING",
        ]  # fmt: skip
        for addr in self.bootstrap:
            cmd += ["--bootstrap", addr]
        return cmd

    def start(self) -> Daemon:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command(), env=clean_env(), stdout=log, stderr=subprocess.STDOUT
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> float:
        """Seconds from now until the control socket answers /v1/status."""
        from hivenode.agent.control_client import ControlError

        started = time.perf_counter()
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"daemon {self.name} exited early:\n{self.log_tail()}")
            try:
                control_call(self.runtime_dir, "/v1/status", timeout=2.0)
                return time.perf_counter() - started
            except ControlError:
                pass
            if time.perf_counter() - started > timeout:
                raise RuntimeError(f"daemon {self.name} not ready after {timeout:g} s")
            time.sleep(0.05)

    def status(self) -> Any:
        return control_call(self.runtime_dir, "/v1/status")

    def peers(self) -> Any:
        return control_call(self.runtime_dir, "/v1/peers")

    def address(self) -> str:
        addrs: list[str] = self.status()["addrs"]
        return addrs[0]

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._tmp.cleanup()

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until(predicate: Any, timeout: float, what: str, period: float = 0.2) -> float:
    """Poll `predicate()` until true; seconds it took, or RuntimeError naming `what`."""
    started = time.perf_counter()
    while not predicate():
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(period)
    return time.perf_counter() - started
