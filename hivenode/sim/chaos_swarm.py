"""The chaos scenarios' swarm: real in-process nodes that can be stopped mid-round, restarted
with their key and state directory, slowed down or turned hostile, and a ledger of the
updates they delivered.

A stopped in-process `Node` cannot run again (its host and events are spent): a restart is
a new `Node` with the same key pair and settings, so the same peer id, state directory,
dataset catalog and trainer state, on a new port. It bootstraps again and re-advertises
with a higher sequence number, which is how the aggregator's Grid learns it is back.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import trio
from flwr.app import MessageType

from hivenode.agent.hardware import HardwareProbe
from hivenode.agent.identity import peer_id_of
from hivenode.agent.node import Node
from hivenode.agent.rpc import Reply
from hivenode.agent.settings import Settings
from hivenode.agent.trainer import Trainer, builtin_trainer
from hivenode.aggregator.runner import RoundRecord
from hivenode.models.datasets import DatasetCatalog
from hivenode.models.training.backend import LocalData
from hivenode.protocol.advert import Role
from hivenode.protocol.message import Message as WireMessage
from hivenode.sim.fl import SIM_DATASET
from hivenode.sim.fl_datasets import save_partition
from hivenode.sim.swarm import sim_settings

log = logging.getLogger(__name__)

STOP_WAIT_S = 15.0
"""How long stopping a node may take before the scenario gives up on it."""
KILL_CLOSE_S = 2.0
"""How long closing a killed node's connections may take."""

LinkFault = Callable[[int, int], float | None]
"""(trainer index, round) → seconds the train message is held up on the way, or None: lost."""
TrainHook = Callable[[int, int, str], Awaitable[None]]
"""Called with (trainer index, round, aggregator peer id) when a train message arrives."""


@dataclass
class Ledger:
    """Train replies the trainers delivered against the replies each completed round took
    in: what the scenarios report as `lost_updates`."""

    delivered: Counter[tuple[str, int]] = field(default_factory=Counter)
    """(aggregator, round) → train replies the trainers handed back."""
    taken: dict[tuple[str, int], int] = field(default_factory=dict)
    """(aggregator, round) of every completed round → replies aggregated or screened out."""
    rounds_of: dict[int, list[int]] = field(default_factory=dict)
    """Trainer index → the rounds it delivered an update for."""

    def deliver(self, index: int, aggregator: str, server_round: int) -> None:
        self.delivered[aggregator, server_round] += 1
        self.rounds_of.setdefault(index, []).append(server_round)

    def round_done(self, aggregator: str, record: RoundRecord) -> None:
        # screened-out updates were received and judged, not lost (the field comes with
        # the update screen; a Grid without it rejects nothing)
        rejected = int(getattr(record, "rejected", 0))
        self.taken[aggregator, record.round] = record.participants + rejected

    def lost(self) -> int:
        """Replies delivered for completed rounds that the rounds did not take in."""
        return sum(max(0, self.delivered[key] - taken) for key, taken in self.taken.items())


@dataclass
class ChaosTrainer(Trainer):
    """A trainer whose train messages can be delayed or intercepted, and are counted."""

    index: int = 0
    delay_s: float = 0.0
    """Seconds every train message waits before the work starts (on the event loop: a slow
    node does not hold one of the machine's training threads while it waits)."""
    on_train: TrainHook | None = None
    """Called when a train message arrives, before any work."""
    on_trained: TrainHook | None = None
    """Called once the work is done, before the reply goes out."""
    ledger: Ledger | None = None
    link: LinkFault | None = None
    """What the network does to this trainer's train messages (lossy-links, partition-heal)."""

    @classmethod
    def wrapping(cls, trainer: Trainer, **hooks: Any) -> ChaosTrainer:
        values = {f.name: getattr(trainer, f.name) for f in fields(Trainer) if f.init}
        return cls(**values, **hooks)

    async def handle(self, request: WireMessage, caller: str) -> Reply:
        server_round = _train_round(request.body)
        if server_round is None:
            return await super().handle(request, caller)
        if self.on_train is not None:
            await self.on_train(self.index, server_round, caller)
        if self.delay_s > 0:
            await trio.sleep(self.delay_s)
        if self.link is not None:
            delay = self.link(self.index, server_round)
            if delay is None:  # lost on the way: no work, no reply; the handler's timeout
                await trio.sleep_forever()  # ends the stream as a dead link would
            await trio.sleep(delay or 0.0)
        reply = await super().handle(request, caller)
        if self.on_trained is not None:
            await self.on_trained(self.index, server_round, caller)
        if self.ledger is not None and "error" not in reply.body:
            self.ledger.deliver(self.index, caller, server_round)
        return reply


def _train_round(body: Any) -> int | None:
    """The job's round of a train request (the Grid sends it as the group id), else None."""
    message = body.get("message") if isinstance(body, dict) else None
    meta = message.get("meta") if isinstance(message, dict) else None
    if not isinstance(meta, dict) or meta.get("message_type") != MessageType.TRAIN:
        return None
    group = meta.get("group_id")
    return int(group) if isinstance(group, str) and group.isdigit() else None


MakeTrainer = Callable[[int, Path, str], Trainer]
"""(trainer index, state dir, peer id) → the trainer a (re)started node runs."""


@dataclass
class Member:
    """One trainer of the swarm across its restarts."""

    index: int
    settings: Settings
    key_pair: Any
    node: Node
    restarts: int = 0

    @property
    def peer_id(self) -> str:
        return self.node.peer_id


