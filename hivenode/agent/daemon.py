"""`hivenode run`: the node, its control API, metrics, signals and systemd notifications."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import trio

from hivenode.agent import paths
from hivenode.agent.control import ApiError, ControlApi, Request
from hivenode.agent.errors import RpcError
from hivenode.agent.hardware import HardwareProbe
from hivenode.agent.identity import load_or_create_identity, peer_id_of
from hivenode.agent.metrics import Metrics
from hivenode.agent.node import Node
from hivenode.agent.node_views import peers_view, status_view
from hivenode.agent.qtable_gossip import QTableGossip
from hivenode.agent.settings import Settings
from hivenode.agent.systemd import SystemdNotifier
from hivenode.fsutil import sweep_stale_temp_files
from hivenode.planner.qtable import QTABLE_FILE
from hivenode.planner.state import PlannerError
from hivenode.protocol.advert import Role

log = logging.getLogger(__name__)

STATUS_PERIOD = 10.0


def build_control_api(node: Node, state_dir: Path) -> ControlApi:
    """The daemon's endpoints; the model routes come from `model_fetch`."""
    from hivenode.agent.model_fetch import fetch_model

    api = ControlApi()

    async def status(request: Request, params: dict[str, str]) -> Any:
        return status_view(node)

    async def peers(request: Request, params: dict[str, str]) -> Any:
        return peers_view(node)

    async def hardware(request: Request, params: dict[str, str]) -> Any:
        return node.hardware.model_dump(mode="json") if node.hardware else None

    async def remote_status(request: Request, params: dict[str, str]) -> Any:
        peer_id = params["peer_id"]
        if peer_id == node.peer_id:
            return status_view(node)
        try:
            return dict(await node.remote_status(peer_id))
        except RpcError as exc:
            status = 504 if exc.code == "timeout" else 502
            raise ApiError(status, f"peer {peer_id}: {exc.message}") from exc

    api.route("GET", "/v1/status", status)
    api.route("GET", "/v1/peers", peers)
    api.route("GET", "/v1/hardware", hardware)
    api.route("GET", "/v1/peers/{peer_id}/status", remote_status)

    async def models_fetch(request: Request, params: dict[str, str]) -> Any:
        return await fetch_model(node, state_dir, request)

    api.route("POST", "/v1/models/fetch", models_fetch, mutating=True)

    async def qtable_import(request: Request, params: dict[str, str]) -> Any:
        return await import_qtable(node, request)

    api.route("POST", "/v1/qtable/import", qtable_import, mutating=True)
    return api


async def import_qtable(node: Node, request: Request) -> dict[str, Any]:
    """Merge a table file's bytes (base64 in `data`) into the live table: written straight to
    qtable.json, it would be overwritten by the daemon's next save."""
    if node.qtable is None:
        raise ApiError(409, "this daemon keeps no Q-table")
    try:
        encoded = json.loads(request.body or b"{}")["data"]
        data = base64.b64decode(encoded, validate=True)
        changed = node.qtable.import_data(data)  # on the loop: the table lives here; ≤ 1 MiB
    except (KeyError, TypeError) as exc:
        raise ApiError(400, 'expected JSON {"data": "<the file, base64>"}') from exc
    except (binascii.Error, PlannerError, ValueError) as exc:  # JSON and base64 errors too
        raise ApiError(400, str(exc)) from exc
    return {"imported_cells": changed, "path": str(node.qtable.state_dir / QTABLE_FILE)}


class DaemonService(Protocol):
    """A part above `agent/` that lives in the daemon (the aggregator's jobs): it adds its
    routes to the control API, then runs beside the node until the daemon stops."""

    def install(self, node: Node, api: ControlApi, state_dir: Path) -> None: ...

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None: ...


async def run_daemon(settings: Settings, services: Sequence[DaemonService] = ()) -> None:
    """Run until SIGTERM/SIGINT, then leave cleanly within `settings.shutdown_timeout`."""
    state_dir = paths.state_dir(settings.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if swept := sweep_stale_temp_files(state_dir):
        log.info("removed %d temp file(s) of writes a kill interrupted", len(swept))
    key_pair = load_or_create_identity(state_dir)
    metrics = Metrics()
    from hivenode.agent.model_fetch import blob_resolver

    trainer = None
    if Role.TRAINER in settings.roles:
        from hivenode.agent.flower_apps import allowed_client_apps
        from hivenode.agent.trainer import builtin_trainer

        allowed = [(app.path, app.sha256) for app in settings.flower_apps]
        flower_apps = await trio.to_thread.run_sync(allowed_client_apps, allowed)
        trainer = builtin_trainer(state_dir, peer_id_of(key_pair), flower_apps=flower_apps)
    node = Node(
        settings,
        key_pair,
        HardwareProbe(state_dir),
        metrics,
        blob_resolver(state_dir),
        trainer=trainer,
        qtable=QTableGossip(state_dir, peer_id_of(key_pair)),
    )
    api = build_control_api(node, state_dir)
    for service in services:
        service.install(node, api, state_dir)
    notifier = SystemdNotifier()
    socket_path = paths.control_socket(settings.runtime_dir)
    if settings.metrics_enabled:
        metrics.serve(settings.metrics_host, settings.metrics_port)

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            await nursery.start(api.serve, socket_path)
            for service in services:
                await nursery.start(service.run)
            nursery.start_soon(_systemd_loop, node, notifier)
            notifier.ready()
            log.info(
                "hivenode %s listening on %s; control socket %s",
                node.peer_id,
                ", ".join(node.swarm.listen_addrs()),
                socket_path,
            )
            async for signum in signals:
                log.info("received %s: shutting down", signal.Signals(signum).name)
                break
            notifier.stopping()
            nursery.cancel_scope.deadline = trio.current_time() + settings.shutdown_timeout
            node.stop()
            await node.wait_stopped()
            nursery.cancel_scope.cancel()


async def _systemd_loop(node: Node, notifier: SystemdNotifier) -> None:
    """Pet the watchdog and keep systemd's STATUS line current."""
    interval = notifier.watchdog_interval()
    period = min(STATUS_PERIOD, interval) if interval else STATUS_PERIOD
    while True:
        notifier.watchdog()
        notifier.status(f"{len(node.peer_table)} peers, {len(node.connected_peers())} connections")
        await trio.sleep(period)
