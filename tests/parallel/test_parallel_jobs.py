"""Data- and pipeline-parallel jobs run by the job runner over real in-process nodes."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from fl_swarm import DATASET, fl_swarm
from safetensors.numpy import load_file

from hivenode.agent.node import Node
from hivenode.aggregator.job_spec import JobSpec
from hivenode.aggregator.parallel_runner import run_parallel_job
from hivenode.aggregator.runner import JobError, initial_arrays
from hivenode.models.datasets import DatasetCatalog
from hivenode.parallel.errors import ParallelError
from hivenode.parallel.job_worker import ParallelJobWorker
from hivenode.parallel.router import ParallelRouter
from hivenode.sim.fl_datasets import federated_dataset


def job(mode: str, rounds: int = 40, **parallel: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": f"{mode}-parallel",
            "dataset": DATASET,
            "rounds": rounds,
            "model": {"framework": "torch", "name": "mlp", "options": {"hidden": [64, 64]}},
            "train": {"lr": 0.2, "batch_size": 32},
            "parallel": {"mode": mode, "momentum": 0.5, **parallel},
        }
    )


@pytest.fixture(scope="module")
def digits() -> list[Any]:
    return federated_dataset("digits", 4, partition="iid", seed=0)


class Members:
    """Gives every trainer a parallel-job worker before it starts; runs them in a nursery."""

    def __init__(self) -> None:
        self.workers: list[ParallelJobWorker] = []

    def setup(self, node: Node) -> None:
        catalog = DatasetCatalog(node.settings.state_dir or Path())
        self.workers.append(ParallelJobWorker(node, ParallelRouter(node), catalog))

    async def start(self, nursery: trio.Nursery) -> None:
        for worker in self.workers:
            await nursery.start(worker.run)


@pytest.mark.parametrize("mode", ["data", "pipeline"])
async def test_a_parallel_job_trains_and_saves_the_whole_model(
    tmp_path: Path, digits: Any, mode: str
) -> None:
    members = Members()
    rounds: list[int] = []
    async with (
        fl_swarm(tmp_path, digits, setup_trainer=members.setup) as swarm,
        trio.open_nursery() as nursery,
    ):
        await members.start(nursery)
        spec = job(mode, nodes=3)  # the MLP has 3 layers with weights: at most 3 stages
        result = await run_parallel_job(
            swarm.aggregator, spec, tmp_path / "job", on_round=lambda r: rounds.append(r.round)
        )
        nursery.cancel_scope.cancel()
    assert rounds == list(range(1, 41))
    assert result.strategy == f"{mode}-parallel"
    assert len(result.trainers) == 3 and set(result.trainers) <= set(swarm.trainer_ids)
    losses = [r.train_loss for r in result.history]
    assert all(loss is not None for loss in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])  # type: ignore[arg-type]
    saved = load_file(str(result.model_path))
    info = swarm.aggregator.peer_table.get(swarm.trainer_ids[0])
    assert info is not None
    expected = initial_arrays(spec, info.advert.datasets[0])
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in expected.items()}
    assert any(not np.array_equal(saved[k], expected[k]) for k in saved)  # it trained
    if mode == "data":
        final = result.history[-1]
        assert final.participants == 3 and final.eval_accuracy is not None
        assert final.eval_accuracy > 0.6


async def test_too_few_members_is_a_clear_error(tmp_path: Path, digits: Any) -> None:
    members = Members()
    async with (
        fl_swarm(tmp_path, digits[:1], setup_trainer=members.setup) as swarm,
        trio.open_nursery() as nursery,
    ):
        await members.start(nursery)
        with pytest.raises(JobError, match="data parallelism over 2 nodes"):
            await run_parallel_job(swarm.aggregator, job("data"), tmp_path / "job")
        nursery.cancel_scope.cancel()


def test_every_stage_gets_weights() -> None:
    from hivenode.parallel.job_worker import weighted_stage_cuts
    from hivenode.parallel.pipeline import leaf_layers
    from hivenode.parallel.torch_state import ModelRecipe

    recipe = ModelRecipe("mlp", {"hidden": [32, 32]}, (64,), 10, 0)
    layers = leaf_layers(recipe.build())
    for stages in (1, 2, 3):
        cuts = weighted_stage_cuts(recipe, stages)
        assert cuts[0] == 0 and cuts[-1] == len(layers) and len(cuts) == stages + 1
        for start, end in itertools.pairwise(cuts):
            assert any(any(True for _ in m.parameters()) for _, m in layers[start:end])
    with pytest.raises(ParallelError, match="3 layers with weights"):
        weighted_stage_cuts(recipe, 4)


async def test_auto_runs_the_job_as_the_q_table_chooses(tmp_path: Path, digits: Any) -> None:
    from hivenode.aggregator.planned_jobs import resolve_auto
    from hivenode.planner.state import Action

    spec = job("auto")
    async with fl_swarm(tmp_path, digits, aggregator_qtable=True) as swarm:
        gossip = swarm.aggregator.qtable
        assert gossip is not None
        gossip.table.epsilon = 0.0  # greedy: the table's values decide
        first, plan = await resolve_auto(swarm.aggregator, spec, trainer_wait_s=5.0)
        # teach it that data parallel pays off for this state, and single node (which an
        # untried state tries first) less
        gossip.record(plan.reading.state, Action.SINGLE_NODE, 0.0)
        for _ in range(5):
            gossip.record(plan.reading.state, Action.DATA_PARALLEL, 1.0)
        taught, again = await resolve_auto(swarm.aggregator, spec, trainer_wait_s=5.0)
        private = spec.model_copy(update={"plan": {"private": True}})
        kept_home, guarded = await resolve_auto(swarm.aggregator, private, trainer_wait_s=5.0)
    assert (first.parallel is None) == (plan.chosen in (Action.FEDERATED, Action.SINGLE_NODE))
    assert again.chosen is Action.DATA_PARALLEL
    assert taught.parallel is not None and taught.parallel.mode == "data"
    assert guarded.chosen in (Action.FEDERATED, Action.SINGLE_NODE)
    assert kept_home.parallel is None  # it runs federated (or on its one biggest holder)
    assert Action.DATA_PARALLEL in guarded.masked


async def test_a_pipeline_job_moves_a_dead_stage_to_its_spare(
    tmp_path: Path, digits: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # other tests (a CLI's basicConfig) may have raised the root level: the runner's warning
    # about the move is what this test reads
    caplog.set_level(logging.WARNING, logger="hivenode.aggregator.parallel_runner")
    members = Members()
    rounds: list[int] = []
    # long enough that the kill, at the first progress the coordinator hears, lands mid-job
    spec = job("pipeline", rounds=150, nodes=2, spares=1, peer_timeout_s=5.0)
    async with (
        fl_swarm(tmp_path, digits, setup_trainer=members.setup) as swarm,
        trio.open_nursery() as nursery,
    ):
        await members.start(nursery)
        by_id = {node.peer_id: node for node in swarm.trainers}
        stage_1 = by_id[sorted(by_id)[1]]  # members are the fitting trainers in peer-id order
        killed: list[int] = []

        def on_round(record: Any) -> None:
            rounds.append(record.round)
            if record.round >= 5 and not killed:
                killed.append(record.round)
                nursery.start_soon(kill, stage_1)

        async def kill(node: Node) -> None:  # as SIGKILL would: nothing served, sockets closed
            network = node.swarm.host.get_network()
            node.stop()
            await node.wait_stopped()
            with trio.move_on_after(5):
                for connections in list(network.connections.values()):
                    for connection in list(connections):
                        await connection.close()

        result = await run_parallel_job(
            swarm.aggregator, spec, tmp_path / "job", on_round=on_round, trainer_wait_s=10.0
        )
        nursery.cancel_scope.cancel()
    assert killed and killed[0] < 100 and rounds == list(range(1, 151))
    moved = [r.getMessage() for r in caplog.records if "moved to a spare" in r.getMessage()]
    assert len(moved) == 1 and stage_1.peer_id in moved[0]  # stage 1's node, replaced once
    assert [r.round for r in result.history] == list(range(1, 151))
    losses = [r.train_loss for r in result.history]
    assert all(loss is not None for loss in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])  # type: ignore[arg-type]
    saved = load_file(str(result.model_path))
    info = swarm.aggregator.peer_table.get(swarm.trainer_ids[0])
    assert info is not None
    assert set(saved) == set(initial_arrays(spec, info.advert.datasets[0]))
