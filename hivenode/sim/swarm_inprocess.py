"""Many nodes in one trio loop: cheap in memory (about 1 MB a node), bounded by one core."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import trio

from hivenode.agent.hardware import HardwareProbe
from hivenode.agent.node import Node
from hivenode.sim.swarm import (
    SwarmReport,
    hub_count,
    make_report,
    own_rss_mb,
    progress_bar,
    sim_settings,
)

log = logging.getLogger(__name__)

JOIN_CONCURRENCY = 8


async def run_inprocess_swarm(nodes: int, seed: int, timeout: float, progress: bool) -> SwarmReport:
    from libp2p.crypto.ed25519 import create_new_key_pair

    hubs = min(hub_count(nodes), nodes)
    rss_before = own_rss_mb()
    with tempfile.TemporaryDirectory(prefix="hivenode-sim-") as tmp:
        probe = HardwareProbe(Path(tmp))  # one probe for all: they share the machine
        swarm: list[Node] = []
        converged_at: float | None = None
        async with trio.open_nursery() as nursery:

            async def start(index: int, bootstrap: list[str]) -> Node:
                node = Node(sim_settings(Path(tmp), index, bootstrap), create_new_key_pair(), probe)
                await nursery.start(node.run)
                swarm.append(node)
                return node

            started = time.monotonic()
            hub_addrs: list[str] = []
            for index in range(hubs):
                hub = await start(index, hub_addrs[:1])
                hub_addrs.append(hub.swarm.listen_addrs()[0])
            # leaves join a few at a time: a hundred simultaneous handshakes on one loop
            # push libp2p's negotiations past their timeouts (measured: 77 s vs 20 s)
            joining = trio.CapacityLimiter(JOIN_CONCURRENCY)

            async def join(index: int) -> None:
                async with joining:
                    await start(index, [hub_addrs[index % hubs]])

            async with trio.open_nursery() as starting:
                for index in range(hubs, nodes):
                    starting.start_soon(join, index)
            startup_s = time.monotonic() - started
            want = nodes * (nodes - 1)
            with progress_bar(progress) as bar:
                task = bar.add_task("peer tables", total=want)
                with trio.move_on_after(timeout):
                    while True:
                        have = sum(len(n.peer_table) for n in swarm)
                        bar.update(task, completed=have)
                        if have == want:
                            converged_at = time.monotonic()
                            break
                        await trio.sleep(0.1)
            rss_total = own_rss_mb()
            received = int(sum(n.metrics.value("hivenode_adverts_received_total") for n in swarm))
            stop_started = time.monotonic()
            for node in swarm:
                node.stop()
            for node in swarm:
                await node.wait_stopped()
            shutdown_s = time.monotonic() - stop_started
    return make_report(
        nodes=nodes,
        mode="one trio loop",
        started=started,
        startup_s=startup_s,
        converged_at=converged_at,
        rss_mb_total=rss_total,
        rss_mb_per_node=(rss_total - rss_before) / nodes,
        adverts_received=received,
        shutdown_s=shutdown_s,
        seed=seed,
        hubs=hubs,
    )
