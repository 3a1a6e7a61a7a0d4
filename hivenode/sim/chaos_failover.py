"""The `kill-aggregator-daemon` scenario: a standby daemon resumes the job of an aggregator
daemon that was SIGKILLed mid-job.

Real `hivenode run` processes on 127.0.0.1 (`swarm_processes.Daemon`): a standby and an
aggregator (role aggregator only, so that the kill takes no trainer with it) and N trainers
(role trainer only, each with its own slice of the dataset), which bootstrap to both, as a
swarm with two configured hubs does. The baseline job, submitted to the aggregator, names
the standby by peer id and runs to its end; the second job, the same but for its name, says
`standby = "auto"` (the standby is then the only candidate: the report checks it was
chosen). The aggregator is SIGKILLed as soon as it reports round `at` done; the standby
notices after 3 missed pings and resumes the job from the round it holds. Figures:

- `recovery_s`: from the kill to the first round past the last reported one seen done at
  the standby (polled every 50 ms);
- `lost_updates`: rounds the aggregator reported done that the standby did not resume
  from, times the trainers of a round (a job reports a round only once it was pushed);
- `final_accuracy`, `baseline_accuracy`: the final models on every trainer's test set.
"""

from __future__ import annotations

import json
import signal
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from hivenode.agent.control_client import ControlError, call
from hivenode.models.training.backend import LocalData
from hivenode.sim.chaos import ChaosConfig, ChaosError, ChaosReport, Progress, accuracy_on_all
from hivenode.sim.chaos_restart import JOB, START_TIMEOUT_S, add_data
from hivenode.sim.swarm_processes import Daemon

JOB_TIMEOUT_S = 600.0
POLL_S = 0.05
AGGREGATOR_ONLY = {"HIVENODE_ROLES": '["aggregator"]', "HIVENODE_ADVERT_PERIOD": "2"}
TRAINER_ONLY = {"HIVENODE_ROLES": '["trainer"]', "HIVENODE_ADVERT_PERIOD": "2"}


class _Swarm:
    """Node 0: the standby; node 1: the aggregator; nodes 2..N+1: the trainers."""

    def __init__(self, base: Path, trainers: int) -> None:
        self.base = base
        self.trainers = trainers
        self.daemons: list[Daemon] = []

    def start(self) -> None:
        standby = Daemon(self.base, 0, [], AGGREGATOR_ONLY)
        self.daemons = [standby]
        standby_addr = standby.wait_ready(time.monotonic() + START_TIMEOUT_S)["addrs"][0]
        aggregator = Daemon(self.base, 1, [standby_addr], AGGREGATOR_ONLY)
        self.daemons.append(aggregator)
        aggregator_addr = aggregator.wait_ready(time.monotonic() + START_TIMEOUT_S)["addrs"][0]
        hubs = [standby_addr, aggregator_addr]
        self.daemons += [Daemon(self.base, i, hubs, TRAINER_ONLY) for i in self.trainer_indices]
        for daemon in self.daemons[2:]:
            daemon.wait_ready(time.monotonic() + START_TIMEOUT_S)
        deadline = time.monotonic() + START_TIMEOUT_S
        everyone = len(self.daemons) - 1
        while any(d.peer_count() < everyone for d in self.daemons):
            if time.monotonic() > deadline:
                raise ChaosError("the swarm did not form; logs under " + str(self.base))
            time.sleep(0.2)

    @property
    def trainer_indices(self) -> range:
        return range(2, 2 + self.trainers)

    def node_dir(self, index: int) -> Path:
        return self.base / f"node{index}"

    @property
    def standby(self) -> Daemon:
        return self.daemons[0]

    @property
    def aggregator(self) -> Daemon:
        return self.daemons[1]

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.terminate()
        for daemon in self.daemons:
            daemon.reap(timeout=15.0)


async def kill_aggregator_daemon(
    config: ChaosConfig, devices: Sequence[LocalData], say: Progress
) -> ChaosReport:
    """Runs in a worker thread's blocking calls: the nodes are other processes."""
    if config.fault_round >= config.rounds:
        raise ChaosError(f"--at {config.fault_round} leaves no round for the standby to run")
    return await trio.to_thread.run_sync(_kill_aggregator_daemon, config, devices, say)


