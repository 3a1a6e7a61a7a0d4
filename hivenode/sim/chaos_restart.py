"""The `restart-all` scenario: every node of a swarm of `hivenode run` processes is
SIGKILLed mid-job, then started again on the same state directories.

Unlike the other scenarios this one needs real processes: what it checks is what a machine
that loses power keeps on disk. One daemon aggregates (and trains), the others train, each
on its own slice of the dataset. The baseline is the same job run to its end first, on the
same swarm; it also leaves a registered model and Q-table lessons behind. The second job is
killed with every node once round `at` is done; after the restart:

- the job resumes from its last checkpoint and finishes (`recovery_s`: from the kill to the
  first round completed after it; `lost_updates`: rounds the job had reported done that it
  trained again, times the trainers in a round);
- the registry still lists every version it had, with the same hash;
- the Q-table still holds every visit it held (gossip may add some, never remove);
- the first job is still reported finished, with its whole history.
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hivenode.agent.control_client import ControlError, call
from hivenode.models.training.backend import LocalData
from hivenode.sim.chaos import ChaosConfig, ChaosReport, Progress
from hivenode.sim.swarm_processes import Daemon

START_TIMEOUT_S = 60.0
JOB_TIMEOUT_S = 600.0
JOB = """\
name = "{name}"
dataset = "chaos"
rounds = {rounds}
clients_per_round = {nodes}
deadline_s = {deadline}
seed = {seed}
[model]
framework = "torch"
name = "{model}"
[train]
lr = {lr}
batch_size = 16
"""


class _Swarm:
    def __init__(self, base: Path, nodes: int) -> None:
        self.base = base
        self.nodes = nodes
        self.daemons: list[Daemon] = []

    def start(self) -> None:
        hub = Daemon(self.base, 0, [])
        hub_addr = hub.wait_ready(time.monotonic() + START_TIMEOUT_S)["addrs"][0]
        self.daemons = [hub] + [Daemon(self.base, i, [hub_addr]) for i in range(1, self.nodes)]
        for daemon in self.daemons[1:]:
            daemon.wait_ready(time.monotonic() + START_TIMEOUT_S)
        deadline = time.monotonic() + START_TIMEOUT_S
        while any(d.peer_count() < self.nodes - 1 for d in self.daemons):
            if time.monotonic() > deadline:
                raise RuntimeError("the swarm did not form; logs under " + str(self.base))
            time.sleep(0.3)

    def kill_all(self) -> None:
        for daemon in self.daemons:
            daemon.process.send_signal(signal.SIGKILL)
        for daemon in self.daemons:
            daemon.reap(timeout=10.0)

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.terminate()
        for daemon in self.daemons:
            daemon.reap(timeout=15.0)

    @property
    def hub(self) -> Daemon:
        return self.daemons[0]

    def state_dir(self, index: int) -> Path:
        return self.base / f"node{index}" / "state"


async def restart_all(
    config: ChaosConfig, devices: Sequence[LocalData], say: Progress
) -> ChaosReport:
    """Runs in a worker thread's blocking calls: the nodes are other processes."""
    import trio

    return await trio.to_thread.run_sync(_restart_all, config, devices, say)


