"""Checked reads of request and reply bodies: a field of the expected type, or a
ProtocolError that names it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from hivenode.protocol.errors import ProtocolError

_T = TypeVar("_T")


def field(body: Mapping[str, Any], name: str, kind: type[_T]) -> _T:
    """`body[name]` of type `kind` (a bool is no int), else a ProtocolError naming it."""
    value = body.get(name)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise ProtocolError(f"request field {name!r} must be {kind.__name__}, got {value!r:.60}")
    return value


def number(body: Mapping[str, Any], name: str) -> float:
    value = body.get(name)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ProtocolError(f"request field {name!r} must be a number, got {value!r:.60}")
    return float(value)


def peer_list(body: Mapping[str, Any], name: str, max_peers: int = 4096) -> tuple[str, ...]:
    raw = field(body, name, list)
    if len(raw) > max_peers or not all(isinstance(p, str) and 0 < len(p) < 128 for p in raw):
        raise ProtocolError(f"request field {name!r} must be a list of peer ids")
    return tuple(raw)
