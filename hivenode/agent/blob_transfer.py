"""Content-addressed blobs between peers: `/hivenode/blob/1.0.0`, resumable, hash-checked.

A fetch asks for one chunk per request at the offset where the local partial file ends, so
a fetch that breaks (peer gone, process killed) resumes from the bytes already on disk.
Nothing is put in the store until the whole file's sha256 matches the name it was asked by.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import trio

from hivenode.agent import rpc
from hivenode.agent.errors import RpcError
from hivenode.protocol.limits import Limits
from hivenode.protocol.message import Message

log = logging.getLogger(__name__)

BLOB_PROTOCOL = "/hivenode/blob/1.0.0"
CHUNK_BYTES = 4 * 1024 * 1024
BLOB_LIMITS = Limits(max_header_bytes=4096, max_tensors=1, max_total_bytes=CHUNK_BYTES)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

BlobResolver = Callable[[str], Path | None]
"""sha256 → the file holding those bytes, or None when this node has no such blob."""
Progress = Callable[[int, int], None]
"""Called with (bytes held, total bytes) after every chunk."""


def check_sha(sha: str) -> str:
    if not _SHA256.match(sha):
        raise RpcError("bad_request", f"{sha!r} is not a lowercase hex sha256")
    return sha


def blob_handler(
    resolve: BlobResolver, on_served: Callable[[int], None] | None = None
) -> rpc.Handler:
    """The server side: answers `blob_read {sha256, offset, length}` with one chunk."""

    async def handle(request: Message, caller: str) -> rpc.Reply:
        if request.type != "blob_read":
            raise RpcError("unknown_method", f"expected 'blob_read', got {request.type!r}")
        sha = check_sha(str(request.body.get("sha256", "")))
        offset, length = request.body.get("offset"), request.body.get("length", CHUNK_BYTES)
        if not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 1:
            raise RpcError("bad_request", "offset must be an int ≥ 0 and length an int ≥ 1")
        path = resolve(sha)
        if path is None:
            raise RpcError("not_found", f"no blob {sha} here")
        chunk, size = await trio.to_thread.run_sync(
            _read_chunk, path, offset, min(length, CHUNK_BYTES)
        )
        if on_served is not None:
            on_served(len(chunk))
        return rpc.Reply({"size": size, "offset": offset}, (np.frombuffer(chunk, np.uint8),))

    return handle


def _read_chunk(path: Path, offset: int, length: int) -> tuple[bytes, int]:
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if offset > size:
            raise RpcError("bad_request", f"offset {offset} is past the end ({size} bytes)")
        handle.seek(offset)
        return handle.read(length), size


async def fetch_blob(
    host: Any,
    peer_id: str,
    sha: str,
    partial: Path,
    *,
    timeout: float,
    progress: Progress | None = None,
) -> Path:
    """Fetch blob `sha` from `peer_id` into the file `partial`, resuming from what it holds;
    returns it once its sha256 matches (the caller then moves it into its store)."""
    check_sha(sha)
    partial.parent.mkdir(parents=True, exist_ok=True)
    offset = partial.stat().st_size if partial.exists() else 0
    size: int | None = None
    with partial.open("ab") as out:
        while size is None or offset < size:
            reply = await rpc.request(
                host,
                peer_id,
                BLOB_PROTOCOL,
                "blob_read",
                {"sha256": sha, "offset": offset, "length": CHUNK_BYTES},
                timeout=timeout,
                limits=BLOB_LIMITS,
            )
            size = _reply_size(reply, offset)
            chunk = reply.tensors[0] if reply.tensors else np.zeros(0, np.uint8)
            if chunk.size == 0 and offset < size:
                raise RpcError("bad_reply", f"{peer_id} sent an empty chunk at {offset} of {size}")
            await trio.to_thread.run_sync(_append, out, chunk)
            offset += chunk.size
            if progress is not None:
                progress(offset, size)
    actual = await trio.to_thread.run_sync(file_sha256, partial)
    if actual != sha:
        partial.unlink()
        raise RpcError("bad_reply", f"{peer_id} sent bytes hashing to {actual}, not {sha}")
    return partial


def _reply_size(reply: Message, offset: int) -> int:
    size = reply.body.get("size")
    if not isinstance(size, int) or size < offset or reply.body.get("offset") != offset:
        raise RpcError("bad_reply", "chunk reply with a missing or inconsistent size/offset")
    return size


def _append(out: Any, chunk: np.ndarray) -> None:
    out.write(np.ascontiguousarray(chunk).data)
    out.flush()
    os.fsync(out.fileno())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1024 * 1024):
            digest.update(block)
    return digest.hexdigest()
