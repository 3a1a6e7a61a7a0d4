"""`hivenode sim chaos`: fault scenarios on real in-process nodes, each beside a fault-free
run of the same job (same data, seed, strategy and selection).

Scenarios (`Scenario`), on digits split over N trainers with label skew by default:

- `kill-trainers`: the first train message of round `at` kills `fraction` of the trainers
  (`ChaosSwarm.kill`: connections closed, node stopped, no goodbye; their updates are lost
  with them); `rejoin_after` rounds later they restart (new nodes with the same keys and
  state directories) and rejoin.
- `slow-nodes`: `fraction` of the trainers wait `delay_s` before every train message.
- `byzantine`: `fraction` of the trainers send attacked updates (`hivenode.sim.hostile`);
  every defence in `defences` runs clean and attacked. "NAME" is the strategy alone,
  "NAME+screen" the strategy behind the update screen.
- `lossy-links`: every train message to `fraction` of the trainers (all by default) is held
  up U(0, `jitter_s`) s and lost with probability `loss` (seeded): a lost message is never
  answered, so that trainer misses the round (the round waits for its deadline).
- `partition-heal`: from round `at`, `fraction` of the trainers (half by default) are cut
  off: every message to them is lost for `rejoin_after` rounds; then the partition heals.
  Both act on the trainers' FL streams, at the message level (py-libp2p has no packet-level
  fault injection; over TCP, loss shows as delay, and a broken link as a missing message).
- `restart-all`: every node of a swarm of `hivenode run` processes SIGKILLed mid-job and
  started again (`hivenode.sim.chaos_restart`).
- `kill-aggregator`: a standby holds every round's checkpoint (`aggregator.replication`);
  the aggregator is killed once the first trainer has done its round-`at` work, and the
  standby resumes the job once the aggregator has missed 3 pings.
- `kill-aggregator-daemon`: the same with `hivenode run` processes: a job submitted to an
  aggregator daemon names a standby daemon, the aggregator is SIGKILLed once it reports
  round `at`, and the standby's job service resumes the job (`hivenode.sim.chaos_failover`).

Figures (`ChaosReport`): `final_accuracy` and `baseline_accuracy` are the final models'
accuracy on every device's test set (the same examples for both runs); `recovery_s` is the
time from the fault to the first round completed after it (kill-aggregator: by the
standby); `lost_updates` counts train replies that trainers delivered for rounds that
completed but that those rounds neither aggregated nor screened out, plus (kill-aggregator)
the updates of rounds the aggregator completed that the standby did not hold.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, get_args

import trio

from hivenode.agent.node import Node
from hivenode.aggregator.job_spec import JobSpec, StrategyName
from hivenode.aggregator.runner import JobError, RoundRecord, run_job
from hivenode.models.training.backend import LocalData, ModelSpec, backend_for
from hivenode.sim.fl import JOIN_WAIT_S, FlSimConfig, StrategyRun, job_for
from hivenode.sim.fl_datasets import federated_dataset
from hivenode.sim.hostile import hostile_trainers
from hivenode.sim.swarm import quiet_libp2p

log = logging.getLogger(__name__)

SCREEN = "+screen"
DEFAULT_DEFENCES = ("fedavg", "fedavg+screen", "fedmedian", "fedtrimmedavg", "krum")
Progress = Callable[[str], None]


class ChaosError(Exception):
    """A scenario that cannot run as configured; the message says what to change."""


class Scenario(Enum):
    KILL_TRAINERS = "kill-trainers"
    SLOW_NODES = "slow-nodes"
    BYZANTINE = "byzantine"
    KILL_AGGREGATOR = "kill-aggregator"
    LOSSY_LINKS = "lossy-links"
    PARTITION_HEAL = "partition-heal"
    RESTART_ALL = "restart-all"
    KILL_AGGREGATOR_DAEMON = "kill-aggregator-daemon"


@dataclass(frozen=True)
class ChaosConfig:
    scenario: Scenario
    nodes: int = 10
    rounds: int = 20
    seed: int = 0
    dataset: str = "digits"
    partition: str = "dirichlet:0.5"
    model: str = "mlp"
    lr: float = 0.1
    deadline_s: float = 20.0
    strategy: str | None = None
    """The job's strategy (fedavg); byzantine: the defence whose figures head the report
    (fedavg+screen, or fedmedian where jobs have no update screen)."""
    fraction: float | None = None
    """Trainers killed or slowed (0.3), or hostile (byzantine: 0.2)."""
    at_round: int = 0
    """The round the fault strikes in; 0: a third of the way through."""
    rejoin_after: int = 3
    """kill-trainers: rounds after the fault until the killed trainers restart (0: never)."""
    delay_s: float = 3.0
    attack: str = "scale"
    defences: tuple[str, ...] = DEFAULT_DEFENCES
    loss: float = 0.1
    """lossy-links: the chance that a train message is lost on the way."""
    jitter_s: float = 0.2
    """lossy-links: each train message is held up U(0, jitter_s) seconds on the way."""

    @property
    def fault_round(self) -> int:
        return self.at_round or max(2, self.rounds // 3)

    @property
    def share(self) -> float:
        if self.fraction is not None:
            return self.fraction
        if self.scenario is Scenario.PARTITION_HEAL:
            return 0.5
        if self.scenario is Scenario.LOSSY_LINKS:
            return 1.0
        return 0.2 if self.scenario is Scenario.BYZANTINE else 0.3

    @property
    def job_strategy(self) -> str:
        if self.strategy is not None:
            return self.strategy
        if self.scenario is not Scenario.BYZANTINE:
            return "fedavg"
        # what a job gets by default where jobs screen their updates
        return "fedavg" + SCREEN if screen_available() else "fedmedian"

    @property
    def affected(self) -> int:
        return round(self.nodes * self.share)

    def sim_config(self) -> FlSimConfig:
        return FlSimConfig(
            nodes=self.nodes,
            dataset=self.dataset,
            partition=self.partition,
            model=self.model,
            rounds=self.rounds,
            clients_per_round=self.nodes,
            lr=self.lr,
            seed=self.seed,
            deadline_s=self.deadline_s,
        )


@dataclass(frozen=True)
class ChaosReport:
    scenario: str
    completed: bool
    rounds_completed: int
    final_accuracy: float | None
    baseline_accuracy: float | None
    recovery_s: float | None
    lost_updates: int
    details: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunOutcome:
    """One job of a scenario, faulty or not."""

    history: list[RoundRecord]
    accuracy: float | None
    error: str | None
    lost_updates: int
    wall_s: float
    fault_at: float | None = None
    round_done_at: dict[int, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def completed(self, rounds: int) -> bool:
        return self.error is None and len(self.history) == rounds

    def recovery_s(self, fault_round: int) -> float | None:
        """From the fault to the completion of the round it struck (or a later one)."""
        if self.fault_at is None:
            return None
        after = [t for r, t in self.round_done_at.items() if r >= fault_round]
        return round(min(after) - self.fault_at, 2) if after else None


async def run_chaos(config: ChaosConfig, progress: Progress | None = None) -> ChaosReport:
    """Run `config.scenario` and its fault-free baseline; the figures of both."""
    _check(config)
    quiet_libp2p()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    devices = await trio.to_thread.run_sync(
        lambda: federated_dataset(
            config.dataset, config.nodes, partition=config.partition, seed=config.seed
        )
    )
    say = progress or (lambda _: None)
    # the scenarios' modules build on this one's config and report
    if config.scenario is Scenario.BYZANTINE:
        from hivenode.sim.chaos_byzantine import byzantine

        return await byzantine(config, devices, say)
    if config.scenario is Scenario.RESTART_ALL:
        from hivenode.sim.chaos_restart import restart_all

        return await restart_all(config, devices, say)
    if config.scenario is Scenario.KILL_AGGREGATOR_DAEMON:
        from hivenode.sim.chaos_failover import kill_aggregator_daemon

        return await kill_aggregator_daemon(config, devices, say)
    if config.scenario is Scenario.KILL_AGGREGATOR:
        from hivenode.sim.chaos_aggregator import kill_aggregator_run

        one_run: Any = kill_aggregator_run
    elif config.scenario in (Scenario.LOSSY_LINKS, Scenario.PARTITION_HEAL):
        from hivenode.sim.chaos_links import link_faults_run

        one_run = link_faults_run
    else:
        from hivenode.sim.chaos_trainers import trainer_faults_run

        one_run = trainer_faults_run
    say(f"{config.scenario.value}: baseline, {config.nodes} trainers, {config.rounds} rounds")
    baseline = await one_run(config, devices, False, say)
    say(f"{config.scenario.value}: with the fault")
    faulty = await one_run(config, devices, True, say)
    return report_of(config, baseline, faulty)


def _check(config: ChaosConfig) -> None:
    if not 1 <= config.fault_round <= config.rounds:
        raise ChaosError(f"--at {config.fault_round} is not a round of 1..{config.rounds}")
    whole = config.scenario is Scenario.LOSSY_LINKS  # every link may be lossy
    if not (0 < config.share <= 1 if whole else 0 < config.share < 1):
        raise ChaosError(f"--fraction must be between 0 and 1, not {config.share}")
    if not 0 <= config.loss < 1 or config.jitter_s < 0:
        raise ChaosError(
            f"--loss must be in [0, 1) and --jitter ≥ 0 ({config.loss}, {config.jitter_s})"
        )
    everyone = (Scenario.KILL_AGGREGATOR, Scenario.RESTART_ALL, Scenario.KILL_AGGREGATOR_DAEMON)
    if config.scenario not in everyone and config.affected < 1:
        raise ChaosError(f"--fraction {config.share} of {config.nodes} trainers is nobody")
    byzantine = config.scenario is Scenario.BYZANTINE
    known = get_args(StrategyName)
    for label in {config.job_strategy, *(config.defences if byzantine else ())}:
        if label.removesuffix(SCREEN) not in known:
            raise ChaosError(f"unknown strategy {label!r}: use one of {', '.join(known)}")
        if label.endswith(SCREEN) and not screen_available():
            raise ChaosError(
                f"{label}: this job spec has no update screen (screen_updates) to turn on"
            )
    if byzantine:
        try:
            hostile_trainers(config.nodes, config.share, config.attack)
        except ValueError as exc:
            raise ChaosError(str(exc)) from exc


def screen_available() -> bool:
    return "screen_updates" in JobSpec.model_fields


def report_of(config: ChaosConfig, baseline: RunOutcome, faulty: RunOutcome) -> ChaosReport:
    return ChaosReport(
        scenario=config.scenario.value,
        completed=faulty.completed(config.rounds),
        rounds_completed=len(faulty.history),
        final_accuracy=faulty.accuracy,
        baseline_accuracy=baseline.accuracy,
        recovery_s=faulty.recovery_s(config.fault_round),
        lost_updates=faulty.lost_updates,
        details={
            **faulty.details,
            "error": faulty.error,
            "baseline_error": baseline.error,
            "wall_s": {"baseline": round(baseline.wall_s, 1), "faulty": round(faulty.wall_s, 1)},
            "median_round_s": {
                "baseline": _median_round(baseline.history),
                "faulty": _median_round(faulty.history),
            },
            # accuracies of close models can tie on a small test set; the losses tell them apart
            "final_train_loss": {
                "baseline": _final_loss(baseline.history),
                "faulty": _final_loss(faulty.history),
            },
            "failures_per_round": [r.failures for r in faulty.history],
            "seed": config.seed,
            "nodes": config.nodes,
            "rounds": config.rounds,
            "strategy": config.job_strategy,
        },
    )


def _final_loss(history: Sequence[RoundRecord]) -> float | None:
    loss = history[-1].global_train_loss if history else None
    return round(loss, 5) if loss is not None else None


def _median_round(history: Sequence[RoundRecord]) -> float | None:
    return round(statistics.median(r.duration_s for r in history), 3) if history else None


def job_of(config: ChaosConfig, label: str, trainers: Sequence[str], attackers: int) -> JobSpec:
    """The scenario's job: fl.job_for's, with Krum's tolerated attackers and the screen."""
    name, screened = label.removesuffix(SCREEN), label.endswith(SCREEN)
    run = StrategyRun.parse(name, 0.0, "partial")
    raw = job_for(config.sim_config(), run, trainers).model_dump()
    raw["strategy"]["malicious"] = attackers
    if screen_available() and config.scenario is Scenario.BYZANTINE:
        raw["screen_updates"] = screened
    return JobSpec.model_validate(raw)


