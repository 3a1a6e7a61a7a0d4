"""`POST /v1/models/fetch`: the daemon fetches a model blob from a peer into its registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio

from hivenode.agent.blob_transfer import check_sha, fetch_blob
from hivenode.agent.control import ApiError, Request
from hivenode.agent.errors import RpcError
from hivenode.agent.node import Node
from hivenode.models.errors import ModelError
from hivenode.models.registry import Registry


def blob_resolver(state_dir: Path) -> Any:
    """What the node serves on `/hivenode/blob/1.0.0`: the registry's blobs."""
    registry_blobs = Registry(state_dir).blobs  # the store only; no SQLite on this path

    def resolve(sha: str) -> Path | None:
        try:
            return registry_blobs.path(sha) if registry_blobs.has(sha) else None
        except ModelError:
            return None

    return resolve


async def fetch_model(node: Node, state_dir: Path, request: Request) -> dict[str, Any]:
    """Body: {"sha256", "peer", "name"?}. Resumes a partial fetch; registers under `name`."""
    try:
        body = json.loads(request.body or b"{}")
        sha, peer = check_sha(str(body["sha256"])), str(body["peer"])
        name = body.get("name")
    except (ValueError, KeyError, TypeError, RpcError) as exc:
        raise ApiError(400, f"expected JSON {{sha256, peer, name?}}: {exc}") from exc
    partial, have = await trio.to_thread.run_sync(_partial_and_presence, state_dir, sha)
    if not have:
        node.make_dialable(peer)
        try:
            await fetch_blob(
                node.swarm.host, peer, sha, partial, timeout=node.settings.request_timeout
            )
        except RpcError as exc:
            status = 404 if exc.code == "not_found" else 502
            raise ApiError(status, f"fetching {sha[:12]}… from {peer}: {exc.message}") from exc
    try:
        return await trio.to_thread.run_sync(_store, state_dir, sha, partial, have, name)
    except ModelError as exc:
        raise ApiError(422, str(exc)) from exc


def _partial_and_presence(state_dir: Path, sha: str) -> tuple[Path, bool]:
    with Registry(state_dir) as registry:
        return registry.partial_path(sha), registry.has_blob(sha)


def _store(state_dir: Path, sha: str, partial: Path, had: bool, name: str | None) -> dict[str, Any]:
    from hivenode.models.fetched import register_blob

    with Registry(state_dir) as registry:
        if not had:
            registry.put_blob_from_file(partial, sha)
        result: dict[str, Any] = {
            "sha256": sha,
            "size_bytes": registry.blob_path(sha).stat().st_size,
            "fetched": not had,
        }
        if name:
            result["model"] = register_blob(registry, sha, name).as_json()
        return result
