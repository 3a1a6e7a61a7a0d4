"""Blobs move between real nodes by hash, resume after a break, and are verified."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio
from swarm_helpers import local_swarm

from hivenode.agent.blob_transfer import CHUNK_BYTES, fetch_blob
from hivenode.agent.errors import RpcError

SIZE = 3 * CHUNK_BYTES + 12345


def make_blob(directory: Path) -> tuple[str, bytes]:
    data = os.urandom(SIZE)
    sha = hashlib.sha256(data).hexdigest()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / sha).write_bytes(data)
    return sha, data


def resolver(directory: Path):  # type: ignore[no-untyped-def]
    return lambda sha: (directory / sha) if (directory / sha).is_file() else None


async def test_a_broken_fetch_resumes_without_resending_what_arrived(tmp_path: Path) -> None:
    served = tmp_path / "served"
    sha, data = make_blob(served)
    partial = tmp_path / "fetched" / "blob.part"
    async with local_swarm(tmp_path) as start:
        owner = await start("owner", blob_resolver=resolver(served))
        fetcher = await start("fetcher", bootstrap=[owner])
        with trio.move_on_after(30) as cancelled_scope:

            def stop_after_two_chunks(held: int, total: int) -> None:
                if held >= 2 * CHUNK_BYTES:
                    cancelled_scope.cancel()

            await fetch_blob(
                fetcher.swarm.host,
                owner.peer_id,
                sha,
                partial,
                timeout=10,
                progress=stop_after_two_chunks,
            )
        assert partial.stat().st_size == 2 * CHUNK_BYTES, "the break kept what arrived"
        result = await fetch_blob(fetcher.swarm.host, owner.peer_id, sha, partial, timeout=10)
        assert result.read_bytes() == data
        sent = owner.metrics.value("hivenode_blob_bytes_served_total")
        assert sent == SIZE, "every byte was sent exactly once"


async def test_unknown_blob_and_bad_hash_are_typed_errors(tmp_path: Path) -> None:
    served = tmp_path / "served"
    make_blob(served)
    liar_dir = tmp_path / "liar"
    liar_dir.mkdir()
    wrong = "0" * 64
    (liar_dir / wrong).write_bytes(b"these bytes do not hash to zero")
    async with local_swarm(tmp_path) as start:
        owner = await start("owner", blob_resolver=resolver(served))
        liar = await start("liar", blob_resolver=resolver(liar_dir))
        fetcher = await start("fetcher", bootstrap=[owner, liar])
        host = fetcher.swarm.host
        with pytest.raises(RpcError) as missing:
            await fetch_blob(host, owner.peer_id, "f" * 64, tmp_path / "x.part", timeout=5)
        assert missing.value.code == "not_found"
        with pytest.raises(RpcError) as bad:
            await fetch_blob(host, liar.peer_id, wrong, tmp_path / "y.part", timeout=5)
        assert bad.value.code == "bad_reply"
        assert not (tmp_path / "y.part").exists(), "bad bytes are not kept"
        with pytest.raises(RpcError) as malformed:
            await fetch_blob(
                fetcher.swarm.host, owner.peer_id, "../etc/passwd", tmp_path / "z.part", timeout=5
            )
        assert malformed.value.code == "bad_request"