def _kill_aggregator_daemon(
    config: ChaosConfig, devices: Sequence[LocalData], say: Progress
) -> ChaosReport:
    with tempfile.TemporaryDirectory(prefix="hn-failover-") as tmp:
        swarm = _Swarm(Path(tmp), config.nodes)
        try:
            for index, device in zip(swarm.trainer_indices, devices, strict=True):
                add_data(swarm.node_dir(index), device)
            say(f"kill-aggregator-daemon: standby, aggregator and {config.nodes} trainer daemons")
            swarm.start()
            standby_id = str(swarm.standby.ask("/v1/status")["peer_id"])
            say("kill-aggregator-daemon: baseline job (standby named by peer id)")
            _submit(swarm.aggregator, _job(config, "baseline", json.dumps([standby_id])))
            baseline, _ = _wait_done(swarm.aggregator, "baseline", say)
            if baseline["state"] != "finished":
                raise ChaosError(f"the baseline job failed: {baseline.get('error')}")
            say(
                f'kill-aggregator-daemon: standby = "auto", aggregator SIGKILLed after round '
                f"{config.fault_round}"
            )
            _submit(swarm.aggregator, _job(config, "failover", '"auto"'))
            reported, standbys = _wait_round(swarm.aggregator, "failover", config.fault_round)
            killed_at = time.monotonic()
            swarm.aggregator.process.send_signal(signal.SIGKILL)
            swarm.aggregator.reap(timeout=10.0)
            say(f"  killed the aggregator with round {reported} reported done")
            job, next_round_at = _wait_done(swarm.standby, "failover", say, after=reported)
            accuracy = _accuracy(config, devices, job)
            baseline_accuracy = _accuracy(config, devices, baseline)
        finally:
            swarm.stop()
    history = job.get("history") or []
    took_over = job.get("took_over") or {}
    resumed_from = int(took_over.get("at_round") or 0)
    completed = job["state"] == "finished" and len(history) == config.rounds
    return ChaosReport(
        scenario="kill-aggregator-daemon",
        completed=completed and took_over.get("from") is not None,
        rounds_completed=len(history),
        final_accuracy=accuracy,
        baseline_accuracy=baseline_accuracy,
        recovery_s=round(next_round_at - killed_at, 2) if next_round_at else None,
        lost_updates=max(0, reported - resumed_from) * config.nodes,
        details={
            "rounds_reported_before_kill": reported,
            "resumed_from_round": resumed_from,
            "standby_chosen": standbys,
            "auto_chose_the_standby": standbys == [standby_id],
            "took_over": took_over,
            "standby_recovery_s": took_over.get("recovery_s"),
            "eval_accuracy": {
                "baseline": baseline["history"][-1]["eval_accuracy"],
                "faulty": history[-1]["eval_accuracy"] if history else None,
            },
            "error": job.get("error"),
            "nodes": config.nodes,
            "rounds": config.rounds,
            "seed": config.seed,
        },
    )


def _job(config: ChaosConfig, name: str, standby: str) -> str:
    # a top-level key: before the template's first table
    return f"standby = {standby}\n" + JOB.format(
        name=name,
        rounds=config.rounds,
        nodes=config.nodes,
        deadline=config.deadline_s,
        seed=config.seed,
        model=config.model,
        lr=config.lr,
    )


def _submit(daemon: Daemon, job_toml: str) -> None:
    import tomllib

    call(daemon.socket, "POST", "/v1/jobs", body=tomllib.loads(job_toml))


def _wait_round(daemon: Daemon, name: str, at_least: int) -> tuple[int, list[str]]:
    """The round `name` reports once it reached `at_least`, and its standbys."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        job = daemon.ask(f"/v1/jobs/{name}")
        if job["round"] >= at_least or job["state"] != "running":
            return int(job["round"]), list(job.get("standbys") or [])
        time.sleep(POLL_S)
    raise ChaosError(f"{name} did not reach round {at_least}")


def _wait_done(
    daemon: Daemon, name: str, say: Progress, after: int | None = None
) -> tuple[dict[str, Any], float | None]:
    """The job once it ended, and when (monotonic) a round past `after` was first seen done
    (the standby knows of the job only once it took it over)."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    shown = after or 0
    seen_at: float | None = None
    while time.monotonic() < deadline:
        try:
            job: dict[str, Any] = daemon.ask(f"/v1/jobs/{name}")
        except ControlError:  # not taken over yet
            time.sleep(POLL_S)
            continue
        if after is not None and seen_at is None and job["round"] > after:
            seen_at = time.monotonic()
        for record in job["history"][shown:]:
            say(
                f"  {name} round {record['round']}: accuracy {record['eval_accuracy']}, "
                f"{record['participants']} updates, {record['failures']} failures, "
                f"{record['duration_s']:.1f} s"
            )
        shown = max(shown, len(job["history"]))
        if job["state"] != "running":
            return job, seen_at
        time.sleep(POLL_S)
    raise ChaosError(f"{name} did not finish in {JOB_TIMEOUT_S:.0f} s")


def _accuracy(
    config: ChaosConfig, devices: Sequence[LocalData], job: dict[str, Any]
) -> float | None:
    """The final model on every trainer's test set (the trainers' own mean when the model
    file is not there)."""
    from hivenode.aggregator.job_spec import JobSpec

    path = Path(job.get("model_path") or "")
    if job.get("model_path") and path.exists():
        spec = JobSpec.model_validate(job["spec"]).model.spec()
        return accuracy_on_all(devices, spec, path)
    history = job.get("history") or []
    return history[-1]["eval_accuracy"] if history else None