def _restart_all(config: ChaosConfig, devices: Sequence[LocalData], say: Progress) -> ChaosReport:
    with tempfile.TemporaryDirectory(prefix="hn-restart-") as tmp:
        swarm = _Swarm(Path(tmp), config.nodes)
        try:
            for index, device in enumerate(devices):
                add_data(swarm.base / f"node{index}", device)
            say(f"restart-all: starting {config.nodes} daemons")
            swarm.start()
            say("restart-all: baseline job")
            baseline = _run(swarm.hub, _job(config, "baseline"), "baseline", say)
            registry_before = _registry(swarm.state_dir(0))
            qtables_before = [_visits(swarm.state_dir(i)) for i in range(config.nodes)]
            say(f"restart-all: the same job, every node SIGKILLed after round {config.fault_round}")
            _submit(swarm.hub, _job(config, "restarted"))
            reported = _wait_round(swarm.hub, "restarted", config.fault_round)
            killed_at = time.monotonic()
            swarm.kill_all()
            say(f"  killed all {config.nodes} daemons with round {reported} reported done")
            swarm.start()
            say("  every daemon restarted on its state directory")
            job, next_round_at = _wait_done(swarm.hub, "restarted", say, after=reported)
            history = job.get("history") or []
            after_kill = [r for r in history if r["round"] > reported]
            recovery = round(next_round_at - killed_at, 2) if next_round_at else None
            resumed_from = int(job.get("resumed_from") or 0)
            finished_baseline = swarm.hub.ask("/v1/jobs/baseline")
            details: dict[str, Any] = {
                "rounds_reported_before_kill": reported,
                "resumed_from_round": resumed_from,
                "registry_intact": set(registry_before) <= set(_registry(swarm.state_dir(0))),
                "qtable_intact": all(
                    _covers(_visits(swarm.state_dir(i)), before)
                    for i, before in enumerate(qtables_before)
                ),
                "first_job_intact": finished_baseline["state"] == "finished"
                and len(finished_baseline["history"]) == config.rounds,
                "error": job.get("error"),
            }
        finally:
            swarm.stop()
    completed = job["state"] == "finished" and len(history) == config.rounds
    intact = all(details[k] for k in ("registry_intact", "qtable_intact", "first_job_intact"))
    return ChaosReport(
        scenario="restart-all",
        completed=completed and intact,
        rounds_completed=len(history),
        final_accuracy=history[-1]["eval_accuracy"] if history else None,
        baseline_accuracy=baseline["history"][-1]["eval_accuracy"],
        recovery_s=recovery,
        lost_updates=max(0, reported - resumed_from) * config.nodes,
        details={**details, "rounds_after_restart": len(after_kill)},
    )


def _job(config: ChaosConfig, name: str) -> str:
    return JOB.format(
        name=name,
        rounds=config.rounds,
        nodes=config.nodes,
        deadline=config.deadline_s,
        seed=config.seed,
        model=config.model,
        lr=config.lr,
    )


def _hivenode() -> str:
    import sys

    return str(Path(sys.executable).parent / "hivenode")


def add_data(node_dir: Path, device: LocalData) -> None:
    from hivenode.sim.fl_datasets import save_partition

    node_dir.mkdir(parents=True, exist_ok=True)
    save_partition(device, node_dir / "data.npz")
    args = ["data", "add", "chaos", str(node_dir / "data.npz")]
    args += ["--state-dir", str(node_dir / "state")]
    result = subprocess.run([_hivenode(), *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"hivenode data add failed: {result.stderr.strip()}")


def _submit(hub: Daemon, job_toml: str) -> None:
    import tomllib

    call(hub.socket, "POST", "/v1/jobs", body=tomllib.loads(job_toml))


def _run(hub: Daemon, job_toml: str, name: str, say: Progress) -> dict[str, Any]:
    _submit(hub, job_toml)
    job, _ = _wait_done(hub, name, say)
    if job["state"] != "finished":
        raise RuntimeError(f"the {name} job failed: {job.get('error')}")
    return job


def _wait_round(hub: Daemon, name: str, at_least: int) -> int:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        job = hub.ask(f"/v1/jobs/{name}")
        if job["round"] >= at_least or job["state"] != "running":
            return int(job["round"])
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not reach round {at_least}")


def _wait_done(
    hub: Daemon, name: str, say: Progress, after: int | None = None
) -> tuple[dict[str, Any], float | None]:
    """The job once it ended, and when (monotonic) a round past `after` was first seen done."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    shown = 0
    seen_at: float | None = None
    while time.monotonic() < deadline:
        try:
            job: dict[str, Any] = hub.ask(f"/v1/jobs/{name}")
        except ControlError:  # not restarted yet
            time.sleep(0.1)
            continue
        if after is not None and seen_at is None and job["round"] > after:
            seen_at = time.monotonic()
        for record in job["history"][shown:]:
            say(f"  {name} round {record['round']}: accuracy {record['eval_accuracy']}")
        shown = len(job["history"])
        if job["state"] != "running":
            return job, seen_at
        time.sleep(0.1)
    raise RuntimeError(f"{name} did not finish in {JOB_TIMEOUT_S:.0f} s")


def _registry(state_dir: Path) -> list[tuple[str, int, str]]:
    from hivenode.models.registry import Registry

    with Registry(state_dir) as registry:
        return sorted(
            (v.name, v.version, v.sha256)
            for latest in registry.list()
            for v in registry.versions(latest.name)
        )


def _visits(state_dir: Path) -> np.ndarray[Any, Any]:
    from hivenode.planner.qtable import QTable

    return QTable.load(state_dir).visits


def _covers(after: np.ndarray[Any, Any], before: np.ndarray[Any, Any]) -> bool:
    return bool((after >= before).all())
