"""The node identity is created once, kept 0600, and refused when unsafe or damaged."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from hivenode.agent.errors import IdentityError
from hivenode.agent.identity import IDENTITY_FILE, load_or_create_identity, peer_id_of


def test_identity_is_created_private_and_reused(tmp_path: Path) -> None:
    first = peer_id_of(load_or_create_identity(tmp_path))
    path = tmp_path / IDENTITY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert peer_id_of(load_or_create_identity(tmp_path)) == first
    assert first.startswith("12D3KooW")  # an ed25519 peer id


def test_world_readable_identity_is_refused(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path)
    (tmp_path / IDENTITY_FILE).chmod(0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_or_create_identity(tmp_path)


def test_truncated_identity_is_refused_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / IDENTITY_FILE
    path.write_bytes(b"short")
    path.chmod(0o600)
    with pytest.raises(IdentityError, match="5 bytes"):
        load_or_create_identity(tmp_path)
    assert path.read_bytes() == b"short"
