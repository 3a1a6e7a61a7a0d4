"""Gossip records: small schema-checked values with an origin, a sequence number and a TTL.

Old and new agents must read each other's records, so unknown fields are ignored and missing
ones take their defaults. Signatures come from libp2p's signed gossip; the receiver checks
that a record's origin is the peer that signed it.
"""

from __future__ import annotations

import time
from typing import Any, Self

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hivenode.protocol.errors import ProtocolError
from hivenode.protocol.limits import MAX_GOSSIP_BYTES


class WireModel(BaseModel):
    """A frozen model that ignores fields it does not know (forward compatibility)."""

    model_config = ConfigDict(frozen=True, extra="ignore")


class Record(WireModel):
    """A versioned record one origin publishes again and again; receivers keep the newest."""

    origin: str = Field(min_length=1, max_length=128)
    seq: int = Field(ge=0)
    timestamp: float = Field(ge=0)
    ttl: float = Field(gt=0, le=86_400)

    def expires_at(self) -> float:
        return self.timestamp + self.ttl

    def is_expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at()

    def to_wire(self) -> bytes:
        data: bytes = msgpack.packb(self.model_dump(mode="json"), use_bin_type=True)
        if len(data) > MAX_GOSSIP_BYTES:
            raise ProtocolError(
                f"{type(self).__name__} is {len(data)} bytes, over the gossip limit of "
                f"{MAX_GOSSIP_BYTES}"
            )
        return data

    @classmethod
    def from_wire(cls, data: bytes) -> Self:
        if len(data) > MAX_GOSSIP_BYTES:
            raise ProtocolError(f"gossip record of {len(data)} bytes exceeds {MAX_GOSSIP_BYTES}")
        try:
            raw: Any = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises many types for garbage
            raise ProtocolError(
                f"undecodable {cls.__name__}: {type(exc).__name__} {exc}".rstrip()
            ) from exc
        return cls.from_mapping(raw)

    @classmethod
    def from_mapping(cls, raw: Any) -> Self:
        if not isinstance(raw, dict):
            raise ProtocolError(f"{cls.__name__} must be a map, got {type(raw).__name__}")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "record"
            raise ProtocolError(f"invalid {cls.__name__}: {where}: {first['msg']}") from exc
