"""`hivenode sim swarm`: N real nodes on 127.0.0.1, timed until every peer table is full.

Nodes use the same advert settings as a real node. They join through one hub, or one hub
per `LEAVES_PER_HUB` nodes in swarms over 30 (each hub then meshes with fewer peers than the
default `gossip.degree_high`, so no hub prunes a leaf out of its mesh).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from hivenode.agent.settings import Settings

ONE_HUB_UP_TO = 30
LEAVES_PER_HUB = 50
"""Below `GossipSettings.degree_high` (64) with room for the links between hubs."""


@dataclass
class SwarmReport:
    nodes: int
    mode: str
    converged: bool
    startup_s: float
    convergence_s: float | None
    rss_mb_total: float
    rss_mb_per_node: float
    adverts_received: int
    adverts_per_s: float
    shutdown_s: float
    seed: int
    hubs: int
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def print(self, console: Any) -> None:
        from rich.table import Table

        table = Table(title=f"swarm of {self.nodes} nodes ({self.mode})", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        table.add_row("converged", "yes" if self.converged else "[red]no[/]")
        table.add_row("start-up", f"{self.startup_s:.1f} s until every node listens")
        if self.convergence_s is not None:
            table.add_row("convergence", f"{self.convergence_s:.1f} s from the first start")
        table.add_row(
            "RSS", f"{self.rss_mb_total:.0f} MB total, {self.rss_mb_per_node:.1f} MB/node"
        )
        table.add_row("adverts", f"{self.adverts_received} received, {self.adverts_per_s:.0f}/s")
        table.add_row("shutdown", f"{self.shutdown_s:.1f} s")
        console.print(table)
        for note in self.notes:
            console.print(note)


def make_report(
    *,
    nodes: int,
    mode: str,
    started: float,
    startup_s: float,
    converged_at: float | None,
    rss_mb_total: float,
    rss_mb_per_node: float,
    adverts_received: int,
    shutdown_s: float,
    seed: int,
    hubs: int,
) -> SwarmReport:
    """Rounds the figures; convergence and rates count from `started` (the first node)."""
    elapsed = (converged_at if converged_at is not None else time.monotonic()) - started
    return SwarmReport(
        nodes=nodes,
        mode=mode,
        converged=converged_at is not None,
        startup_s=round(startup_s, 3),
        convergence_s=None if converged_at is None else round(converged_at - started, 3),
        rss_mb_total=round(rss_mb_total, 1),
        rss_mb_per_node=round(rss_mb_per_node, 2),
        adverts_received=adverts_received,
        adverts_per_s=round(adverts_received / elapsed, 1) if elapsed > 0 else 0.0,
        shutdown_s=round(shutdown_s, 3),
        seed=seed,
        hubs=hubs,
    )


def quiet_libp2p() -> None:
    """The report is the simulator's output. py-libp2p logs its own shutdown races (tasks
    spawned into closing nurseries) at ERROR with tracebacks, which would bury it."""
    import logging

    from hivenode.agent.systemd import route_library_logger

    route_library_logger("libp2p", logging.CRITICAL)
    logging.getLogger("hivenode").setLevel(logging.ERROR)


def hub_count(nodes: int) -> int:
    return 1 if nodes <= ONE_HUB_UP_TO else max(2, -(-nodes // LEAVES_PER_HUB))


def sim_settings(base_dir: Path, index: int, bootstrap: list[str]) -> Settings:
    """A node's settings in the simulator: real defaults, loopback, its own dirs."""
    return Settings(
        listen_addrs=["/ip4/127.0.0.1/tcp/0"],
        bootstrap_peers=bootstrap,
        state_dir=base_dir / f"node{index}" / "state",
        runtime_dir=base_dir / f"node{index}" / "run",
        metrics_enabled=False,
        log_level="WARNING",
    )


def run_swarm(
    nodes: int, processes: bool, seed: int, timeout: float, progress: bool = True
) -> SwarmReport:
    random.seed(seed)
    quiet_libp2p()
    if processes:
        from hivenode.sim.swarm_processes import run_process_swarm

        return run_process_swarm(nodes, seed, timeout, progress)
    import trio

    from hivenode.sim.swarm_inprocess import run_inprocess_swarm

    report: SwarmReport = trio.run(run_inprocess_swarm, nodes, seed, timeout, progress)
    return report


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            continue
    return total / 1e6


def own_rss_mb() -> float:
    return rss_mb([os.getpid()])


def progress_bar(enabled: bool) -> Any:
    """A rich progress bar on stderr, or a do-nothing stand-in for --json."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=True,
    )
