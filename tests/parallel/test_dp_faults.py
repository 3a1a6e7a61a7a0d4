"""Data-parallel training goes on when a peer dies or hangs, and a late peer joins in step."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import trio
from parallel_data import teacher_dataset

from hivenode.parallel.allreduce import AllReduceConfig
from hivenode.parallel.data_parallel import DataParallelConfig, Replica, replica_batches
from hivenode.parallel.faults import Fault, faulty_averager
from hivenode.parallel.local_nodes import LocalNode, local_nodes
from hivenode.parallel.torch_state import ModelRecipe, SgdConfig, max_param_diff

RECIPE = ModelRecipe("mlp", {"hidden": [32]}, (16,), 4, seed=1)
SGD = SgdConfig(lr=0.1)
FAULT_STEP = 5


def _same(a: Replica, b: Replica) -> bool:
    return max_param_diff(dict(a.model.state_dict()), dict(b.model.state_dict())) == 0.0


@pytest.mark.parametrize(
    ("fault", "peer_timeout"),
    [(Fault.KILL_MID_STEP, 5.0), (Fault.DIE_WHILE_REPLYING, 5.0), (Fault.HANG, 2.0)],
    ids=str,
)
async def test_training_goes_on_without_a_failed_peer(
    tmp_path: Path, fault: Fault, peer_timeout: float
) -> None:
    x, y = teacher_dataset()
    config = DataParallelConfig(
        f"dp-{fault.value}", RECIPE, SGD, steps=12, allreduce=AllReduceConfig(peer_timeout)
    )
    async with local_nodes(tmp_path) as swarm:
        nodes = [await swarm.start() for _ in range(4)]
        group = [n.peer_id for n in nodes]
        victim_scope = trio.CancelScope()
        victim: LocalNode = nodes[2]

        async def fail() -> None:
            if fault is not Fault.HANG:
                outer.start_soon(swarm.kill, victim)
            victim_scope.cancel()

        broken = faulty_averager(fault, FAULT_STEP, fail)
        replicas = [
            Replica(n.node, n.router, config, group, averager_class=broken)
            if n is victim
            else Replica(n.node, n.router, config, group)
            for n in nodes
        ]

        async def run_victim() -> None:
            with victim_scope:
                await replicas[2].train(replica_batches(x, y, 2, 4, 32))

        async with trio.open_nursery() as outer:
            for rank, replica in enumerate(replicas):
                if rank == 2:
                    outer.start_soon(run_victim)
                else:
                    outer.start_soon(replica.train, replica_batches(x, y, rank, 4, 32))
        survivors = [r for i, r in enumerate(replicas) if i != 2]
        for replica in survivors:
            await replica.aclose()
    for replica in survivors:
        assert [r.step for r in replica.records] == list(range(12))
        assert _same(replica, survivors[0])
    records = survivors[0].records
    # a peer that dies replying has contributed everywhere: it is counted once more
    last_counted = FAULT_STEP + (fault is Fault.DIE_WHILE_REPLYING)
    assert [r.replicas for r in records] == [4] * last_counted + [3] * (12 - last_counted)
    usual = statistics.median(r.seconds for r in records)
    lost = sum(r.seconds - usual for r in records[FAULT_STEP : FAULT_STEP + 2])
    if fault is Fault.HANG:  # left out after the peer timeout, not later
        assert peer_timeout * 0.9 <= lost <= 2 * peer_timeout + 1
    else:  # its connections close: nobody waits out the timeout
        assert lost < peer_timeout / 2
    if fault is Fault.DIE_WHILE_REPLYING:  # the part one peer got was shared, not redone
        assert records[FAULT_STEP].recovered_parts == 0


async def test_a_late_replica_downloads_the_state_and_joins(tmp_path: Path) -> None:
    x, y = teacher_dataset()
    steps = 80  # the join dials a new connection: it takes a few dozen of these short steps
    config = DataParallelConfig("dp-join", RECIPE, SGD, steps=steps)
    async with local_nodes(tmp_path) as swarm:
        nodes = [await swarm.start() for _ in range(4)]
        group = [n.peer_id for n in nodes[:3]]
        replicas = [Replica(n.node, n.router, config, group) for n in nodes[:3]]
        async with trio.open_nursery() as nursery:
            for rank, replica in enumerate(replicas):
                nursery.start_soon(replica.train, replica_batches(x, y, rank, 4, 32))
            while len(replicas[0].records) < 5:
                await trio.sleep(0.01)
            late = Replica(nodes[3].node, nodes[3].router, config, ())
            first_step = await late.join(group)
            assert 5 <= first_step < steps
            await late.train(replica_batches(x, y, 3, 4, 32), start_step=first_step)
        for replica in [*replicas, late]:
            await replica.aclose()
    assert all(_same(replica, replicas[0]) for replica in [*replicas[1:], late])
    assert replicas[0].records[-1].replicas == 4
    assert replicas[0].records[first_step - 1].replicas == 3
    assert late.records[0].step == first_step
