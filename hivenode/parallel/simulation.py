"""`hivenode sim parallel`: data-, pipeline- or model-parallel training on real nodes on
127.0.0.1, timed, and checked against the same training on one node.

Every node is a real libp2p host in this process (one trio loop), training on a seeded
synthetic task (Gaussian features labelled by a random linear teacher). The single-node
reference trains the same model from the same initial weights on the same batches.

With `kill_stage` a pipeline runs with fail-over (`pipeline_failover.py`): a coordinator and
`spares` spare nodes besides the stages, and the stage's node is killed as it starts
`kill_step`. The weights must still equal the single node's: the job resumes from a
consistent checkpoint and redoes the same steps.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio

from hivenode.parallel.allreduce import AllReduceConfig, theoretical_bytes_per_peer
from hivenode.parallel.errors import ParallelError
from hivenode.parallel.faults import Fault, StageKill, faulty_averager
from hivenode.parallel.local_nodes import LocalNode, LocalNodes, local_nodes
from hivenode.protocol.compression import Compression

MODES = ("data", "pipeline", "model")
EQUIVALENCE_TOLERANCE = 1e-5
"""float32 training on one node and on several agree to this after the run."""


@dataclass(frozen=True)
class SimConfig:
    mode: str = "data"
    nodes: int = 4
    seed: int = 0
    steps: int = 50
    batch_size: int = 32
    """Data: each replica's batch (the single node's is nodes × this); pipeline and model:
    the whole batch."""
    micro_batches: int = 4
    """Pipeline only; model parallelism is one micro-batch."""
    hidden: tuple[int, ...] = ()
    """MLP widths; empty: 2 × 256 for data, nodes × 256 for pipeline/model (a layer each)."""
    features: int = 64
    classes: int = 10
    samples: int = 4096
    lr: float = 0.05
    momentum: float = 0.9
    compression: Compression = Compression.NONE
    peer_timeout: float = 10.0
    fault: Fault | None = None
    """Data only: the last replica fails this way at `fault_step`."""
    fault_step: int = 10
    kill_stage: int | None = None
    """Pipeline and model only: this stage's node dies as it starts `kill_step`, and a spare
    takes the stage over from the last checkpoint."""
    kill_step: int | None = None
    """None: half way through the steps."""
    spares: int = 1
    """With `kill_stage`: the spare nodes standing by (0: the job must abort)."""
    checkpoint_every: int = 10
    """With `kill_stage`: steps between the stages' checkpoints."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ParallelError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.nodes < 2 if self.mode == "data" else self.nodes < 1:
            raise ParallelError(f"{self.mode} parallelism needs more nodes than {self.nodes}")
        if self.fault is not None and (self.mode != "data" or self.nodes < 3):
            raise ParallelError(
                "faults are simulated for data parallelism on 3 or more nodes (a pipeline "
                "stage's node is killed with kill_stage)"
            )
        if self.kill_stage is not None:
            self._check_kill(self.kill_stage)
        if self.fault is not None and not 0 < self.fault_step < self.steps - 1:
            raise ParallelError(f"the fault step must lie inside the {self.steps} steps")
        if self.steps < 2 or self.batch_size < 1:
            raise ParallelError("need at least 2 steps and a batch of at least 1")

    def _check_kill(self, stage: int) -> None:
        if self.mode == "data":
            raise ParallelError("only a pipeline stage is killed: use mode pipeline or model")
        if not 0 <= stage < self.nodes:
            raise ParallelError(f"the stage to kill must be 0 … {self.nodes - 1}, not {stage}")
        if not 0 < self.stage_kill_step < self.steps:
            raise ParallelError(f"the kill step must lie inside the {self.steps} steps")
        if self.spares < 0 or self.checkpoint_every < 1:
            raise ParallelError("need 0 or more spares and checkpoint_every of at least 1")

    @property
    def stage_kill_step(self) -> int:
        return self.kill_step if self.kill_step is not None else self.steps // 2

    @property
    def widths(self) -> tuple[int, ...]:
        if self.hidden:
            return self.hidden
        return (256, 256) if self.mode == "data" else (256,) * max(2, self.nodes)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.nodes if self.mode == "data" else self.batch_size


