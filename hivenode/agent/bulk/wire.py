"""What the two sides of a bulk transfer say to each other: the offer's manifest, the
libp2p messages around it, and the layout of the TCP channel's frames."""

from __future__ import annotations

import functools
import hashlib
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import msgpack
import numpy as np

from hivenode.agent.bulk.errors import BulkError
from hivenode.protocol.errors import ProtocolError
from hivenode.protocol.limits import Limits
from hivenode.protocol.message import ALLOWED_DTYPES, TensorSpec

BULK_PROTOCOL: Final = "/hivenode/bulk/1.1.0"
"""Adds resumes, and moves the payload's sha256 from the offer to `bulk_sent`/`bulk_data` so
that the sender hashes while it sends instead of before it offers."""
BULK_PROTOCOL_1_0: Final = "/hivenode/bulk/1.0.0"
"""The first cut: the sha256 in the offer's manifest. Still served, and spoken to a peer that
knows nothing newer (libp2p negotiates the first id both sides know)."""

OFFER: Final = "bulk_offer"
ACCEPT: Final = "bulk_accept"
SENT: Final = "bulk_sent"
"""The sender has written every frame on the TCP channel and closed its side."""
DATA: Final = "bulk_data"
"""Fallback: the payload itself, as the tensors of this message on the libp2p stream."""
DONE: Final = "bulk_done"
RESUME: Final = "bulk_resume"
"""On a new libp2p stream: continue a transfer whose channel broke, from its verified prefix."""
INTERRUPTED: Final = "interrupted"
"""The error code a receiver answers when the channel broke and it keeps the transfer for a
resume; any other error ends the transfer."""

FRAME_BYTES: Final = 1024 * 1024
"""Plaintext bytes per frame: large enough that per-frame costs vanish, small enough that
a frame is decrypted in about 0.1 ms (AES-NI) and never holds the event loop."""
MIN_FRAME_BYTES: Final = 64 * 1024
MAX_FRAME_BYTES: Final = 16 * 1024 * 1024

PREAMBLE_MAGIC: Final = b"HNB1"
PREAMBLE_BYTES: Final = len(PREAMBLE_MAGIC) + 16
FRAME_HEADER: Final = struct.Struct(">IB")
"""Ciphertext length (tag included) and the last-frame flag; both are checked against what
the receiver expects, and the flag is also authenticated as associated data."""

OFFER_LIMITS: Final = Limits(max_header_bytes=1024 * 1024, max_tensors=0, max_total_bytes=0)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Manifest:
    """What the sender declares before any payload byte moves."""

    specs: tuple[TensorSpec, ...]
    total_bytes: int
    sha256: str
    """The payload's sha256 in hex; "" in 1.1.0, where it follows the payload instead."""
    meta: Mapping[str, Any]
    frame_bytes: int

    @property
    def frame_count(self) -> int:
        return max(1, math.ceil(self.total_bytes / self.frame_bytes))

    def frame_length(self, index: int) -> int:
        """Plaintext bytes of frame `index` (a transfer of 0 bytes is one empty frame)."""
        start = index * self.frame_bytes
        return max(0, min(self.frame_bytes, self.total_bytes - start))

    @functools.cached_property
    def tensor_ends(self) -> tuple[int, ...]:
        """The payload offset just past each tensor: tensor i is whole once that many bytes
        are verified."""
        ends, end = [], 0
        for spec in self.specs:
            end += spec.nbytes
            ends.append(end)
        return tuple(ends)

    def to_wire(self) -> bytes:
        packed: bytes = msgpack.packb(
            {
                "tensors": [spec.to_wire() for spec in self.specs],
                "total_bytes": self.total_bytes,
                "sha256": self.sha256,
                "meta": dict(self.meta),
                "frame_bytes": self.frame_bytes,
            },
            use_bin_type=True,
        )
        return packed

    @classmethod
    def from_wire(cls, data: bytes, limits: Limits, *, sha_deferred: bool = False) -> Manifest:
        """Parse and check a manifest against `limits`; BulkError("bad_offer") otherwise.
        `sha_deferred`: the sha256 may be "" (it comes with the payload)."""
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
            if not isinstance(raw, dict):
                raise ProtocolError("the manifest is not a map")
            tensors, meta = raw.get("tensors"), raw.get("meta", {})
            total, sha, frame = raw.get("total_bytes"), raw.get("sha256"), raw.get("frame_bytes")
            if not isinstance(tensors, list) or len(tensors) > limits.max_tensors:
                raise ProtocolError(f"tensors must be a list of at most {limits.max_tensors}")
            # each tensor is checked against the count only; the total gets its own code below
            unbounded = replace(limits, max_total_bytes=2**62)
            specs = tuple(TensorSpec.from_wire(t, i, unbounded) for i, t in enumerate(tensors))
            if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
                raise ProtocolError("meta must be a map with string keys")
            if not (sha_deferred and sha == ""):
                sha = checked_sha256(sha)
            if not isinstance(frame, int) or not MIN_FRAME_BYTES <= frame <= MAX_FRAME_BYTES:
                raise ProtocolError(
                    f"frame_bytes must be in [{MIN_FRAME_BYTES}, {MAX_FRAME_BYTES}]"
                )
        except BulkError:
            raise
        except ProtocolError as exc:
            raise BulkError("bad_offer", exc.reason) from exc
        except Exception as exc:  # msgpack raises many types for garbage
            raise BulkError("bad_offer", f"undecodable manifest: {type(exc).__name__}") from exc
        declared = sum(spec.nbytes for spec in specs)
        if total != declared:
            raise BulkError("bad_offer", f"total_bytes {total} but the tensors need {declared}")
        if declared > limits.max_total_bytes:
            raise BulkError(
                "too_large", f"{declared} bytes offered, over the limit of {limits.max_total_bytes}"
            )
        return cls(specs, declared, sha, meta, frame)


def checked_sha256(value: Any) -> str:
    if not isinstance(value, str) or not _SHA256.match(value):
        raise ProtocolError("sha256 must be 64 lowercase hex digits")
    return value


def header_digest(manifest_bytes: bytes) -> bytes:
    """The digest every frame's associated data carries: frames of another transfer, or
    of this transfer under another manifest, do not authenticate."""
    return hashlib.sha256(b"hivenode/bulk/1 manifest\0" + manifest_bytes).digest()


def wire_arrays(tensors: Sequence[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
    """The arrays as the wire carries them: C-contiguous, little-endian, an allowed dtype."""
    out = []
    for index, array in enumerate(tensors):
        array = np.asarray(array)
        wire_dtype = array.dtype.newbyteorder("<")
        if wire_dtype.str not in ALLOWED_DTYPES:
            raise BulkError(
                "bad_tensor", f"tensor {index} has dtype {array.dtype.str}, not carried on the wire"
            )
        out.append(np.ascontiguousarray(array, dtype=wire_dtype))
    return out


def byte_views(arrays: Sequence[np.ndarray[Any, Any]]) -> list[memoryview]:
    return [array.reshape(-1).view(np.uint8).data for array in arrays]


def payload_sha256(views: Sequence[memoryview]) -> str:
    """sha256 of the concatenated views (hashlib drops the GIL, so run it in a thread)."""
    digest = hashlib.sha256()
    for view in views:
        digest.update(view)
    return digest.hexdigest()
