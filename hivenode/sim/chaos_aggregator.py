"""The `kill-aggregator` scenario: a standby resumes a job from the checkpoints it replicated.

Two aggregators: the primary runs the job and pushes each round's checkpoint to the standby
(`CheckpointPusher`); every trainer bootstraps to both, as a swarm with two configured hubs
does. With the fault, the primary is killed mid-round, once the first trainer has done its
round-`at` work (that trainer's update dies with it): its job task is cancelled and its
node killed at once (no goodbye, no last checkpoint). The standby notices after 3 missed
pings and runs the job from the last round it holds. The baseline is the same swarm with
nobody killed.

Where `run_job` takes `replicate`, each round reaches the standby before the next round
starts ("synchronous"), and a kill loses no finished round. Without it the push of round N
runs while round N+1 starts ("pipelined"): a kill within `CheckpointPusher.max_lag_s` of a
round's end loses that round, and its updates count in `lost_updates`.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from hivenode.agent.node import Node
from hivenode.agent.trainer import Trainer
from hivenode.aggregator.checkpoint import CheckpointError, load_checkpoint
from hivenode.aggregator.job_spec import JobSpec
from hivenode.aggregator.replication import CheckpointPusher, Standby
from hivenode.aggregator.runner import JobError, JobResult, RoundRecord, run_job
from hivenode.models.training.backend import LocalData
from hivenode.sim.chaos import (
    ChaosConfig,
    ChaosError,
    Progress,
    RunOutcome,
    accuracy_on_all,
    job_of,
    round_line,
)
from hivenode.sim.chaos_swarm import (
    ChaosSwarm,
    ChaosTrainer,
    Ledger,
    chaos_swarm,
    honest_trainer,
    training_threads,
)
from hivenode.sim.fl import JOIN_WAIT_S


class _KillAggregator:
    """One run of the scenario, faulty or not, and what it saw."""

    def __init__(self, config: ChaosConfig, faulty: bool, base: Path, say: Progress) -> None:
        self.config = config
        self.faulty = faulty
        self.base = base
        self.say = say
        self.ledger = Ledger()
        self.honest = honest_trainer(training_threads())
        self.outcome = RunOutcome([], None, None, 0, 0.0)
        self.standby: Standby | None = None
        self.primary_scope = trio.CancelScope()
        self.primary_records: list[RoundRecord] = []
        self.results: list[JobResult] = []
        # set once the swarm is up
        self.primary: Node | None = None
        self.second: Node | None = None
        self.job: JobSpec | None = None
        self.pusher: CheckpointPusher | None = None
        self.swarm: ChaosSwarm | None = None
        # what the fault left
        self.committed = 0
        """The newest round on the primary's disk when it was stopped."""
        self.replicated = 0
        """The newest round the standby held then."""

    # --- hooks ---------------------------------------------------------------------------

    def prepare(self, swarm: ChaosSwarm, node: Node) -> None:
        if swarm.aggregators:  # the second aggregator backs up the first
            self.standby = Standby(self.base / "standby-jobs", [swarm.aggregators[0].peer_id])
            self.standby.register(node)

    def make_trainer(self, index: int, state_dir: Path, peer_id: str) -> Trainer:
        return ChaosTrainer.wrapping(
            self.honest(index, state_dir, peer_id),
            index=index,
            on_trained=self.on_trained,
            ledger=self.ledger,
        )

    async def on_trained(self, index: int, server_round: int, aggregator: str) -> None:
        primary, job, standby = self.primary, self.job, self.standby
        if not self.faulty or self.outcome.fault_at is not None:
            return
        if server_round != self.config.fault_round or primary is None or job is None:
            return
        if aggregator != primary.peer_id or standby is None:
            return
        self.outcome.fault_at = time.monotonic()
        self.committed = _disk_round(self.primary_dir(job))
        replica = standby.replicas.get(job.name)
        self.replicated = replica.round if replica else 0
        self.primary_scope.cancel()
        assert self.swarm is not None
        self.swarm.spawn(self.swarm.kill, primary)
        self.say(
            f"  killed the aggregator in round {server_round}: round {self.committed} on its "
            f"disk, round {self.replicated} at the standby"
        )

    def on_primary_round(self, record: RoundRecord) -> None:
        assert self.primary is not None and self.pusher is not None
        self.ledger.round_done(self.primary.peer_id, record)
        self.primary_records.append(record)
        self.outcome.round_done_at[record.round] = time.monotonic()
        self.say(round_line(record))

    def on_standby_round(self, record: RoundRecord) -> None:
        assert self.second is not None
        self.ledger.round_done(self.second.peer_id, record)
        self.outcome.round_done_at[record.round] = time.monotonic()
        self.say(round_line(record) + " (standby)")

    # --- the run -------------------------------------------------------------------------

    def primary_dir(self, job: JobSpec) -> Path:
        return self.base / "primary" / job.name

    async def run(self, devices: Sequence[LocalData]) -> RunOutcome:
        started = time.monotonic()
        async with chaos_swarm(
            self.base, devices, self.make_trainer, aggregators=2, prepare_aggregator=self.prepare
        ) as swarm:
            self.swarm = swarm
            self.primary, self.second = swarm.aggregators
            self.job = job = job_of(self.config, self.config.job_strategy, swarm.trainer_ids, 0)
            self.pusher = CheckpointPusher(
                self.primary, job, self.primary_dir(job), [self.second.peer_id]
            )
            # a job that outlives every round's deadline twice over is stuck, not slow
            limit = 2 * self.config.rounds * (self.config.deadline_s + 5) + 2 * JOIN_WAIT_S
            try:
                with trio.fail_after(limit):
                    await self._jobs(job)
            except JobError as exc:
                self.outcome.error = str(exc)
            except trio.TooSlowError:
                self.outcome.error = f"the job did not finish within {limit:.0f} s"
            if self.results:
                self.outcome.history = self.results[-1].history
                self.outcome.accuracy = await trio.to_thread.run_sync(
                    accuracy_on_all, devices, job.model.spec(), self.results[-1].model_path
                )
            elif self.outcome.error is None:
                self.outcome.error = "no aggregator finished the job"
        self.outcome.wall_s = time.monotonic() - started
        return self._finish()

    async def _jobs(self, job: JobSpec) -> None:
        assert self.primary and self.second and self.pusher and self.standby
        primary, pusher = self.primary, self.pusher
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pusher.run)

            async def primary_job() -> None:
                try:
                    with self.primary_scope:
                        result = await run_job(
                            primary,
                            job,
                            self.primary_dir(job),
                            on_round=self.on_primary_round,
                            trainer_wait_s=JOIN_WAIT_S,
                            replicate=pusher.replicate,
                        )
                        self.results.append(result)
                except* Exception:
                    # what a killed aggregator's job raises on its way down (its Flower
                    # thread finds the job's channels closed) is the corpse's, not ours
                    if self.outcome.fault_at is None:
                        raise
                finally:
                    pusher.close()

            nursery.start_soon(primary_job)
            if self.faulty:
                self.results += await self.standby.take_over(
                    self.second,
                    primary.peer_id,
                    on_round=self.on_standby_round,
                    trainer_wait_s=JOIN_WAIT_S,
                )

    def _finish(self) -> RunOutcome:
        outcome = self.outcome
        lost_rounds = [
            r for r in self.primary_records if self.replicated < r.round <= self.committed
        ]
        outcome.lost_updates = self.ledger.lost()
        if not self.faulty:
            return outcome
        outcome.lost_updates += sum(r.participants for r in lost_rounds)
        outcome.details.update(
            {
                "killed_in_round": self.config.fault_round,
                "round_on_disk_at_kill": self.committed,
                "round_at_standby_at_kill": self.replicated,
                "completed_rounds_redone": len(lost_rounds),
                "resumed_from_round": self.results[-1].resumed_from if self.results else None,
                "replication": "synchronous",
                "replication_max_lag_ms": round(self.pusher.max_lag_s * 1000, 1)
                if self.pusher
                else None,
            }
        )
        return outcome


async def kill_aggregator_run(
    config: ChaosConfig, devices: Sequence[LocalData], faulty: bool, say: Progress
) -> RunOutcome:
    if config.rounds < 2:
        raise ChaosError("kill-aggregator needs 2 rounds or more: one to replicate")
    with tempfile.TemporaryDirectory(prefix="hn-chaos-") as tmp:
        return await _KillAggregator(config, faulty, Path(tmp), say).run(devices)


def _disk_round(job_dir: Path) -> int:
    try:
        checkpoint = load_checkpoint(job_dir)
    except CheckpointError:
        return -1
    return checkpoint.round if checkpoint else 0
