"""Placement in action: `deploy` puts a registry model on K workers of the swarm, which fetch
the blob by hash from this node, verify it, register it, serve it, and serve it again after
a restart; `undeploy` takes it off every worker that serves it.

Worker side: `DeployHandler` answers `/hivenode/deploy/1.0.0` and keeps
`<state_dir>/inference/deployments.json` (name → sha256). Caller side: `deploy` and
`undeploy`, which the service's control routes call.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio

from hivenode.agent import rpc
from hivenode.agent.blob_transfer import check_sha, fetch_blob
from hivenode.agent.errors import RpcError
from hivenode.agent.node import Node
from hivenode.fsutil import atomic_write
from hivenode.inference.errors import Code, InferenceError
from hivenode.inference.placement import WorkerView, plan_placement
from hivenode.inference.wire import (
    DEPLOY_METHOD,
    DEPLOY_PROTOCOL,
    UNDEPLOY_METHOD,
    matches_spec,
    name_of,
)
from hivenode.inference.worker import QUEUE_FIELD, InferenceWorker
from hivenode.models.errors import ModelError
from hivenode.models.registry import ModelVersion, Registry, check_name
from hivenode.protocol.advert import Role
from hivenode.protocol.limits import CONTROL_LIMITS
from hivenode.protocol.message import Message

log = logging.getLogger(__name__)

DEPLOYMENTS_FILE = Path("inference") / "deployments.json"


class DeployHandler:
    """A worker's side of placement: fetch, verify, register, serve, remember."""

    def __init__(self, worker: InferenceWorker) -> None:
        self.worker = worker
        self.path = worker.state_dir / DEPLOYMENTS_FILE

    def install(self) -> None:
        self.worker.node.add_handler(
            DEPLOY_PROTOCOL, self.handle, CONTROL_LIMITS, self.worker.settings.deploy_timeout
        )

    async def restore(self) -> None:
        """Serve again what was deployed here before a restart."""
        for name, sha in (await trio.to_thread.run_sync(self._read)).items():
            try:
                spec = await trio.to_thread.run_sync(self._local_spec, name, sha)
                await self.worker.serve(spec)
            except InferenceError as exc:
                log.error("not serving deployed %s again: %s", name, exc.message)

    async def handle(self, request: Message, caller: str) -> Mapping[str, Any]:
        body = request.body
        name = body.get("name")
        if not isinstance(name, str):
            raise InferenceError(Code.BAD_INPUT, "a deploy request names the model ('name')")
        try:
            check_name(name)
        except ModelError as exc:
            raise InferenceError(Code.BAD_INPUT, str(exc)) from exc
        if request.type == UNDEPLOY_METHOD:
            await self.undeploy(name)
            return {"undeployed": name}
        if request.type != DEPLOY_METHOD:
            raise InferenceError(Code.BAD_INPUT, f"unknown method {request.type!r}")
        sha, holder = body.get("sha256"), body.get("holder")
        if not isinstance(sha, str) or not isinstance(holder, str):
            raise InferenceError(Code.BAD_INPUT, "a deploy request carries 'sha256' and 'holder'")
        return await self.deploy(name, sha, holder)

    async def deploy(self, name: str, sha: str, holder: str) -> dict[str, Any]:
        """Fetch blob `sha` from `holder` unless held, register it as `name`, serve it."""
        try:
            check_sha(sha)
        except RpcError as exc:
            raise InferenceError(Code.BAD_INPUT, exc.message) from exc
        state_dir = self.worker.state_dir
        partial, have = await trio.to_thread.run_sync(_partial_and_presence, state_dir, sha)
        if not have:
            node = self.worker.node
            node.make_dialable(holder)
            try:
                await fetch_blob(
                    node.swarm.host, holder, sha, partial, timeout=node.settings.request_timeout
                )
            except RpcError as exc:
                raise InferenceError(
                    Code.UNREACHABLE, f"fetching {sha[:12]}… from {holder}: {exc.message}"
                ) from exc
        version = await trio.to_thread.run_sync(_register, state_dir, sha, partial, have, name)
        view = await self.worker.serve(version.spec)
        await trio.to_thread.run_sync(self._remember, name, sha)
        return view

    async def undeploy(self, name: str) -> None:
        await trio.to_thread.run_sync(self._forget, name)
        self.worker.unserve(name)

    def _read(self) -> dict[str, str]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error("ignoring unreadable %s: %s", self.path, exc)
            return {}
        if not isinstance(raw, dict):
            return {}
        return {str(k): str(v) for k, v in raw.items()}

    def _write(self, deployments: dict[str, str]) -> None:
        atomic_write(self.path, json.dumps(deployments, indent=2, sort_keys=True).encode())

    def _remember(self, name: str, sha: str) -> None:
        self._write({**self._read(), name: sha})

    def _forget(self, name: str) -> None:
        deployments = self._read()
        if deployments.pop(name, None) is not None:
            self._write(deployments)

    def _local_spec(self, name: str, sha: str) -> str:
        with Registry(self.worker.state_dir) as registry:
            try:
                versions = registry.versions(name)
            except ModelError as exc:
                raise InferenceError(Code.UNKNOWN_MODEL, str(exc)) from exc
        for version in reversed(versions):
            if version.sha256 == sha:
                return version.spec
        raise InferenceError(Code.UNKNOWN_MODEL, f"{name}: no version with sha256 {sha[:12]}…")