class ChaosSwarm:
    """Aggregators and trainers on 127.0.0.1 that a scenario stops and restarts."""

    def __init__(self, nursery: trio.Nursery, probe: HardwareProbe, make_trainer: MakeTrainer):
        self._nursery = nursery
        self._probe = probe
        self._make_trainer = make_trainer
        self.aggregators: list[Node] = []
        self.trainers: list[Member] = []

    @property
    def trainer_ids(self) -> list[str]:
        return [member.peer_id for member in self.trainers]

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run `fn(*args)` beside the nodes (a fault injected from a callback)."""
        self._nursery.start_soon(fn, *args)

    async def start_aggregator(
        self, base: Path, prepare: Callable[[ChaosSwarm, Node], None] | None = None
    ) -> Node:
        """The next aggregator; `prepare(swarm, node)` runs before it starts (handlers)."""
        from libp2p.crypto.ed25519 import create_new_key_pair

        hubs = [node.swarm.listen_addrs()[0] for node in self.aggregators]
        settings = sim_settings(base, len(self.aggregators), hubs).model_copy(
            update={"roles": [Role.AGGREGATOR]}
        )
        node = Node(settings, create_new_key_pair(), self._probe)
        if prepare is not None:
            prepare(self, node)
        await self._nursery.start(node.run)
        self.aggregators.append(node)
        return node

    async def add_trainer(self, base: Path, device: LocalData) -> Member:
        from libp2p.crypto.ed25519 import create_new_key_pair

        index = len(self.trainers)
        hubs = [node.swarm.listen_addrs()[0] for node in self.aggregators]
        settings = sim_settings(base, 100 + index, hubs).model_copy(
            update={"roles": [Role.TRAINER]}
        )
        assert settings.state_dir is not None
        await trio.to_thread.run_sync(_register_partition, device, settings.state_dir)
        key_pair = create_new_key_pair()
        member = Member(index, settings, key_pair, self._trainer_node(index, settings, key_pair))
        await self._nursery.start(member.node.run)
        self.trainers.append(member)
        return member

    def _trainer_node(self, index: int, settings: Settings, key_pair: Any) -> Node:
        assert settings.state_dir is not None
        trainer = self._make_trainer(index, settings.state_dir, peer_id_of(key_pair))
        return Node(settings, key_pair, self._probe, trainer=trainer)

    async def kill(self, node: Node) -> None:
        """Stop `node` as SIGKILL would: its connections close at once (the kernel closes a
        dead process's sockets) and nothing more is said. `Node.stop()` alone leaves them
        open in this process, and peers would wait on them until their own timeouts."""
        if node.running:
            with trio.move_on_after(KILL_CLOSE_S):
                await node.swarm.host.get_network().close()
        node.stop()
        with trio.fail_after(STOP_WAIT_S):
            await node.wait_stopped()

    async def restart(self, index: int) -> Node:
        """Trainer `index` again: a new Node with the same key and state directory."""
        member = self.trainers[index]
        if member.node.running:
            await self.kill(member.node)
        hubs = [node.swarm.listen_addrs()[0] for node in self.aggregators if node.running]
        settings = member.settings.model_copy(update={"bootstrap_peers": hubs})
        member.node = self._trainer_node(index, settings, member.key_pair)
        member.restarts += 1
        await self._nursery.start(member.node.run)
        _fresh_gossip_seqnos(member.node)
        return member.node

    def stop_all(self) -> None:
        for node in [*self.aggregators, *(member.node for member in self.trainers)]:
            node.stop()


@asynccontextmanager
async def chaos_swarm(
    base: Path,
    devices: Sequence[LocalData],
    make_trainer: MakeTrainer,
    *,
    aggregators: int = 1,
    prepare_aggregator: Callable[[ChaosSwarm, Node], None] | None = None,
) -> AsyncIterator[ChaosSwarm]:
    """`aggregators` aggregator nodes (the first is the hub, the others join it), then one
    trainer per device bootstrapping to all of them; every node stops on exit."""
    probe = HardwareProbe(base)
    async with trio.open_nursery() as nursery:
        swarm = ChaosSwarm(nursery, probe, make_trainer)
        try:
            for _ in range(aggregators):
                await swarm.start_aggregator(base, prepare_aggregator)
            for device in devices:
                await swarm.add_trainer(base, device)
            yield swarm
        finally:
            swarm.stop_all()


def honest_trainer(limiter: trio.CapacityLimiter) -> MakeTrainer:
    """The built-in trainer, sharing the machine's training threads through `limiter`."""

    def make(index: int, state_dir: Path, peer_id: str) -> Trainer:
        return builtin_trainer(state_dir, peer_id, limiter)

    return make


def training_threads() -> trio.CapacityLimiter:
    """Trainers share the machine: as many training threads as cores, not one per node."""
    return trio.CapacityLimiter(max(1, os.cpu_count() or 1))


def _fresh_gossip_seqnos(node: Node) -> None:
    """Give a restarted node's gossip sequence numbers no earlier incarnation has used.

    py-libp2p starts them at the wall clock in seconds and adds one per message; a node that
    published more messages than it lived seconds would reuse its old numbers after a quick
    restart, and peers drop those as duplicates for their seen-cache's TTL (measured: a
    trainer restarted 2 s after its start went unheard for over 20 s). Nanoseconds leave
    no overlap. Called once the node listens, before it joins and advertises.
    """
    node.swarm.pubsub.counter = time.time_ns()


def _register_partition(device: LocalData, state_dir: Path) -> None:
    path = state_dir / "partition.npz"
    state_dir.mkdir(parents=True, exist_ok=True)
    save_partition(device, path)
    DatasetCatalog(state_dir).add(SIM_DATASET, f"npz:{path}", preprocessing="none", replace=True)