@dataclass
class SimReport:
    mode: str
    nodes: int
    seed: int
    steps: int
    global_batch: int
    parameters: int
    samples_per_s: float
    single_node_samples_per_s: float
    max_param_diff: float
    equivalent: bool | None
    """max_param_diff within EQUIVALENCE_TOLERANCE; None where no equality is expected
    (lossy compression, a fault)."""
    replicas_identical: bool | None
    bytes_per_step: float
    """Bytes all nodes sent per step together, headers included (median step)."""
    bytes_per_node_per_step: float
    theoretical_bytes_per_node: float | None
    """Data: the all-reduce minimum 2·(n−1)/n of the gradient per peer; None otherwise."""
    step_ms_p50: float
    compression: str
    fault: str | None = None
    time_lost_s: float | None = None
    """With a fault: what the failed step and the next (where a death is found out) took
    beyond the median step. With a killed stage: the whole run's time beyond (steps − 1)
    median steps: finding the death, the fail-over and the steps redone."""
    kill_stage: int | None = None
    failover_step: int | None = None
    """The step the pipeline failed at."""
    checkpoint_step: int | None = None
    """The checkpoint it resumed from: it redid the steps from there."""
    recovery_s: float | None = None
    """From the failure reaching the coordinator to every stage resumed."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def teacher_task(
    samples: int, features: int, classes: int, seed: int
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, features)).astype(np.float32)
    teacher = rng.normal(size=(features, classes)).astype(np.float32)
    return x, np.argmax(x @ teacher, axis=1).astype(np.int64)


async def run_parallel_sim(config: SimConfig, work_dir: Path | None = None) -> SimReport:
    """Start the nodes, train, stop them; then train the single-node reference."""
    from hivenode.parallel.data_parallel import global_batches, train_reference
    from hivenode.parallel.torch_state import ModelRecipe, SgdConfig

    recipe = ModelRecipe(
        "mlp", {"hidden": list(config.widths)}, (config.features,), config.classes, config.seed
    )
    sgd = SgdConfig(lr=config.lr, momentum=config.momentum)
    x, y = teacher_task(config.samples, config.features, config.classes, config.seed)
    with tempfile.TemporaryDirectory(prefix="hivenode-parallel-", dir=work_dir) as tmp:
        async with local_nodes(Path(tmp)) as swarm:
            members = [await swarm.start() for _ in range(config.nodes)]
            if config.mode == "data":
                report = await _run_data(config, swarm, members, recipe, sgd, x, y)
            elif config.kill_stage is not None:
                report = await _run_failover(config, swarm, members, recipe, sgd, x, y)
            else:
                report = await _run_pipeline(config, members, recipe, sgd, x, y)
    reference, seconds = await trio.to_thread.run_sync(
        train_reference, recipe, sgd, global_batches(x, y, config.global_batch), config.steps
    )
    # like the nodes' figure, from the end of the first step on
    report.single_node_samples_per_s = (config.steps - 1) * config.global_batch / sum(seconds[1:])
    states = report.extra.pop("states")
    report.max_param_diff = _max_diff(states, dict(reference.state_dict()))
    exact = config.compression is Compression.NONE and config.fault is None
    report.equivalent = report.max_param_diff <= EQUIVALENCE_TOLERANCE if exact else None
    return report


async def _run_data(
    config: SimConfig,
    swarm: LocalNodes,
    members: list[LocalNode],
    recipe: Any,
    sgd: Any,
    x: np.ndarray[Any, Any],
    y: np.ndarray[Any, Any],
) -> SimReport:
    from hivenode.parallel.data_parallel import DataParallelConfig, Replica, replica_batches
    from hivenode.parallel.torch_state import max_param_diff

    job = DataParallelConfig(
        f"sim-data-{config.seed}",
        recipe,
        sgd,
        config.steps,
        AllReduceConfig(config.peer_timeout, config.compression),
    )
    group = [m.peer_id for m in members]
    victim = members[-1] if config.fault is not None else None
    victim_scope = trio.CancelScope()

    async def fail() -> None:
        if config.fault is not Fault.HANG and victim is not None:
            outer.start_soon(swarm.kill, victim)
        victim_scope.cancel()

    replicas = []
    for member in members:
        if member is victim and config.fault is not None:
            broken = faulty_averager(config.fault, config.fault_step, fail)
            replicas.append(Replica(member.node, member.router, job, group, averager_class=broken))
        else:
            replicas.append(Replica(member.node, member.router, job, group))
    step_ends: list[float] = []

    async def train(rank: int) -> None:
        batches = replica_batches(x, y, rank, config.nodes, config.batch_size)
        if members[rank] is victim:
            with victim_scope:
                await replicas[rank].train(batches)
            return
        on_step = (lambda _: step_ends.append(time.perf_counter())) if rank == 0 else None
        await replicas[rank].train(batches, on_step=on_step)

    async with trio.open_nursery() as outer:
        for rank in range(config.nodes):
            outer.start_soon(train, rank)
    survivors = [r for m, r in zip(members, replicas, strict=True) if m is not victim]
    for replica in survivors:
        await replica.aclose()
    first = survivors[0]
    states = [dict(r.model.state_dict()) for r in survivors]
    identical = all(max_param_diff(s, states[0]) == 0.0 for s in states[1:])
    gradient_bytes = first.size * 4
    steady = range(1, config.steps)
    sent = [sum(r.averager.traffic.get(s, [0, 0])[0] for r in survivors) for s in steady]
    per_node = [
        statistics.median(r.averager.traffic.get(s, [0, 0])[0] for s in steady) for r in survivors
    ]
    durations = [r.seconds for r in first.records]
    report = SimReport(
        mode="data",
        nodes=config.nodes,
        seed=config.seed,
        steps=config.steps,
        global_batch=config.global_batch,
        parameters=first.size,
        samples_per_s=_throughput(step_ends, config.global_batch),
        single_node_samples_per_s=0.0,
        max_param_diff=0.0,
        equivalent=None,
        replicas_identical=identical,
        bytes_per_step=statistics.median(sent),
        bytes_per_node_per_step=statistics.median(per_node),
        theoretical_bytes_per_node=theoretical_bytes_per_peer(gradient_bytes, config.nodes),
        step_ms_p50=statistics.median(durations) * 1000,
        compression=config.compression.value,
        fault=config.fault.value if config.fault else None,
        extra={"states": states[0]},
    )
    if config.fault is not None:
        usual = statistics.median(durations)
        window = durations[config.fault_step : config.fault_step + 2]
        report.time_lost_s = sum(d - usual for d in window)
        report.extra["replicas_after_fault"] = first.records[-1].replicas
    return report


async def _run_pipeline(
    config: SimConfig,
    members: list[LocalNode],
    recipe: Any,
    sgd: Any,
    x: np.ndarray[Any, Any],
    y: np.ndarray[Any, Any],
) -> SimReport:
    from hivenode.parallel.data_parallel import global_batches
    from hivenode.parallel.pipeline import PipelineConfig, Stage, stage_cuts

    micro = config.micro_batches if config.mode == "pipeline" else 1
    if micro > config.batch_size:
        raise ParallelError(f"{micro} micro-batches need a batch of at least {micro}")
    job = PipelineConfig(
        f"sim-{config.mode}-{config.seed}", recipe, sgd, config.steps, micro, config.peer_timeout
    )
    cuts = stage_cuts(recipe, config.nodes)
    peers = [m.peer_id for m in members]
    stages = [Stage(m.node, m.router, job, peers, i, cuts) for i, m in enumerate(members)]
    step_ends: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: stages[0].train(
                global_batches(x, y, config.batch_size),
                on_step=lambda _: step_ends.append(time.perf_counter()),
            )
        )
        for stage in stages[1:]:
            nursery.start_soon(stage.train)
    for stage in stages:
        await stage.aclose()
    sent = [sum(s.records[i].bytes_sent for s in stages) for i in range(1, config.steps)]
    return _pipeline_report(
        config, recipe, stages, sent, _throughput(step_ends, config.global_batch), cuts, micro
    )


def _pipeline_report(
    config: SimConfig,
    recipe: Any,
    stages: Sequence[Any],
    sent: Sequence[int],
    samples_per_s: float,
    cuts: Sequence[int],
    micro: int,
    **fields: Any,
) -> SimReport:
    """A pipeline run's report; `fields` add the fault's figures, `fields["extra"]` its details."""
    from hivenode.parallel.torch_state import parameter_count  # torch: imported lazily

    combined: dict[str, Any] = {}
    for stage in stages:
        combined.update(stage.state())
    extra = {"states": combined, "cuts": cuts, "micro_batches": micro, **fields.pop("extra", {})}
    return SimReport(
        mode=config.mode,
        nodes=config.nodes,
        seed=config.seed,
        steps=config.steps,
        global_batch=config.global_batch,
        parameters=parameter_count(recipe.build()),
        samples_per_s=samples_per_s,
        single_node_samples_per_s=0.0,
        max_param_diff=0.0,
        equivalent=None,
        replicas_identical=None,
        bytes_per_step=statistics.median(sent),
        bytes_per_node_per_step=statistics.median(sent) / config.nodes,
        theoretical_bytes_per_node=None,
        step_ms_p50=statistics.median(r.seconds for r in stages[0].records) * 1000,
        compression="none",
        extra=extra,
        **fields,
    )


async def _run_failover(
    config: SimConfig,
    swarm: LocalNodes,
    members: list[LocalNode],
    recipe: Any,
    sgd: Any,
    x: np.ndarray[Any, Any],
    y: np.ndarray[Any, Any],
) -> SimReport:
    """The pipeline with a coordinator on a node of its own (the node a job is submitted
    to) and `spares` spare nodes; the node of stage `kill_stage` dies at `kill_step`."""
    from hivenode.parallel.data_parallel import global_batches
    from hivenode.parallel.pipeline import PipelineConfig, Stage, StageStep, stage_cuts
    from hivenode.parallel.pipeline_failover import FailoverStage, PipelineCoordinator

    assert config.kill_stage is not None
    kill = StageKill(config.kill_stage, config.stage_kill_step)
    micro = config.micro_batches if config.mode == "pipeline" else 1
    job = PipelineConfig(
        f"sim-{config.mode}-failover-{config.seed}",
        recipe,
        sgd,
        config.steps,
        micro,
        config.peer_timeout,
        config.checkpoint_every,
    )
    cuts = stage_cuts(recipe, config.nodes)
    spare_nodes = [await swarm.start() for _ in range(config.spares)]
    boss = await swarm.start("coordinator")
    peers = [m.peer_id for m in members]
    batches = global_batches(x, y, config.batch_size)
    coordinator = PipelineCoordinator(
        boss.node, boss.router, job, peers, cuts, [n.peer_id for n in spare_nodes]
    )
    runners = [
        FailoverStage(
            m.node,
            m.router,
            job,
            boss.peer_id,
            Stage(m.node, m.router, job, peers, i, cuts),
            batches if i == 0 else None,
        )
        for i, m in enumerate(members)
    ]
    runners += [
        FailoverStage(n.node, n.router, job, boss.peer_id, batches=batches) for n in spare_nodes
    ]
    victim = members[kill.stage]
    victim_scope = trio.CancelScope()
    errors: list[ParallelError] = []
    step_ends: list[float] = []  # of whichever node holds the first stage, redone steps too

    def die() -> None:
        victim_scope.cancel()
        nursery.start_soon(swarm.kill, victim)

    async def train(runner: FailoverStage, index: int) -> None:
        dies = kill.on_step(die) if index == kill.stage else None

        def on_step(record: StageStep) -> None:
            if runner.stage is not None and runner.stage.first:
                step_ends.append(time.perf_counter())
            if dies is not None:
                dies(record)

        try:
            with victim_scope if index == kill.stage else trio.CancelScope():
                await runner.train(on_step=on_step)
        except ParallelError as exc:
            errors.append(exc)

    async def coordinate() -> None:
        try:
            await coordinator.run()
        except ParallelError as exc:
            errors.insert(0, exc)  # the coordinator says best what went wrong

    async with trio.open_nursery() as nursery:
        nursery.start_soon(coordinate)
        for index, runner in enumerate(runners):
            nursery.start_soon(train, runner, index)
    for runner in runners:
        if runner.node is not victim.node:
            await runner.aclose()
    if errors:
        raise errors[0]
    by_peer = {r.node.peer_id: r.stage for r in runners if r.stage is not None}
    stages = [by_peer[peer] for peer in coordinator.peers]
    records = [{r.step: r for r in stage.records} for stage in stages]
    common = sorted(set.intersection(*(set(r) for r in records)) - {0})
    sent = [sum(r[step].bytes_sent for r in records) for step in common]
    span = step_ends[-1] - step_ends[0]
    usual = statistics.median(b - a for a, b in itertools.pairwise(step_ends))
    failover = coordinator.failovers[0] if coordinator.failovers else None
    return _pipeline_report(
        config,
        recipe,
        stages,
        sent,
        # the steps that count, over the whole time: redone steps are lost time
        (config.steps - 1) * config.global_batch / span if span > 0 else 0.0,
        cuts,
        micro,
        fault="kill-stage",
        time_lost_s=span - (config.steps - 1) * usual,
        kill_stage=kill.stage,
        failover_step=failover.failed_step if failover else None,
        checkpoint_step=failover.checkpoint_step if failover else None,
        recovery_s=failover.recovery_s if failover else None,
        extra={
            "kill_step": kill.step,
            "checkpoint_every": config.checkpoint_every,
            "failovers": [asdict(f) for f in coordinator.failovers],
        },
    )


def _throughput(step_ends: list[float], batch: int) -> float:
    """Samples per second from the end of the first step (connections opened, first
    imports done) to the end of the last."""
    if len(step_ends) < 2 or step_ends[-1] <= step_ends[0]:
        return 0.0
    return (len(step_ends) - 1) * batch / (step_ends[-1] - step_ends[0])


def _max_diff(state: dict[str, Any], reference: dict[str, Any]) -> float:
    from hivenode.parallel.torch_state import max_param_diff

    return max_param_diff(state, reference)