# --- the caller's side ---------------------------------------------------------------------


def worker_views(node: Node, local: InferenceWorker | None) -> list[WorkerView]:
    """Every inference worker the peer table knows, this node's own included."""
    views = []
    if local is not None and node.hardware is not None:
        views.append(
            WorkerView(
                node.peer_id, node.hardware, node.probe.load(), local.models, local.queue_length
            )
        )
    for entry in node.peer_table.entries():
        advert = entry.advert
        if Role.INFERENCE not in advert.roles:
            continue
        queue = int(getattr(advert.load, QUEUE_FIELD, 0))
        views.append(WorkerView(entry.peer_id, advert.hardware, advert.load, advert.models, queue))
    return views


async def deploy(
    node: Node, local: InferenceWorker | None, state_dir: Path, spec: str, replicas: int
) -> dict[str, Any]:
    """Place `spec` (in this node's registry) on `replicas` workers; what each one said."""
    from hivenode.inference.settings import InferenceSettings

    settings = local.settings if local else InferenceSettings()
    version = await trio.to_thread.run_sync(_resolve, state_dir, spec)
    placement = plan_placement(version, worker_views(node, local), replicas, settings.max_batch)
    deployed: dict[str, Any] = {}
    failed: dict[str, str] = {}

    async def one(peer_id: str) -> None:
        try:
            if peer_id == node.peer_id and local is not None:
                deployed[peer_id] = await DeployHandler(local).deploy(
                    version.name, version.sha256, node.peer_id
                )
                return
            node.make_dialable(peer_id)
            reply = await rpc.request(
                node.swarm.host,
                peer_id,
                DEPLOY_PROTOCOL,
                DEPLOY_METHOD,
                {"name": version.name, "sha256": version.sha256, "holder": node.peer_id},
                timeout=settings.deploy_timeout,
                limits=CONTROL_LIMITS,
            )
            deployed[peer_id] = dict(reply.body)
        except RpcError as exc:
            failed[peer_id] = str(exc)

    async with trio.open_nursery() as nursery:
        for peer_id in placement.chosen:
            nursery.start_soon(one, peer_id)
    result = {
        "model": version.spec,
        "sha256": version.sha256,
        "replicas": len(deployed) + len(placement.already),
        "wanted": replicas,
        "deployed": {p: v.get("model") for p, v in deployed.items()},
        "already": list(placement.already),
        "failed": failed,
        "cannot_hold": placement.refused,
    }
    if not deployed and not placement.already:
        reasons = "; ".join(f"{p[-8:]}: {why}" for p, why in failed.items()) or "no worker"
        raise InferenceError(Code.INSUFFICIENT_MEMORY, f"{version.spec} not deployed: {reasons}")
    return result


async def undeploy(node: Node, local: InferenceWorker | None, name: str) -> dict[str, Any]:
    """Stop `name` on every worker that advertises it (this node's own included)."""
    done: list[str] = []
    failed: dict[str, str] = {}
    if local is not None and any(matches_spec(name, m) for m in local.models):
        await DeployHandler(local).undeploy(name_of(name))
        done.append(node.peer_id)
    for entry in node.peer_table.entries():
        if not any(matches_spec(name, m) for m in entry.advert.models):
            continue
        node.make_dialable(entry.peer_id)
        try:
            await rpc.request(
                node.swarm.host,
                entry.peer_id,
                DEPLOY_PROTOCOL,
                UNDEPLOY_METHOD,
                {"name": name_of(name)},
                timeout=node.settings.request_timeout,
                limits=CONTROL_LIMITS,
            )
            done.append(entry.peer_id)
        except RpcError as exc:
            failed[entry.peer_id] = str(exc)
    return {"model": name, "undeployed": done, "failed": failed}


def _resolve(state_dir: Path, spec: str) -> ModelVersion:
    try:
        with Registry(state_dir) as registry:
            return registry.resolve(spec)
    except ModelError as exc:
        raise InferenceError(Code.UNKNOWN_MODEL, str(exc)) from exc


def _partial_and_presence(state_dir: Path, sha: str) -> tuple[Path, bool]:
    with Registry(state_dir) as registry:
        return registry.partial_path(sha), registry.has_blob(sha)


def _register(state_dir: Path, sha: str, partial: Path, had: bool, name: str) -> ModelVersion:
    """The fetched blob into the store (its hash checked again) and registered as `name`,
    identified here by our own code: an unsafe file is refused, as on `models add`."""
    from hivenode.models.fetched import register_blob

    try:
        with Registry(state_dir) as registry:
            if not had:
                registry.put_blob_from_file(partial, sha)
            return register_blob(registry, sha, name)  # the version it is, if registered
    except ModelError as exc:
        raise InferenceError(Code.UNSUPPORTED_MODEL, str(exc)) from exc
