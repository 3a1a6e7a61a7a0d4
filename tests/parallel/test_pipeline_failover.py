"""A pipeline stage whose node is killed moves to a spare from the last consistent checkpoint,
and training ends exactly where it would have without the failure."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import trio
import typer
from click.testing import Result
from parallel_data import teacher_dataset
from pipeline_run import train_three_stages
from typer.testing import CliRunner

from hivenode.agent.errors import RpcError
from hivenode.agent.rpc import request
from hivenode.cli_parallel import sim_parallel
from hivenode.parallel.data_parallel import Batches, global_batches, train_reference
from hivenode.parallel.errors import ParallelError
from hivenode.parallel.faults import StageKill
from hivenode.parallel.local_nodes import LocalNode, LocalNodes, local_nodes
from hivenode.parallel.pipeline import PipelineConfig, Stage, stage_cuts
from hivenode.parallel.pipeline_failover import (
    CheckpointStore,
    Failover,
    FailoverStage,
    PipelineCoordinator,
)
from hivenode.parallel.torch_state import MOMENTUM_PREFIX, ModelRecipe, SgdConfig, max_param_diff
from hivenode.protocol.ids import PIPELINE_PROTOCOL

RECIPE = ModelRecipe("mlp", {"hidden": [32, 32]}, (16,), 4, seed=5)
SGD = SgdConfig(lr=0.1, momentum=0.9)  # momentum: a rollback must restore the buffers too
STAGES = 3
STEPS = 30
STAGE_TIMEOUT = 5.0
JOB_BOUND_S = 120.0
"""Only turns a hang into a failure; no figure depends on it."""


@dataclass
class Outcome:
    runners: list[FailoverStage]
    """Every runner, stages first, then spares (the killed one's included)."""
    coordinator: PipelineCoordinator
    failovers: list[Failover] | None = None
    errors: dict[str, ParallelError] = field(default_factory=dict)
    """What each task that failed raised, by task: 'coordinator', 'stage 0', 'spare 0', …"""


async def _run_job(
    tmp_path: Path, kill: StageKill, spares: int, max_failovers: int = 3
) -> tuple[Outcome, Batches]:
    """A 3-stage × 4-micro-batch job with a coordinator on a node of its own; the node of
    `kill.stage` is killed as it starts `kill.step`."""
    x, y = teacher_dataset()
    batches = global_batches(x, y, 64)
    config = PipelineConfig(
        f"pp-failover-{kill.stage}-{spares}",
        RECIPE,
        SGD,
        steps=STEPS,
        micro_batches=4,
        stage_timeout=STAGE_TIMEOUT,
        checkpoint_every=10,
    )
    cuts = stage_cuts(RECIPE, STAGES)
    async with local_nodes(tmp_path) as swarm:
        nodes = [await swarm.start() for _ in range(STAGES + spares + 1)]
        boss, stage_nodes, spare_nodes = nodes[-1], nodes[:STAGES], nodes[STAGES:-1]
        peers = [n.peer_id for n in stage_nodes]
        coordinator = PipelineCoordinator(
            boss.node,
            boss.router,
            config,
            peers,
            cuts,
            [n.peer_id for n in spare_nodes],
            max_failovers,
        )
        runners = [
            FailoverStage(
                n.node,
                n.router,
                config,
                boss.peer_id,
                Stage(n.node, n.router, config, peers, i, cuts),
                batches if i == 0 else None,
            )
            for i, n in enumerate(stage_nodes)
        ]
        runners += [
            FailoverStage(n.node, n.router, config, boss.peer_id, batches=batches)
            for n in spare_nodes
        ]
        outcome = Outcome(runners, coordinator)
        await _train(swarm, outcome, stage_nodes[kill.stage], kill)
        for node, runner in zip(nodes, runners, strict=False):
            if node is not stage_nodes[kill.stage]:
                await runner.aclose()
    return outcome, batches


async def _train(swarm: LocalNodes, outcome: Outcome, victim: LocalNode, kill: StageKill) -> None:
    victim_scope = trio.CancelScope()

    def die() -> None:  # as a process dies: its training stops and its sockets close
        victim_scope.cancel()
        nursery.start_soon(swarm.kill, victim)

    async def coordinate() -> None:
        try:
            outcome.failovers = await outcome.coordinator.run()
        except ParallelError as exc:
            outcome.errors["coordinator"] = exc

    async def train(name: str, runner: FailoverStage, hook: StageKill | None) -> None:
        try:
            if hook is None:
                await runner.train()
                return
            with victim_scope:
                await runner.train(on_step=hook.on_step(die))
        except ParallelError as exc:
            outcome.errors[name] = exc

    with trio.fail_after(JOB_BOUND_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(coordinate)
            for i, runner in enumerate(outcome.runners):
                is_stage = i < STAGES
                name = f"stage {i}" if is_stage else f"spare {i - STAGES}"
                nursery.start_soon(train, name, runner, kill if i == kill.stage else None)


async def _uninterrupted(tmp_path: Path, batches: Batches) -> dict[str, torch.Tensor]:
    """The same pipeline without fail-over and without a failure: the final weights."""
    config = PipelineConfig("pp-uninterrupted", RECIPE, SGD, steps=STEPS, micro_batches=4)
    _, weights = await train_three_stages(tmp_path, config, batches)  # STAGES is 3
    return weights


def _final_stages(outcome: Outcome) -> list[Stage]:
    """The stages the job ended with, in order: survivors and the spares that took over."""
    by_peer = {r.node.peer_id: r.stage for r in outcome.runners if r.stage is not None}
    stages = [by_peer[peer] for peer in outcome.coordinator.peers]
    assert [s.index for s in stages] == list(range(STAGES))
    return stages


@pytest.mark.parametrize("victim", [1, 2, 0], ids=["middle", "last", "first"])
async def test_a_killed_stage_moves_to_a_spare_and_training_equals_uninterrupted(
    tmp_path: Path, victim: int
) -> None:
    kill = StageKill(stage=victim, step=15)
    outcome, batches = await _run_job(tmp_path / "failover", kill, spares=1)
    assert outcome.errors == {}
    assert outcome.failovers is not None and len(outcome.failovers) == 1
    failover = outcome.failovers[0]
    dead, spare = outcome.runners[victim], outcome.runners[STAGES]
    assert failover.replaced == ((victim, dead.node.peer_id, spare.node.peer_id),)
    # checkpoint 10 was committed five steps before the kill, and 20 cannot be: the dead
    # stage never reached it
    assert failover.checkpoint_step == 10
    assert failover.failed_step >= kill.step - 1

    stages = _final_stages(outcome)
    assert stages[victim] is spare.stage
    for index, stage in enumerate(stages):  # redone steps replace the failed attempt's
        first = 10 if index == victim else 0
        assert [r.step for r in stage.records] == list(range(first, STEPS))
    combined: dict[str, torch.Tensor] = {}
    for stage in stages:
        combined.update(stage.state())
    reference, _ = train_reference(RECIPE, SGD, batches, STEPS)
    assert max_param_diff(combined, dict(reference.state_dict())) <= 1e-5
    # the steps redone from the checkpoint are the very computation they replace: in one
    # process (same kernels, same threads) the weights match bit for bit
    uninterrupted = await _uninterrupted(tmp_path / "plain", batches)
    assert all(torch.equal(combined[name], t) for name, t in uninterrupted.items())
    losses = [r.loss for r in stages[-1].records]
    assert losses[0] is not None and losses[-1] is not None and losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("spares", "max_failovers", "message"),
    [(0, 3, "no spare node is left"), (1, 0, "after 0 fail-overs")],
    ids=["no-spare", "no-fail-over-left"],
)
async def test_a_stage_that_cannot_be_replaced_aborts_the_job_with_a_clear_error(
    tmp_path: Path, spares: int, max_failovers: int, message: str
) -> None:
    outcome, _ = await _run_job(tmp_path, StageKill(stage=1, step=5), spares, max_failovers)
    assert message in str(outcome.errors["coordinator"])
    # the survivors are told, rather than left to wait: each raises the same reason
    for name in ("stage 0", "stage 2"):
        assert message in str(outcome.errors[name])
    assert outcome.failovers is None


def test_a_checkpoint_commits_only_when_every_stage_sent_the_same_step() -> None:
    store = CheckpointStore(stages=3)
    part = {"w": np.zeros(2, dtype=np.float32)}
    assert store.add(10, 0, part) == 0
    assert store.add(10, 1, part) == 0
    assert store.add(20, 2, part) == 0  # a later step does not complete an earlier cut
    assert store.add(10, 2, part) == 10
    assert store.part(1) is part and store.add(10, 1, {}) == 10  # a commit is not redone
    store.add(20, 0, part)
    store.drop_pending()  # a fail-over: stage 2's and 0's parts of 20 are void
    assert store.add(20, 1, part) == 10


async def test_a_stage_restores_a_snapshot_and_refuses_an_earlier_attempt(
    tmp_path: Path,
) -> None:
    config = PipelineConfig("pp-epochs", RECIPE, SGD, steps=2, micro_batches=2)
    cuts = stage_cuts(RECIPE, 2)
    async with local_nodes(tmp_path) as swarm:
        nodes = [await swarm.start() for _ in range(2)]
        peers = [n.peer_id for n in nodes]
        stages = [Stage(n.node, n.router, config, peers, i, cuts) for i, n in enumerate(nodes)]
        x, y = teacher_dataset()
        initial = stages[1].snapshot()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stages[0].train, global_batches(x, y, 8))
            nursery.start_soon(stages[1].train)
        trained = stages[1].snapshot()
        assert any(k.startswith(MOMENTUM_PREFIX) for k in trained)
        stages[1].restore(initial)  # back to before momentum existed: none is left
        assert stages[1].snapshot().keys() == initial.keys()
        assert all(np.array_equal(stages[1].snapshot()[k], v) for k, v in initial.items())
        stages[1].restore(trained)
        assert all(np.array_equal(stages[1].snapshot()[k], v) for k, v in trained.items())

        stages[1].rewind(0, epoch=1, peers=peers)
        body = {"job": "pp-epochs", "epoch": 0, "step": 0, "micro": 0, "total": 2}
        tensors = (np.zeros((1, 32), dtype=np.float32), np.zeros(1, dtype=np.int64))
        with pytest.raises(RpcError, match="stale_epoch"):
            await request(
                nodes[0].node.swarm.host,
                peers[1],
                PIPELINE_PROTOCOL,
                "activation",
                body,
                timeout=5,
                tensors=tensors,
            )
        with pytest.raises(ParallelError, match="does not keep us in place"):
            stages[1].rewind(0, epoch=2, peers=[peers[1], peers[0]])
        for stage in stages:
            await stage.aclose()


