"""Data-parallel training over real nodes on 127.0.0.1 equals single-node SGD."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trio
from parallel_data import teacher_dataset

from hivenode.parallel.allreduce import AllReduceConfig
from hivenode.parallel.data_parallel import (
    DataParallelConfig,
    Replica,
    global_batches,
    replica_batches,
    train_reference,
)
from hivenode.parallel.local_nodes import local_nodes
from hivenode.parallel.torch_state import ModelRecipe, SgdConfig, max_param_diff
from hivenode.protocol.compression import Compression

RECIPE = ModelRecipe("mlp", {"hidden": [32]}, (16,), 4, seed=3)
SGD = SgdConfig(lr=0.1, momentum=0.9)
BIG = ModelRecipe("mlp", {"hidden": [256, 256]}, (16,), 4, seed=3)
"""71k parameters: headers are a small part of the traffic."""


def _state(replica: Replica) -> dict[str, torch.Tensor]:
    return dict(replica.model.state_dict())


async def test_four_replicas_of_batch_32_equal_one_node_on_batch_128(tmp_path: Path) -> None:
    x, y = teacher_dataset()
    config = DataParallelConfig("dp-eq", RECIPE, SGD, steps=50)
    async with local_nodes(tmp_path) as swarm:
        nodes = [await swarm.start() for _ in range(4)]
        group = [n.peer_id for n in nodes]
        replicas = [Replica(n.node, n.router, config, group) for n in nodes]
        async with trio.open_nursery() as nursery:
            for rank, replica in enumerate(replicas):
                nursery.start_soon(replica.train, replica_batches(x, y, rank, 4, 32))
        for replica in replicas:
            await replica.aclose()
    reference, _ = train_reference(RECIPE, SGD, global_batches(x, y, 128), 50)
    diff = max_param_diff(_state(replicas[0]), dict(reference.state_dict()))
    assert diff <= 1e-5
    for replica in replicas[1:]:
        assert max_param_diff(_state(replica), _state(replicas[0])) == 0.0
    losses = [r.loss for r in replicas[0].records]
    assert losses[-1] < losses[0]
    # every peer moves 2·(n−1)/n of the gradient, plus headers
    gradient_bytes = replicas[0].size * 4
    sent = replicas[0].records[-1].bytes_sent + replicas[0].records[-1].bytes_received
    assert 2 * 0.75 * gradient_bytes <= sent <= 2 * 0.75 * gradient_bytes * 1.2 + 4096


@pytest.mark.parametrize(
    ("compression", "tolerance", "ratio"),
    [(Compression.FP16, 1e-3, 0.5), (Compression.INT8, 2e-2, 0.26)],
)
async def test_compressed_updates_keep_replicas_identical(
    tmp_path: Path, compression: Compression, tolerance: float, ratio: float
) -> None:
    x, y = teacher_dataset()
    steps = 10
    config = DataParallelConfig(
        f"dp-{compression}", BIG, SGD, steps, AllReduceConfig(compression=compression)
    )
    async with local_nodes(tmp_path) as swarm:
        nodes = [await swarm.start() for _ in range(4)]
        group = [n.peer_id for n in nodes]
        replicas = [Replica(n.node, n.router, config, group) for n in nodes]
        async with trio.open_nursery() as nursery:
            for rank, replica in enumerate(replicas):
                nursery.start_soon(replica.train, replica_batches(x, y, rank, 4, 32))
        for replica in replicas:
            await replica.aclose()
    reference, _ = train_reference(BIG, SGD, global_batches(x, y, 128), steps)
    assert 0 < max_param_diff(_state(replicas[0]), dict(reference.state_dict())) <= tolerance
    for replica in replicas[1:]:
        assert max_param_diff(_state(replica), _state(replicas[0])) == 0.0
    payload = replicas[0].records[-1].bytes_sent - 3 * 512  # less 3 headers, generously
    assert payload <= ratio * 0.75 * replicas[0].size * 4


async def test_parts_sized_by_bandwidth_give_the_same_average(tmp_path: Path) -> None:
    x, y = teacher_dataset()
    async with local_nodes(tmp_path) as swarm:
        nodes = [await swarm.start() for _ in range(4)]
        group = [n.peer_id for n in nodes]
        bandwidths = {group[0]: 2e8, group[1]: 1e8, group[2]: 1e8, group[3]: 1e8}
        config = DataParallelConfig("dp-bw", BIG, SGD, 10, AllReduceConfig(bandwidths=bandwidths))
        replicas = [Replica(n.node, n.router, config, group) for n in nodes]
        async with trio.open_nursery() as nursery:
            for rank, replica in enumerate(replicas):
                nursery.start_soon(replica.train, replica_batches(x, y, rank, 4, 32))
        for replica in replicas:
            await replica.aclose()
    reference, _ = train_reference(BIG, SGD, global_batches(x, y, 128), 10)
    assert max_param_diff(_state(replicas[0]), dict(reference.state_dict())) <= 1e-5
    fast, slow = (replicas[i].averager.traffic[9] for i in (0, 1))
    # twice the bandwidth, twice the bytes: both take the same time (parts 0.7, 0.1, 0.1, 0.1)
    assert 1.9 < fast[0] / slow[0] < 2.1
