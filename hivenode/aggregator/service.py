"""Jobs in the daemon: `POST /v1/jobs` starts one, `GET /v1/jobs[/{name}]` reports on them.

Each job lives in `<state_dir>/checkpoints/<name>/`: `job.json` (the spec, its state and
error) next to the round checkpoints. A daemon that restarts resumes every job that was
running, from its last checkpoint, unless one of its standbys took it over meanwhile.

A job that names standbys replicates every round to them; this service is also every
other job's potential standby, and runs a job whose aggregator died from the checkpoint it
holds, under the same name (`hivenode.aggregator.failover`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from pydantic import ValidationError

from hivenode.agent.control import ApiError, ControlApi, Request
from hivenode.agent.node import Node
from hivenode.aggregator.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from hivenode.aggregator.failover import JobReplication, StandbyDuty, taken_over_by
from hivenode.aggregator.flower_jobs import run_flower_job
from hivenode.aggregator.job_reward import job_lesson
from hivenode.aggregator.job_spec import JobSpec
from hivenode.aggregator.parallel_runner import run_parallel_job
from hivenode.aggregator.planned_jobs import is_auto, resolve_auto
from hivenode.aggregator.replication import Replica
from hivenode.aggregator.runner import JobError, JobResult, Replicate, RoundRecord, run_job
from hivenode.fsutil import atomic_write
from hivenode.models.errors import ModelError
from hivenode.models.training.backend import TrainingError

log = logging.getLogger(__name__)

RUNNING, FINISHED, FAILED = "running", "finished", "failed"
HANDED_OVER = "handed-over"
"""A job a standby took over while this node was gone: it runs there, not here."""


@dataclass
class JobState:
    spec: JobSpec
    state: str = RUNNING
    error: str | None = None
    submitted_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    history: list[RoundRecord] = field(default_factory=list)
    model_path: str | None = None
    resumed_from: int = 0
    """The round the last run of the job started after (0: from scratch)."""
    registered: str | None = None
    """The final model in the node's registry, as name@version."""
    chosen: str | None = None
    """`mode = "auto"`: the action the Q-table chose for the job's last run."""
    effective: JobSpec | None = None
    """The spec the last run ran: the submitted one, or what `auto` resolved it to."""
    standbys: list[str] = field(default_factory=list)
    """The peers this node pushes the job's checkpoints to."""
    took_over_from: str | None = None
    """The aggregator this node took the job over from (None: submitted here)."""
    took_over_at_round: int = 0
    """The round of the checkpoint this node resumed the taken-over job from."""
    recovery_s: float | None = None
    """A taken-over job: from the dead aggregator's last answered ping to the first round
    finished here (an upper bound on the time the job stood still)."""
    gone_since: float | None = None
    """Trio time of the dead aggregator's last answered ping (this process only)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": self.spec.model_dump(mode="json"),
            "state": self.state,
            "error": self.error,
            "submitted_at": self.submitted_at,
            "finished_at": self.finished_at,
            "model_path": self.model_path,
            "registered": self.registered,
            "standbys": self.standbys,
            "took_over_from": self.took_over_from,
            "took_over_at_round": self.took_over_at_round,
            "recovery_s": self.recovery_s,
        }

    def summary(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else None
        return {
            "name": self.spec.name,
            "state": self.state,
            "strategy": _strategy_of(self.effective or self.spec, self.chosen),
            "round": last.round if last else 0,
            "rounds": self.spec.rounds,
            "accuracy": last.eval_accuracy if last else None,
            "loss": (last.global_train_loss or last.train_loss) if last else None,
            "participants": last.participants if last else 0,
            # a DP job's privacy spent so far (ε at the job's δ); None without DP
            "epsilon": last.epsilon if last else None,
            "error": self.error,
        }

    def detail(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "spec": self.spec.model_dump(mode="json"),
            "submitted_at": self.submitted_at,
            "finished_at": self.finished_at,
            "model_path": self.model_path,
            "resumed_from": self.resumed_from,
            "registered": self.registered,
            "chosen": self.chosen,
            "standbys": self.standbys,
            "took_over": (
                {
                    "from": self.took_over_from,
                    "at_round": self.took_over_at_round,
                    "recovery_s": self.recovery_s,
                }
                if self.took_over_from
                else None
            ),
            "history": [r.as_json() for r in self.history],
        }

    def on_round(self, record: RoundRecord) -> None:
        if self.gone_since is not None and self.recovery_s is None:
            self.recovery_s = round(trio.current_time() - self.gone_since, 2)
        self.history.append(record)


class JobService:
    """The aggregator role in the daemon."""

    def __init__(self) -> None:
        self._jobs: dict[str, JobState] = {}
        self._node: Node | None = None
        self._root = Path()
        self._send, self._receive = trio.open_memory_channel[str](64)
        self._duty: StandbyDuty | None = None

    def install(self, node: Node, api: ControlApi, state_dir: Path) -> None:
        self._node = node
        self._root = state_dir / "checkpoints"
        self._duty = StandbyDuty(node, self._root, self._is_own, self._take_over)
        self._duty.register()
        api.route("POST", "/v1/jobs", self._submit, mutating=True)
        api.route("GET", "/v1/jobs", self._list)
        api.route("GET", "/v1/jobs/{name}", self._show)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Resume the jobs that were running, then run each submitted job as it comes."""
        await trio.to_thread.run_sync(self._load_all)
        async with trio.open_nursery() as nursery:
            if self._duty is not None:
                for job in self._jobs.values():
                    if job.took_over_from is not None:
                        self._duty.restore(job.spec, job.took_over_from, job.took_over_at_round)
                nursery.start_soon(self._duty.run)
            for name, job in self._jobs.items():
                if job.state == RUNNING:
                    log.info("resuming job %s", name)
                    nursery.start_soon(self._resume, name)
            task_status.started()
            async for name in self._receive:
                nursery.start_soon(self._run_one, name)

    # --- routes ------------------------------------------------------------------------------

    async def _submit(self, request: Request, params: dict[str, str]) -> Any:
        try:
            spec = JobSpec.model_validate_json(request.body or b"{}")
        except ValidationError as exc:
            raise ApiError(400, _validation_message(exc)) from exc
        known = self._jobs.get(spec.name)
        if known is not None and known.state == RUNNING:
            raise ApiError(409, f"job {spec.name!r} is already running")
        if known is not None and known.spec != spec:
            raise ApiError(409, f"a different job named {spec.name!r} exists; pick a new name")
        job = JobState(spec, history=list(known.history) if known else [])
        self._jobs[spec.name] = job
        await trio.to_thread.run_sync(self._save, job)
        await self._send.send(spec.name)
        return job.summary()

    async def _list(self, request: Request, params: dict[str, str]) -> Any:
        return [job.summary() for job in sorted(self._jobs.values(), key=lambda j: j.submitted_at)]

    async def _show(self, request: Request, params: dict[str, str]) -> Any:
        job = self._jobs.get(params["name"])
        if job is None:
            raise ApiError(404, f"no job named {params['name']!r}")
        return job.detail()

    # --- fail-over ---------------------------------------------------------------------------

    def _is_own(self, name: str) -> bool:
        job = self._jobs.get(name)
        return job is not None and job.took_over_from is None

    async def _take_over(self, replica: Replica, last_seen: float) -> None:
        """Run the job of `replica` here: its aggregator is gone."""
        name = replica.job.name
        job = JobState(
            replica.job,
            took_over_from=replica.aggregator,
            took_over_at_round=replica.round,
            gone_since=last_seen,
        )
        try:
            checkpoint = await trio.to_thread.run_sync(load_checkpoint, self._root / name)
        except CheckpointError as exc:
            log.error("job %s: the replicated checkpoint is unreadable: %s", name, exc)
            checkpoint = None
        if checkpoint is not None:
            job.history = [RoundRecord.from_json(r) for r in checkpoint.history]
        self._jobs[name] = job
        await trio.to_thread.run_sync(self._save, job)
        await self._send.send(name)

    async def _resume(self, name: str) -> None:
        """Resume a job this node ran before it stopped, unless a standby has it now."""
        job = self._jobs[name]
        assert self._node is not None
        if job.standbys:
            exclude = [job.took_over_from] if job.took_over_from else []
            standbys = [p for p in job.standbys if p not in exclude]
            holder = await taken_over_by(self._node, job.spec, standbys)
            if holder is not None:
                log.warning("job %s: standby %s took it over; not resuming it", name, holder)
                job.state, job.finished_at = HANDED_OVER, time.time()
                job.error = f"taken over by {holder}"
                await trio.to_thread.run_sync(self._save, job)
                return
        await self._run_one(name)

    # --- running -----------------------------------------------------------------------------

    async def _run_one(self, name: str) -> None:
        job = self._jobs[name]
        assert self._node is not None
        job.state, job.error, job.finished_at = RUNNING, None, None
        job.resumed_from = len(job.history)
        result: JobResult | None = None
        spec = job.effective = job.spec
        try:
            if is_auto(spec):
                spec, plan = await resolve_auto(self._node, spec)
                job.effective, job.chosen = spec, plan.chosen.value
            if spec.flower_app is not None:
                result = await run_flower_job(self._node, spec, self._root / name)
            elif spec.parallel is not None:
                result = await run_parallel_job(
                    self._node, spec, self._root / name, on_round=job.on_round
                )
            elif spec.standby:
                result = await self._run_replicated(job, spec)
            else:
                result = await run_job(self._node, spec, self._root / name, on_round=job.on_round)
            job.history, job.model_path = result.history, str(result.model_path)
            try:
                if job.spec.flower_app is None:  # an app saves its own model, if any
                    job.registered = await trio.to_thread.run_sync(self._register, job)
            except ModelError as exc:  # the model file stays; the job did its work
                log.error("job %s: could not register its model: %s", name, exc)
            job.state = FINISHED
            log.info("job %s finished after %d rounds", name, len(result.history))
        except (JobError, TrainingError, CheckpointError, ModelError) as exc:
            job.state, job.error = FAILED, str(exc)
            log.error("job %s failed: %s", name, exc)
        except Exception as exc:  # one job's bug must not take the daemon down
            job.state, job.error = FAILED, f"{type(exc).__name__}: {exc}"
            log.exception("job %s crashed", name)
        job.finished_at = time.time()
        await trio.to_thread.run_sync(self._save, job)
        self._teach(job, result if job.state == FINISHED else None)

    async def _run_replicated(self, job: JobState, spec: JobSpec) -> JobResult:
        assert self._node is not None
        name = spec.name
        # a taken-over job never replicates back to the aggregator it replaced
        exclude = [job.took_over_from] if job.took_over_from else []
        replication = JobReplication(self._node, spec, self._root / name, job.on_round, exclude)
        return await run_job(
            self._node,
            spec,
            self._root / name,
            on_round=replication.on_round,
            replicate=self._replicate_into(job, replication),
        )

    def _replicate_into(self, job: JobState, replication: JobReplication) -> Replicate:
        async def replicate(checkpoint: Checkpoint) -> None:
            await replication.replicate(checkpoint)
            if replication.standbys != job.standbys:  # chosen at the first round: keep it
                job.standbys = list(replication.standbys)
                await trio.to_thread.run_sync(self._save, job)

        return replicate

    def _teach(self, job: JobState, result: JobResult | None) -> None:
        """Record the job's reward in the swarm's Q-table (this node's cells)."""
        node = self._node
        ran = job.effective or job.spec
        if node is None or node.qtable is None or is_auto(ran):  # auto never resolved: nothing ran
            return
        last = job.history[-1] if job.history else None
        wall_s = (job.finished_at or time.time()) - job.submitted_at
        trainers = result.trainers if result else list(job.spec.trainers)
        state, action, value = job_lesson(
            node,
            ran,
            trainers or [node.peer_id],
            result.params if result else 0,
            last.eval_accuracy if last else None,
            wall_s,
            succeeded=result is not None,
        )
        node.qtable.record(state, action, value)
        log.info(
            "job %s taught the Q-table: %s at %s → reward %.3f", job.spec.name, action, state, value
        )

    def _register(self, job: JobState) -> str:
        """The final model as the next version of the job's name in the registry."""
        from hivenode.models.identify import identify
        from hivenode.models.registry import Registry

        assert job.model_path is not None
        path = Path(job.model_path)
        last = job.history[-1] if job.history else None
        metrics = {
            "job": job.spec.name,
            "rounds": len(job.history),
            "accuracy": last.eval_accuracy if last else None,
            "loss": (last.global_train_loss or last.train_loss) if last else None,
        }
        with Registry(self._root.parent) as registry:
            version = registry.add(path, job.spec.name, identify(path), metrics=metrics)
        return version.spec

    def _save(self, job: JobState) -> None:
        path = self._root / job.spec.name / "job.json"
        atomic_write(path, json.dumps(job.to_json(), indent=2).encode())

    def _load_all(self) -> None:
        for path in sorted(self._root.glob("*/job.json")):
            try:
                raw = json.loads(path.read_text())
                job = JobState(
                    spec=JobSpec.model_validate(raw["spec"]),
                    state=raw["state"],
                    error=raw.get("error"),
                    submitted_at=raw.get("submitted_at", 0.0),
                    finished_at=raw.get("finished_at"),
                    model_path=raw.get("model_path"),
                    registered=raw.get("registered"),
                    standbys=list(raw.get("standbys") or []),
                    took_over_from=raw.get("took_over_from"),
                    took_over_at_round=int(raw.get("took_over_at_round") or 0),
                    recovery_s=raw.get("recovery_s"),
                )
                checkpoint = load_checkpoint(path.parent)
            except (OSError, ValueError, KeyError, ValidationError, CheckpointError) as exc:
                log.error("skipping unreadable job %s: %s", path.parent.name, exc)
                continue
            if checkpoint is not None:
                job.history = [RoundRecord.from_json(r) for r in checkpoint.history]
            self._jobs[job.spec.name] = job


def _strategy_of(spec: JobSpec, chosen: str | None) -> str:
    how = f"{spec.parallel.mode}-parallel" if spec.parallel else spec.strategy.name
    return f"auto: {chosen} ({how})" if chosen else how


def _validation_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "job"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"
