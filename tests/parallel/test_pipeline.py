"""Pipeline- and model-parallel training over real nodes equals single-node training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trio
from parallel_data import teacher_dataset
from pipeline_run import train_three_stages

from hivenode.agent.errors import RpcError
from hivenode.agent.rpc import request
from hivenode.parallel.data_parallel import global_batches, train_reference
from hivenode.parallel.errors import ParallelError
from hivenode.parallel.local_nodes import local_nodes
from hivenode.parallel.pipeline import PipelineConfig, Stage, balanced_cuts, leaf_layers, stage_cuts
from hivenode.parallel.torch_state import ModelRecipe, SgdConfig, max_param_diff
from hivenode.protocol.ids import PIPELINE_PROTOCOL

RECIPE = ModelRecipe("mlp", {"hidden": [32, 32]}, (16,), 4, seed=5)
SGD = SgdConfig(lr=0.1, momentum=0.9)


@pytest.mark.parametrize(("micro_batches", "steps"), [(4, 50), (1, 20)], ids=["pipeline", "model"])
async def test_three_stages_equal_single_node_training(
    tmp_path: Path, micro_batches: int, steps: int
) -> None:
    x, y = teacher_dataset()
    batches = global_batches(x, y, 64)
    config = PipelineConfig("pp", RECIPE, SGD, steps=steps, micro_batches=micro_batches)
    stages, combined = await train_three_stages(tmp_path, config, batches)
    reference, _ = train_reference(RECIPE, SGD, batches, steps)
    assert max_param_diff(combined, dict(reference.state_dict())) <= 1e-5
    losses = [r.loss for r in stages[-1].records]
    assert losses[-1] is not None and losses[0] is not None and losses[-1] < losses[0]


def test_cuts_minimise_the_slowest_stage() -> None:
    assert balanced_cuts([1, 1, 1, 1, 1, 1], 3) == [0, 2, 4, 6]
    assert balanced_cuts([10, 1, 1, 1, 1, 1], 2) == [0, 1, 6]
    assert balanced_cuts([1, 2, 3], 3) == [0, 1, 2, 3]
    with pytest.raises(ParallelError):
        balanced_cuts([1, 2], 3)
    names = [name for name, _ in leaf_layers(RECIPE.build())]
    assert names[0] == "features.0" and names[-1] == "head"


async def test_bad_activations_are_refused_and_silence_fails_the_step(tmp_path: Path) -> None:
    config = PipelineConfig("pp-dead", RECIPE, SGD, steps=1, stage_timeout=0.5)
    cuts = stage_cuts(RECIPE, 2)
    async with local_nodes(tmp_path) as swarm:
        nodes = [await swarm.start() for _ in range(3)]
        peers = [n.peer_id for n in nodes[:2]]
        second = Stage(nodes[1].node, nodes[1].router, config, peers, 1, cuts)
        rows = np.zeros((2, 32), dtype=np.float32)  # refused before its width matters

        async def send(sender: int, labels: list[int]) -> None:
            body = {"job": "pp-dead", "step": 0, "micro": 0, "total": 2}
            tensors = (rows, np.array(labels, dtype=np.int64))
            host = nodes[sender].node.swarm.host
            await request(host, peers[1], PIPELINE_PROTOCOL, "activation", body, timeout=5,
                          tensors=tensors)  # fmt: skip

        with pytest.raises(RpcError, match="bad_request"):
            await send(0, [0, 7])  # 4 classes
        with pytest.raises(RpcError, match="not_neighbour"):
            await send(2, [0, 1])
        with trio.fail_after(5), pytest.raises(ParallelError, match="no activation"):
            await second.train()
        await second.aclose()
