"""Per-transfer secrets and the AEAD construction of the fast path's frames."""

from __future__ import annotations

import functools
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

AES_GCM: Final = "aes-256-gcm"
CHACHA20_POLY1305: Final = "chacha20-poly1305"
KEY_BYTES: Final = 32
TOKEN_BYTES: Final = 16
TRANSFER_ID_BYTES: Final = 16
TAG_BYTES: Final = 16
LAST_FRAME: Final = 1
MORE_FRAMES: Final = 0
_AD_TAIL = struct.Struct(">QB")


class Aead(Protocol):
    """What AESGCM and ChaCha20Poly1305 have in common, as the channel uses them."""

    def encrypt_into(
        self, nonce: bytes, data: bytes | memoryview, associated_data: bytes, buf: memoryview
    ) -> int: ...

    def decrypt_into(
        self, nonce: bytes, data: bytes | memoryview, associated_data: bytes, buf: memoryview
    ) -> int: ...


@functools.cache
def cpu_has_aes() -> bool:
    """Whether this CPU has AES instructions (x86 `aes` flag, arm64 `aes` feature).

    Without them AES-GCM is a slow, table-based cipher and ChaCha20-Poly1305 is faster.
    """
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return True  # not Linux: assume a modern CPU rather than the slower cipher
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return "aes" in value.split()
    return False


def preferred_ciphers() -> list[str]:
    """Ciphers in this node's order of preference."""
    return [AES_GCM, CHACHA20_POLY1305] if cpu_has_aes() else [CHACHA20_POLY1305, AES_GCM]


def choose_cipher(offered: list[str]) -> str:
    """The receiver's choice: AES-GCM only when both sides have AES instructions."""
    if AES_GCM in offered and CHACHA20_POLY1305 in offered:
        both_fast = cpu_has_aes() and offered[0] == AES_GCM
        return AES_GCM if both_fast else CHACHA20_POLY1305
    for name in offered:
        if name in (AES_GCM, CHACHA20_POLY1305):
            return name
    raise ValueError(f"no cipher in common (offered {offered!r:.80})")


def make_aead(cipher: str, key: bytes) -> Aead:
    if len(key) != KEY_BYTES:
        raise ValueError(f"a {cipher} key is {KEY_BYTES} bytes, got {len(key)}")
    if cipher == AES_GCM:
        return AESGCM(key)
    if cipher == CHACHA20_POLY1305:
        return ChaCha20Poly1305(key)
    raise ValueError(f"unknown cipher {cipher!r:.40}")


@dataclass(frozen=True)
class Secrets:
    """A fresh key and token for one transfer; the key never encrypts anything else."""

    key: bytes
    token: bytes

    @classmethod
    def fresh(cls) -> Secrets:
        return cls(secrets.token_bytes(KEY_BYTES), secrets.token_bytes(TOKEN_BYTES))


def fresh_transfer_id() -> bytes:
    """Names a transfer across its resumes. Not a secret: a resume is honoured only for the
    peer libp2p authenticated as the transfer's sender, so knowing the id grants nothing."""
    return secrets.token_bytes(TRANSFER_ID_BYTES)


def nonce(index: int) -> bytes:
    """Frame `index` as a 96-bit big-endian counter: unique under one key by construction."""
    return index.to_bytes(12, "big")


def associated_data(token: bytes, index: int, last: bool, header_digest: bytes) -> bytes:
    """Binds a frame to its transfer (token, header digest), its position and finality."""
    return token + _AD_TAIL.pack(index, LAST_FRAME if last else MORE_FRAMES) + header_digest
