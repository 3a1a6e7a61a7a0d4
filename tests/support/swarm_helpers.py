"""Real in-process nodes on 127.0.0.1 for the agent tests (no mocks of libp2p)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from hivenode.agent.blob_transfer import BlobResolver
from hivenode.agent.hardware import HardwareProbe
from hivenode.agent.identity import peer_id_of
from hivenode.agent.node import Node
from hivenode.agent.qtable_gossip import QTableGossip
from hivenode.agent.settings import Settings
from hivenode.agent.trainer import Trainer


def node_settings(tmp: Path, name: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "listen_addrs": ["/ip4/127.0.0.1/tcp/0"],
        "state_dir": tmp / name / "state",
        "runtime_dir": tmp / name / "run",
        "metrics_enabled": False,
        "request_timeout": 5.0,
    }
    values.update(overrides)
    return Settings(**values)


StartNode = Callable[..., Awaitable[Node]]
MakeTrainer = Callable[[Path, str], Trainer]
"""(state dir, peer id) → the node's trainer role."""


@asynccontextmanager
async def local_swarm(tmp: Path) -> AsyncIterator[StartNode]:
    """Yields `start(name, bootstrap=[...], **settings)`; every node stops on exit."""
    from libp2p.crypto.ed25519 import create_new_key_pair

    probe = HardwareProbe(tmp)
    nodes: list[Node] = []
    async with trio.open_nursery() as nursery:

        async def start(
            name: str,
            bootstrap: list[Node] | None = None,
            blob_resolver: BlobResolver | None = None,
            make_trainer: MakeTrainer | None = None,
            qtable: bool = False,
            setup: Callable[[Node], None] | None = None,
            **overrides: Any,
        ) -> Node:
            addrs = [n.swarm.listen_addrs()[0] for n in bootstrap or []]
            settings = node_settings(tmp, name, bootstrap_peers=addrs, **overrides)
            key_pair = create_new_key_pair()
            trainer = None
            if make_trainer is not None:
                assert settings.state_dir is not None
                trainer = make_trainer(settings.state_dir, peer_id_of(key_pair))
            gossip = None
            if qtable:
                assert settings.state_dir is not None
                gossip = QTableGossip(settings.state_dir, peer_id_of(key_pair))
            node = Node(
                settings,
                key_pair,
                probe,
                blob_resolver=blob_resolver,
                trainer=trainer,
                qtable=gossip,
            )
            if setup is not None:  # what must be registered before the node runs
                setup(node)
            await nursery.start(node.run)
            nodes.append(node)
            return node

        try:
            yield start
        finally:
            for node in nodes:
                node.stop()
            with trio.fail_after(15):
                for node in nodes:
                    await node.wait_stopped()


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"not within {timeout} s: {what}")
