"""The moving parts of `durability.py`: daemons that keep their port across restarts, a
driver that keeps federated jobs running on the aggregator, a CLI writer that adds models
and imports Q-tables into the same state directory, and a trigger that fires while any of
them has a file half written."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import Daemon, clean_env, control_call, hivenode_command
from _state_check import STRAY_PATTERN

JOB_FILE = """\
name = "{name}"
dataset = "digits"
rounds = {rounds}
clients_per_round = 3
deadline_s = 30
seed = {seed}
trainers = {trainers}

[model]
framework = "torch"
name = "logreg"

[strategy]
name = "scaffold"   # its server control variate is one more file per checkpoint

[train]
lr = 0.05
batch_size = 32
"""
FAST_ENV = {"HIVENODE_ADVERT_PERIOD": "2", "OMP_NUM_THREADS": "1"}
CLI_TIMEOUT = 120.0
IMPORT_ORIGIN = "durability-import"
"""The origin of the cell that `hivenode qtable import` merges in the writer loop."""
POLL_S = 0.002
"""How often the trigger looks for half-written files: an atomic write here takes about
12 ms (write, fsync, rename, fsync of the directory on ext4), so 2 ms sees most of them."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli(*args: str | Path, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*hivenode_command(), *(str(a) for a in args)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class StableDaemon(Daemon):
    """A `hivenode run` that listens on the same port in every incarnation, as a configured
    node does, so that its peers' bootstrap addresses stay valid; the log of every
    incarnation goes to one file."""

    def __init__(self, name: str, bootstrap: list[str] | None = None) -> None:
        super().__init__(name, bootstrap)
        self.port = free_port()
        self.state_dir = self.base / "state"
        self.peer_id = ""

    def command(self) -> list[str]:
        listen = f"/ip4/127.0.0.1/tcp/{self.port}"
        return [listen if arg == "/ip4/127.0.0.1/tcp/0" else arg for arg in super().command()]

    def start(self) -> StableDaemon:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                env={**clean_env(), **FAST_ENV},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    def ready(self) -> float:
        took = self.wait_ready()
        self.peer_id = str(self.status()["peer_id"])
        return took

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed, as when the power supply or the
        OOM killer ends it."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def api(self, path: str) -> Any:
        return control_call(self.runtime_dir, path, timeout=5.0)


@dataclass
class JobDriver:
    """Keeps one federated job at a time running on `hub`: submits `durable-1`, and when it
    finishes `durable-2`, ...; resubmits a job that failed (it resumes from its checkpoint).
    Records the highest round the daemon reported for each job."""

    hub: StableDaemon
    trainers: list[str]
    rounds: int
    seed: int
    jobs_dir: Path
    alive: threading.Event = field(default_factory=threading.Event)
    stopped: threading.Event = field(default_factory=threading.Event)
    current: int = 1
    reported: dict[str, int] = field(default_factory=dict)
    finished: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return f"durable-{self.current}"

    def run(self) -> None:
        from hivenode.agent.control_client import ControlError

        while not self.stopped.is_set():
            if not self.alive.wait(0.2):
                continue
            with contextlib.suppress(ControlError):  # killed under us: the main loop restarts it
                self._step()
            time.sleep(0.2)

    def _step(self) -> None:
        from hivenode.agent.control_client import ControlError

        name = self.name
        try:
            job = self.hub.api(f"/v1/jobs/{name}")
        except ControlError as exc:
            if exc.status == 404:
                self._submit(name)
                return
            raise
        with self.lock:
            self.reported[name] = max(self.reported.get(name, 0), int(job["round"]))
            if job["state"] == "finished":
                self.finished.append(name)
                self.current += 1
        if job["state"] == "failed":
            self.failures.append(f"{name}: {job['error']}")
            self._submit(name)

    def _submit(self, name: str) -> None:
        path = self.jobs_dir / f"{name}.toml"
        text = JOB_FILE.format(
            name=name, rounds=self.rounds, seed=self.seed, trainers=repr(self.trainers)
        ).replace("'", '"')
        path.write_text(text)
        cli("jobs", "submit", path, "--runtime-dir", self.hub.runtime_dir, "--json")


