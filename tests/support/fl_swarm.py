"""A federated swarm of real in-process nodes: one aggregator and trainers with local data."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio
from flwr.app import Context, Message
from swarm_helpers import local_swarm, wait_until

from hivenode.agent.node import Node
from hivenode.agent.trainer import Trainer, builtin_trainer
from hivenode.models.datasets import DatasetCatalog
from hivenode.models.training.backend import LocalData
from hivenode.protocol.advert import Role
from hivenode.protocol.ids import BUILTIN_APP
from hivenode.sim.fl_datasets import save_partition

DATASET = "local"
AppWrapper = Callable[
    [Callable[[Message, Context], Message]], Callable[[Message, Context], Message]
]


@dataclass
class FlSwarm:
    aggregator: Node
    trainers: list[Node] = field(default_factory=list)

    @property
    def trainer_ids(self) -> list[str]:
        return [node.peer_id for node in self.trainers]


@asynccontextmanager
async def fl_swarm(
    tmp: Path,
    partitions: Sequence[LocalData],
    wrap: AppWrapper | None = None,
    setup_trainer: Callable[[Node], None] | None = None,
    aggregator_qtable: bool = False,
) -> AsyncIterator[FlSwarm]:
    """An aggregator plus one trainer per partition, registered as dataset "local";
    `setup_trainer(node)` runs on each trainer before it starts."""
    limiter = trio.CapacityLimiter(2)

    def make_trainer(state_dir: Path, peer_id: str) -> Trainer:
        trainer = builtin_trainer(state_dir, peer_id, limiter)
        if wrap is not None:
            trainer.apps = {BUILTIN_APP: wrap(trainer.apps[BUILTIN_APP])}
        return trainer

    async with local_swarm(tmp) as start:
        aggregator = await start("aggregator", roles=[Role.AGGREGATOR], qtable=aggregator_qtable)
        swarm = FlSwarm(aggregator)
        for index, data in enumerate(partitions):
            state_dir = tmp / f"trainer{index}" / "state"
            state_dir.mkdir(parents=True)
            save_partition(data, state_dir / "data.npz")
            DatasetCatalog(state_dir).add(DATASET, f"npz:{state_dir / 'data.npz'}")
            node = await start(
                f"trainer{index}",
                bootstrap=[aggregator],
                make_trainer=make_trainer,
                setup=setup_trainer,
                roles=[Role.TRAINER],
            )
            swarm.trainers.append(node)
        await wait_until(
            lambda: all(peer in aggregator.peer_table for peer in swarm.trainer_ids),
            20,
            "the aggregator knows every trainer",
        )
        yield swarm
