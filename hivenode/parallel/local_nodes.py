"""Real nodes on 127.0.0.1 in this process, each serving the parallel protocols: the
simulator's, the benchmark's and the tests' swarm."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from hivenode.agent.hardware import HardwareProbe
from hivenode.agent.node import Node
from hivenode.agent.settings import Settings
from hivenode.parallel.router import ParallelRouter

log = logging.getLogger(__name__)

ADDR_TTL_S = 24 * 3600
"""The nodes know each other's addresses for the whole run (a job's peers come from the
adverts of the peer table in a real swarm)."""
STOP_TIMEOUT_S = 15.0


@dataclass
class LocalNode:
    node: Node
    router: ParallelRouter

    @property
    def peer_id(self) -> str:
        return self.node.peer_id


class LocalNodes:
    """Starts nodes; each knows the addresses of those started before it and they of it."""

    def __init__(self, base_dir: Path, nursery: trio.Nursery) -> None:
        self._base_dir = base_dir
        self._nursery = nursery
        self._probe: HardwareProbe | None = None
        self.nodes: list[LocalNode] = []

    async def start(self, name: str | None = None) -> LocalNode:
        from libp2p.crypto.ed25519 import create_new_key_pair

        if self._probe is None:
            self._probe = await trio.to_thread.run_sync(HardwareProbe, self._base_dir)
        name = name or f"node{len(self.nodes)}"
        settings = Settings(
            listen_addrs=["/ip4/127.0.0.1/tcp/0"],
            bootstrap_peers=[],
            state_dir=self._base_dir / name / "state",
            runtime_dir=self._base_dir / name / "run",
            metrics_enabled=False,
            mdns=False,
        )
        node = Node(settings, create_new_key_pair(), self._probe)
        router = ParallelRouter(node)  # before run: it registers the protocols
        await self._nursery.start(node.run)
        started = LocalNode(node, router)
        for other in self.nodes:
            if other.node.running:
                _learn_addrs(started.node, other.node)
                _learn_addrs(other.node, started.node)
        self.nodes.append(started)
        return started

    async def stop(self, which: LocalNode) -> None:
        which.node.stop()
        with trio.move_on_after(STOP_TIMEOUT_S):
            await which.node.wait_stopped()

    async def kill(self, which: LocalNode) -> None:
        """Stop `which` as a dying process would: nothing served after, every socket closed.

        py-libp2p 0.8.1 closes a stopping host's connections in a `finally` of its cancelled
        service, where each await is cancelled at once: the sockets stay open and peers see
        a stopped in-process node as connected until their own timeouts (a process that
        exits has its sockets closed by the kernel). So close them once it has stopped.
        """
        network = which.node.swarm.host.get_network()
        await self.stop(which)
        with trio.CancelScope(shield=True), trio.move_on_after(STOP_TIMEOUT_S):
            for connections in list(network.connections.values()):
                for connection in list(connections):
                    try:
                        await connection.close()
                    except Exception as exc:  # already half gone: closing is best effort
                        log.debug("closing a connection of a killed node: %r", exc)


def _learn_addrs(node: Node, other: Node) -> None:
    import multiaddr
    from libp2p.peer.id import ID

    addrs = [multiaddr.Multiaddr(a.split("/p2p/")[0]) for a in other.swarm.listen_addrs()]
    node.swarm.host.get_peerstore().add_addrs(ID.from_base58(other.peer_id), addrs, ADDR_TTL_S)


@asynccontextmanager
async def local_nodes(base_dir: Path) -> AsyncIterator[LocalNodes]:
    """Every node started through the yielded `LocalNodes` stops on exit."""
    async with trio.open_nursery() as nursery:
        nodes = LocalNodes(base_dir, nursery)
        try:
            yield nodes
        finally:
            for entry in nodes.nodes:
                entry.node.stop()
            with trio.move_on_after(STOP_TIMEOUT_S):
                for entry in nodes.nodes:
                    await entry.node.wait_stopped()
