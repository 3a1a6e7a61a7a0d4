"""Size limits every decoder enforces before it allocates anything."""

from dataclasses import dataclass

MAX_GOSSIP_BYTES = 64 * 1024
"""Gossip records stay far below py-libp2p's silent 1 MiB drop; bulk bytes go over streams."""


@dataclass(frozen=True)
class Limits:
    """Bounds on one stream message: header bytes, tensor count and total tensor bytes."""

    max_header_bytes: int = 256 * 1024
    max_tensors: int = 4096
    max_total_bytes: int = 4 * 1024**3


DEFAULT_LIMITS = Limits()
CONTROL_LIMITS = Limits(max_header_bytes=64 * 1024, max_tensors=0, max_total_bytes=0)
"""For request/response traffic that carries no tensors (status, peer table)."""