def _cli(args: list[str]) -> Result:
    app, sim = typer.Typer(), typer.Typer()
    app.add_typer(sim, name="sim")
    sim.command("parallel")(sim_parallel)  # as the lead mounts it
    return CliRunner().invoke(app, ["sim", "parallel", *args])


def test_sim_kill_stage_reports_the_fail_over_and_still_equals_one_node() -> None:
    args = ["--mode", "pipeline", "--nodes", "3", "--steps", "8", "--kill-stage", "2"]
    result = _cli([*args, "--kill-step", "5", "--checkpoint-every", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["fault"] == "kill-stage" and report["kill_stage"] == 2
    assert report["equivalent"] is True and report["max_param_diff"] <= 1e-5
    assert report["time_lost_s"] is not None and report["recovery_s"] is not None
    assert report["checkpoint_step"] % 2 == 0
    assert report["checkpoint_step"] <= report["failover_step"]
    [failover] = report["extra"]["failovers"]
    assert [index for index, _, _ in failover["replaced"]] == [2]


def test_sim_kill_stage_without_a_spare_fails_with_one_line() -> None:
    args = ["--mode", "model", "--nodes", "2", "--steps", "6", "--kill-stage", "1"]
    result = _cli([*args, "--spares", "0"])
    assert result.exit_code == 1
    assert "no spare node is left" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["--mode", "data", "--kill-stage", "0"],
        ["--mode", "pipeline", "-n", "3", "--kill-stage", "3"],
    ],
    ids=["data", "no-such-stage"],
)
def test_sim_kill_stage_refuses_what_it_cannot_kill(args: list[str]) -> None:
    assert _cli(args).exit_code == 2
