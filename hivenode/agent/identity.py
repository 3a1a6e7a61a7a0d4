"""The node's ed25519 identity: created on first start, kept in the state dir (0600)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from hivenode.agent.errors import IdentityError
from hivenode.fsutil import atomic_write

if TYPE_CHECKING:
    from libp2p.crypto.keys import KeyPair

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.key"
SEED_BYTES = 32


def load_or_create_identity(state_dir: Path) -> KeyPair:
    """Return the node's key pair, creating and saving a fresh one when none exists."""
    from libp2p.crypto.ed25519 import create_new_key_pair

    path = state_dir / IDENTITY_FILE
    if path.exists():
        return create_new_key_pair(_read_seed(path))
    seed = os.urandom(SEED_BYTES)
    atomic_write(path, seed, mode=0o600)
    log.info("created a new node identity in %s", path)
    return create_new_key_pair(seed)


def _read_seed(path: Path) -> bytes:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise IdentityError(f"{path} is readable by others (mode {mode:o}); run: chmod 600 {path}")
    seed = path.read_bytes()
    if len(seed) != SEED_BYTES:
        raise IdentityError(
            f"{path} holds {len(seed)} bytes, not a {SEED_BYTES}-byte ed25519 seed; "
            "move it away to create a new identity"
        )
    return seed


def peer_id_of(key_pair: KeyPair) -> str:
    from libp2p.peer.id import ID

    return str(ID.from_pubkey(key_pair.public_key))
