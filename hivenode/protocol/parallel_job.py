"""The `/hivenode/parallel-job/1.0.0` messages: a coordinator's order to a member of a data-
or pipeline-parallel job, and the names of its methods and states."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final, TypeVar

from hivenode.protocol.errors import ProtocolError

START: Final = "parallel_start"
STATUS: Final = "parallel_status"
"""Body: job, since (the first step wanted), weights (true: send them once finished)."""
MODES: Final = ("data", "pipeline", "model")
RUNNING, FINISHED, FAILED = "running", "finished", "failed"
MAX_MEMBERS: Final = 256

_T = TypeVar("_T")


@dataclass(frozen=True)
class JobOrder:
    """What a member is told to do; the same on every member but for `rank`."""

    job: str
    mode: str
    members: tuple[str, ...]
    rank: int
    dataset: str
    model: str
    options: Mapping[str, Any]
    feature_shape: tuple[int, ...]
    num_classes: int
    seed: int
    steps: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    micro_batches: int = 4
    peer_timeout: float = 10.0
    compression: str = "none"
    stages: int = 0
    """pipeline/model: the first `stages` members hold the stages, the last one keeps the
    checkpoints and drives fail-overs, the ones between are spares; 0: every member holds a
    stage and there is no fail-over."""

    @property
    def stage_count(self) -> int:
        return self.stages or len(self.members)

    def to_body(self) -> dict[str, Any]:
        body = asdict(self)
        body["members"], body["feature_shape"] = list(self.members), list(self.feature_shape)
        body["options"] = dict(self.options)
        return body

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> JobOrder:
        members = _peers(body, "members")
        order = cls(
            job=_field(body, "job", str),
            mode=_field(body, "mode", str),
            members=members,
            rank=_field(body, "rank", int),
            dataset=_field(body, "dataset", str),
            model=_field(body, "model", str),
            options=_field(body, "options", dict),
            feature_shape=tuple(_field(body, "feature_shape", list)),
            num_classes=_field(body, "num_classes", int),
            seed=_field(body, "seed", int),
            steps=_field(body, "steps", int),
            batch_size=_field(body, "batch_size", int),
            lr=_number(body, "lr"),
            momentum=_number(body, "momentum"),
            micro_batches=_field(body, "micro_batches", int),
            peer_timeout=_number(body, "peer_timeout"),
            compression=_field(body, "compression", str),
            stages=_field({"stages": body.get("stages", 0)}, "stages", int),
        )
        order.check()
        return order

    def check(self) -> None:
        if self.mode not in MODES:
            raise ProtocolError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if not 0 <= self.rank < len(self.members) or len(set(self.members)) != len(self.members):
            raise ProtocolError(f"rank {self.rank} of {len(self.members)} distinct members")
        if not 0 <= self.stages <= len(self.members) - 2 or (self.stages and self.mode == "data"):
            raise ProtocolError(
                f"{self.stages} stages of {len(self.members)} members ({self.mode})"
            )
        if not all(isinstance(n, int) and 0 < n <= 1 << 20 for n in self.feature_shape):
            raise ProtocolError(f"bad feature shape {self.feature_shape}")
        positive = {"num_classes": self.num_classes, "steps": self.steps}
        positive |= {"batch_size": self.batch_size, "micro_batches": self.micro_batches}
        if any(value < 1 for value in positive.values()) or self.num_classes < 2:
            raise ProtocolError(f"counts must be positive (and classes ≥ 2): {positive}")
        if not (math.isfinite(self.lr) and self.lr > 0 and self.peer_timeout > 0):
            raise ProtocolError("lr and peer_timeout must be positive")


def _field(body: Mapping[str, Any], name: str, kind: type[_T]) -> _T:
    value = body.get(name)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise ProtocolError(f"order field {name!r} must be {kind.__name__}, got {value!r:.60}")
    return value


def _number(body: Mapping[str, Any], name: str) -> float:
    value = body.get(name)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ProtocolError(f"order field {name!r} must be a number, got {value!r:.60}")
    return float(value)


def _peers(body: Mapping[str, Any], name: str) -> tuple[str, ...]:
    raw = _field(body, name, list)
    if len(raw) > MAX_MEMBERS or not all(isinstance(p, str) and 0 < len(p) < 128 for p in raw):
        raise ProtocolError(f"order field {name!r} must list at most {MAX_MEMBERS} peer ids")
    return tuple(raw)
