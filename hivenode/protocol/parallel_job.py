"""The `/hivenode/parallel-job/1.0.0` messages: a coordinator's order to a member of a data-
or pipeline-parallel job, and the names of its methods and states."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final

from hivenode.protocol.errors import ProtocolError
from hivenode.protocol.fields import field, number, peer_list

START: Final = "parallel_start"
STATUS: Final = "parallel_status"
"""Body: job, since (the first step wanted), weights (true: send them once finished)."""
MODES: Final = ("data", "pipeline", "model")
RUNNING, FINISHED, FAILED = "running", "finished", "failed"
MAX_MEMBERS: Final = 256


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
        members = peer_list(body, "members", MAX_MEMBERS)
        order = cls(
            job=field(body, "job", str),
            mode=field(body, "mode", str),
            members=members,
            rank=field(body, "rank", int),
            dataset=field(body, "dataset", str),
            model=field(body, "model", str),
            options=field(body, "options", dict),
            feature_shape=tuple(field(body, "feature_shape", list)),
            num_classes=field(body, "num_classes", int),
            seed=field(body, "seed", int),
            steps=field(body, "steps", int),
            batch_size=field(body, "batch_size", int),
            lr=number(body, "lr"),
            momentum=number(body, "momentum"),
            micro_batches=field(body, "micro_batches", int),
            peer_timeout=number(body, "peer_timeout"),
            compression=field(body, "compression", str),
            stages=field({"stages": body.get("stages", 0)}, "stages", int),  # absent: 0
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
