"""One `hivenode run` OS process per node: what a real deployment looks like, at ~90 MB and
~0.5 s of start-up (mostly `import libp2p`) per node."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hivenode.agent.control_client import ControlError, call
from hivenode.agent.paths import SOCKET_NAME
from hivenode.sim.environment import isolated_environment
from hivenode.sim.swarm import SwarmReport, hub_count, make_report, progress_bar, rss_mb

START_TIMEOUT = 60.0
POLL_PERIOD = 0.5


class Daemon:
    """A `hivenode run` child process with its own state and runtime dirs."""

    def __init__(
        self,
        base: Path,
        index: int,
        bootstrap: list[str],
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.dir = base / f"node{index}"
        self.socket = self.dir / "run" / SOCKET_NAME
        args = [
            str(Path(sys.executable).parent / "hivenode"),
            "run",
            "--state-dir",
            str(self.dir / "state"),
            "--runtime-dir",
            str(self.dir / "run"),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--no-metrics",
            "--log-level",
            "WARNING",
        ]
        for addr in bootstrap:
            args += ["--bootstrap", addr]
        environment = isolated_environment()
        # many daemons share this machine: one framework thread each, or their thread pools
        # spin against each other (measured: a 0.1 s round took 4-10 s with five daemons)
        environment.setdefault("OMP_NUM_THREADS", "1")
        environment.update(env or {})
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = (self.dir / "log").open("wb")
        self.process = subprocess.Popen(
            args, env=environment, stdout=self.log, stderr=subprocess.STDOUT
        )

    def ask(self, path: str) -> Any:
        return call(self.socket, "GET", path, timeout=10.0)

    def wait_ready(self, deadline: float) -> dict[str, Any]:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"node exited with {self.process.returncode}; see {self.dir / 'log'}"
                )
            try:
                status: dict[str, Any] = self.ask("/v1/status")
                return status
            except ControlError:
                time.sleep(0.1)
        raise RuntimeError(f"node did not start in {START_TIMEOUT:g} s; see {self.dir / 'log'}")

    def peer_count(self) -> int:
        try:
            return len(self.ask("/v1/peers"))
        except ControlError:
            return 0

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def reap(self, timeout: float) -> None:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def run_process_swarm(nodes: int, seed: int, timeout: float, progress: bool) -> SwarmReport:
    hubs = min(hub_count(nodes), nodes)
    with tempfile.TemporaryDirectory(prefix="hivenode-sim-") as tmp:
        base = Path(tmp)
        daemons: list[Daemon] = []
        converged_at = None
        try:
            started = time.monotonic()
            hub_addrs: list[str] = []
            for index in range(hubs):
                hub = Daemon(base, index, hub_addrs[:1])
                daemons.append(hub)
                hub_addrs.append(hub.wait_ready(started + START_TIMEOUT)["addrs"][0])
            daemons += [Daemon(base, i, [hub_addrs[i % hubs]]) for i in range(hubs, nodes)]
            for daemon in daemons:
                daemon.wait_ready(time.monotonic() + START_TIMEOUT)
            startup_s = time.monotonic() - started
            want = nodes * (nodes - 1)
            with (
                ThreadPoolExecutor(max_workers=8) as pool,
                progress_bar(progress) as bar,
            ):
                task = bar.add_task("peer tables", total=want)
                while time.monotonic() - started < timeout:
                    have = sum(pool.map(Daemon.peer_count, daemons))
                    bar.update(task, completed=have)
                    if have == want:
                        converged_at = time.monotonic()
                        break
                    time.sleep(POLL_PERIOD)
            rss_total = rss_mb([d.process.pid for d in daemons])
            received = sum(
                int(d.ask("/v1/status").get("adverts", {}).get("received", 0)) for d in daemons
            )
        finally:
            stop_started = time.monotonic()
            for daemon in daemons:
                daemon.terminate()
            for daemon in daemons:
                daemon.reap(timeout=15.0)
            shutdown_s = time.monotonic() - stop_started
    return make_report(
        nodes=nodes,
        mode="one process per node",
        started=started,
        startup_s=startup_s,
        converged_at=converged_at,
        rss_mb_total=rss_total,
        rss_mb_per_node=rss_total / nodes,
        adverts_received=received,
        shutdown_s=shutdown_s,
        seed=seed,
        hubs=hubs,
    )
