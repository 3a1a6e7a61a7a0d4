"""Registering a blob that arrived from a peer: identified here, by our code, never trusted."""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

from hivenode.models.errors import ModelError
from hivenode.models.registry import ModelVersion, Registry
from hivenode.models.tarball import extract_tree


def register_blob(registry: Registry, sha: str, name: str) -> ModelVersion:
    """Add blob `sha` (already in the store) as the next version of `name`.

    A directory model travels as the registry's deterministic tar; it is unpacked (plain
    files only) to identify it, and re-packing it yields the same hash. An unsafe pickle is
    refused like on `models add`: the registry shares what it holds.
    """
    if not registry.has_blob(sha):
        raise ModelError(f"blob {sha} is not in the store; fetch it first")
    path = registry.blob_path(sha)
    if not tarfile.is_tarfile(path):
        return _add(registry, path, name)
    with tempfile.TemporaryDirectory(prefix="hivenode-fetched-") as tmp:
        root = Path(tmp) / "model"
        with registry.open_blob(sha) as source:
            extract_tree(source, root)
        return _add(registry, root, name)


def _add(registry: Registry, path: Path, name: str) -> ModelVersion:
    from hivenode.models.identify import identify

    info = identify(path)
    if not info.safe:
        raise ModelError(
            f"the fetched model is unsafe (its pickle would import "
            f"{', '.join(info.unsafe_globals)}); kept as a blob, not registered"
        )
    return registry.add(path, name, info)
