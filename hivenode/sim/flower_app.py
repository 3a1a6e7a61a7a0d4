"""`hivenode sim flower-app`: an unmodified Flower app on a swarm of real in-process nodes.

One node runs the app's ServerApp; every other node is a trainer that serves the app's
ClientApp exactly as a daemon does: through `allowed_client_apps`, with the app's own
directory and content hash as its operator's allow-list entry. Partition ids follow the
trainers' order, as Flower's simulation numbers its SuperNodes 0..N-1.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio

from hivenode.agent.flower_apps import allowed_client_apps
from hivenode.agent.hardware import HardwareProbe
from hivenode.agent.identity import peer_id_of
from hivenode.agent.node import Node
from hivenode.agent.trainer import ClientAppLike, Trainer
from hivenode.aggregator.flower_app_runner import FlowerAppResult, run_flower_app
from hivenode.models.flower_app import (
    FlowerApp,
    FlowerAppError,
    content_hash,
    load_client_app,
    parse_run_config,
    read_flower_app,
)
from hivenode.protocol.advert import Role
from hivenode.sim.swarm import quiet_libp2p, sim_settings

JOIN_WAIT_S = 60.0


async def run_flower_app_sim(
    app_dir: Path,
    nodes: int,
    run_config: str = "",
    seed: int = 0,
    *,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Run the app in `app_dir` on one aggregator and `nodes` trainers; its result as JSON.

    `run_config` holds overrides as `flwr run --run-config` takes them. The result has the
    app, its key and run config, and per round the metrics of the replies aggregated as
    Flower's FedAvg does by default, plus the Grid's traffic (see `run_flower_app`).
    """
    if nodes < 1:
        raise FlowerAppError("a Flower app needs at least one trainer node")
    quiet_libp2p()
    logging.getLogger("flwr").setLevel(logging.WARNING)  # a line per round per node otherwise
    app = await trio.to_thread.run_sync(read_flower_app, app_dir)
    config = parse_run_config(run_config, app.config_defaults)
    digest = await trio.to_thread.run_sync(content_hash, app.root)
    trainer_apps = await trio.to_thread.run_sync(_trainer_apps, app, digest)
    with tempfile.TemporaryDirectory(prefix="hivenode-flower-", dir=work_dir) as tmp:
        base = Path(tmp)
        job = re.sub(r"[^A-Za-z0-9._-]", "-", f"sim-{app.name}-{seed}")[:64]
        result: FlowerAppResult | None = None
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            swarm = await _start_swarm(nursery, base, nodes, trainer_apps)
            try:
                result = await run_flower_app(
                    swarm[0],
                    app,
                    job,
                    [node.peer_id for node in swarm[1:]],
                    config,
                    base / "jobs" / job,
                    digest=digest,
                    seed=seed,
                    trainer_wait_s=JOIN_WAIT_S,
                )
            except Exception as exc:  # raised here, it would leave wrapped in an ExceptionGroup
                failure = exc
            for node in swarm:
                node.stop()
    if failure is not None:
        raise failure
    assert result is not None
    return {"name": app.name, "version": app.version, "nodes": nodes, **result.as_json()}


def _trainer_apps(app: FlowerApp, digest: str) -> dict[str, ClientAppLike]:
    """The trainers' apps, loaded as a daemon loads its operator's allow-list."""
    load_client_app(app, digest)  # raises why it cannot load; the daemon's path only logs it
    apps = allowed_client_apps([(app.root, digest)])
    # in-process trainers run one per core: torch's own intra-op threads would fight them
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    return apps


async def _start_swarm(
    nursery: trio.Nursery, base: Path, nodes: int, apps: dict[str, ClientAppLike]
) -> list[Node]:
    """An aggregator, then `nodes` trainers bootstrapped from it; the aggregator first."""
    from libp2p.crypto.ed25519 import create_new_key_pair

    probe = HardwareProbe(base)
    limiter = trio.CapacityLimiter(max(1, os.cpu_count() or 1))
    settings = sim_settings(base, 0, []).model_copy(update={"roles": [Role.AGGREGATOR]})
    aggregator = Node(settings, create_new_key_pair(), probe)
    await nursery.start(aggregator.run)
    swarm = [aggregator]
    hub = [aggregator.swarm.listen_addrs()[0]]
    for index in range(1, nodes + 1):
        settings = sim_settings(base, index, hub).model_copy(update={"roles": [Role.TRAINER]})
        assert settings.state_dir is not None
        key_pair = create_new_key_pair()
        trainer = Trainer(settings.state_dir, peer_id_of(key_pair), apps, limiter=limiter)
        node = Node(settings, key_pair, probe, trainer=trainer)
        await nursery.start(node.run)
        swarm.append(node)
    return swarm
