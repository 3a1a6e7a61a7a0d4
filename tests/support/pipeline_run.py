"""A pipeline trained over three real nodes on 127.0.0.1, for the pipeline tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import trio

from hivenode.parallel.data_parallel import Batches
from hivenode.parallel.local_nodes import local_nodes
from hivenode.parallel.pipeline import PipelineConfig, Stage, stage_cuts


async def train_three_stages(
    tmp_path: Path, config: PipelineConfig, batches: Batches
) -> tuple[list[Stage], dict[str, torch.Tensor]]:
    """The stages after `config.steps` steps, and the whole model's weights they hold."""
    cuts = stage_cuts(config.recipe, 3)
    async with local_nodes(tmp_path) as swarm:
        nodes = [await swarm.start() for _ in range(3)]
        peers = [n.peer_id for n in nodes]
        stages = [Stage(n.node, n.router, config, peers, i, cuts) for i, n in enumerate(nodes)]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stages[0].train, batches)
            for stage in stages[1:]:
                nursery.start_soon(stage.train)
        for stage in stages:
            await stage.aclose()
    combined: dict[str, Any] = {}
    for stage in stages:
        combined.update(stage.state())
    return stages, combined