@dataclass
class WriterLoad:
    """What an operator's scripts do beside the daemon: `hivenode models add` of a new model
    file and `hivenode qtable import` into the same state directory, in a loop. The process
    in flight is killed with the daemon (`kill`)."""

    state_dir: Path
    work_dir: Path
    seed: int
    running: threading.Event = field(default_factory=threading.Event)
    stopped: threading.Event = field(default_factory=threading.Event)
    done: Counter[str] = field(default_factory=Counter)
    killed: Counter[str] = field(default_factory=Counter)
    _proc: subprocess.Popen[bytes] | None = None
    _what: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        import numpy as np
        from safetensors.numpy import save_file

        table = self.work_dir / "import-qtable.json"
        _foreign_qtable(table)
        rng = np.random.default_rng(self.seed)
        count = 0
        while not self.stopped.is_set():
            if not self.running.wait(0.2):
                continue
            count += 1
            model = self.work_dir / f"load-{count}.safetensors"
            # new bytes every time: each add is a new version, a new blob and a new row
            weights = {"w": rng.standard_normal((128, 128)).astype(np.float32)}
            save_file(weights, str(model))
            self._run("models add", "models", "add", model, "--name", "load")
            model.unlink(missing_ok=True)
            self._run("qtable import", "qtable", "import", table)

    def _run(self, what: str, *args: str | Path) -> None:
        command = [*hivenode_command(), *(str(a) for a in args), "--state-dir", str(self.state_dir)]
        with self._lock:  # `kill` pauses under the same lock: nothing starts after it
            if not self.running.is_set():
                return
            self._what = what
            self._proc = subprocess.Popen(
                command, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            proc = self._proc
        code = proc.wait()
        with self._lock:
            self._proc = None
        if code == 0:
            self.done[what] += 1

    def pause(self) -> None:
        """Let the command in flight finish, start no other."""
        with self._lock:
            self.running.clear()
            proc = self._proc
        if proc is not None:
            proc.wait()

    def kill(self) -> str | None:
        """SIGKILL the command in flight (and pause the loop); which command it was."""
        with self._lock:
            self.running.clear()
            proc, what = self._proc, self._what
            if proc is None or proc.poll() is not None:
                return None
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.killed[what] += 1
        return what


def _foreign_qtable(path: Path) -> None:
    """A Q-table holding one cell of another origin, as a node imports a colleague's table."""
    import json

    from hivenode.planner.qtable import QTable

    table = QTable(IMPORT_ORIGIN)
    table.swarm.set_own((0, 0, 0, 0, 0), 1, 0.5, time.time())
    path.write_text(json.dumps(table.to_json()))


class WriteTrigger:
    """Fires while a file under a state directory is half written: an atomic write's temp
    file exists, or SQLite's write-ahead log just changed."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._wal = state_dir / "registry.sqlite-wal"

    def _dirs(self, scope: str) -> list[Path]:
        root = self.state_dir
        if scope == "registry":
            return [root / "blobs"]
        found = [*root.glob("jobs/*"), *root.glob("checkpoints/*")]
        found += root.glob("checkpoints/*/rounds/*")
        return found if scope == "daemon" else [root, root / "blobs", *found]

    def wait(self, timeout: float, rng: random.Random, scope: str) -> list[str]:
        """Block until a write is in progress (then a random 0-20 ms more, so that kills
        land across write, fsync and rename), or `timeout`; the temp files seen.
        `scope`: "daemon", files no CLI command writes (checkpoints, trainer state);
        "registry", a blob coming in or the registry's WAL changing; "any"."""
        deadline = time.monotonic() + timeout
        known = set(_strays(self._dirs("any")))  # a killed writer's leftovers are no news
        wal = _mtime(self._wal)
        dirs, dirs_at = self._dirs(scope), time.monotonic()
        while time.monotonic() < deadline:
            if time.monotonic() - dirs_at > 0.1:  # round directories come and go
                dirs, dirs_at = self._dirs(scope), time.monotonic()
            seen = [s for s in _strays(dirs) if s not in known]
            if not seen and scope != "daemon" and _mtime(self._wal) != wal:
                seen = [str(self._wal)]
            if seen:
                time.sleep(rng.uniform(0.0, 0.02))
                return [_short(self.state_dir, s) for s in seen]
            time.sleep(POLL_S)
        return []


def _strays(dirs: list[Path]) -> list[str]:
    out = []
    for directory in dirs:
        try:
            with os.scandir(directory) as entries:
                out += [e.path for e in entries if STRAY_PATTERN.match(e.name)]
        except OSError:
            continue  # a round directory removed while we looked
    return out


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _short(root: Path, path: str) -> str:
    return str(Path(path).relative_to(root))
