"""The values a scanned pickle stands for: globals it names, calls it would make, persistent
ids it would resolve; none of them is imported, made or resolved."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GlobalRef:
    """A `module.name` the pickle would import."""

    module: str
    name: str

    @property
    def dotted(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(eq=False)
class Call:
    """An object the pickle would build by calling `func` (REDUCE, NEWOBJ, INST, OBJ)."""

    func: Any
    args: tuple[Any, ...] = ()
    kwargs: dict[Any, Any] | None = None
    state: Any = None
    """What BUILD would pass to `__setstate__` (usually the instance `__dict__`)."""
    items: list[Any] = field(default_factory=list)
    """APPENDS onto the object (list subclasses)."""
    entries: dict[Any, Any] = field(default_factory=dict)
    """SETITEMS onto the object (dict subclasses)."""
    payload: bytes | None = None
    """joblib: the array bytes that follow the wrapper, when small enough to keep."""
    payload_size: int | None = None
    nested: Any = None
    """joblib: the nested pickle that holds an object-dtype array."""

    @property
    def func_name(self) -> str:
        return self.func.dotted if isinstance(self.func, GlobalRef) else "<dynamic>"


@dataclass(frozen=True, eq=False)
class Persistent:
    """A persistent id (torch: `('storage', storage_type, key, location, numel)`)."""

    pid: Any


class OutOfBandBuffer:
    """A protocol-5 buffer passed out of band: its bytes are not in the file."""


def walk(root: Any) -> Iterator[Any]:
    """Every value reachable from `root`, each once (pickles can share and cycle)."""
    seen: set[int] = set()
    pending = [root]
    while pending:
        value = pending.pop()
        if isinstance(value, str | bytes | int | float | bool) or value is None:
            yield value
            continue
        if id(value) in seen:
            continue
        seen.add(id(value))
        yield value
        if isinstance(value, list | tuple):
            pending.extend(value)
        elif isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, Call):
            pending.extend(
                [value.func, value.args, value.kwargs, value.state, value.items, value.entries]
            )
            if value.nested is not None:
                pending.append(value.nested)
        elif isinstance(value, Persistent):
            pending.append(value.pid)
        elif isinstance(objects := getattr(value, "objects", None), list):
            pending.extend(objects)  # object-dtype arrays (pickled_numpy.ArrayInfo)