async def run_job_into(
    outcome: RunOutcome,
    aggregator: Node,
    job: JobSpec,
    job_dir: Path,
    devices: Sequence[LocalData],
    on_round: Callable[[RoundRecord], None],
) -> None:
    """Run `job` from `aggregator`; its history, final accuracy or error into `outcome`."""
    try:
        result = await run_job(
            aggregator, job, job_dir, on_round=on_round, trainer_wait_s=JOIN_WAIT_S
        )
    except JobError as exc:
        outcome.error = str(exc)
        return
    outcome.history = result.history
    outcome.accuracy = await trio.to_thread.run_sync(
        accuracy_on_all, devices, job.model.spec(), result.model_path
    )


def accuracy_on_all(devices: Sequence[LocalData], spec: ModelSpec, model_path: Path) -> float:
    """A final model's accuracy on every device's test set, lost devices' included."""
    import numpy as np
    from safetensors.numpy import load_file

    x = np.concatenate([d.x_test for d in devices])
    y = np.concatenate([d.y_test for d in devices])
    return backend_for(spec.framework).evaluate(spec, load_file(str(model_path)), x, y).accuracy


def round_line(record: RoundRecord) -> str:
    accuracy = f"{record.eval_accuracy:.3f}" if record.eval_accuracy is not None else "-"
    rejected = record.rejected
    return (
        f"  round {record.round}: accuracy {accuracy}, {record.participants} updates, "
        f"{record.failures} failures, {rejected} rejected, {record.duration_s:.1f} s"
    )
