"""Named fault scenarios for data-parallel peers and pipeline stages, shared by the tests
and the simulator.

A data-parallel fault is injected by subclassing the `Averager`: the peer behaves normally
until the chosen step, then fails the named way. A pipeline stage's node is killed through
the stage's `on_step` (`StageKill`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import trio

from hivenode.agent.rpc import Reply
from hivenode.parallel.allreduce import Averager, StepResult
from hivenode.parallel.reducer import PartResult
from hivenode.protocol.compression import Vector
from hivenode.protocol.message import Message

if TYPE_CHECKING:  # the pipeline imports torch; the data-parallel faults do not need it
    from hivenode.parallel.pipeline import StageStep


class Fault(Enum):
    KILL_MID_STEP = "kill-mid-step"
    """The peer's node stops once its share reached one other reducer and before it reached
    the rest: one part counts it, the others wait for it, and its own part is lost."""
    HANG = "hang"
    """The peer stops contributing but its node keeps serving (a stuck training loop)."""
    DIE_WHILE_REPLYING = "die-while-replying"
    """The peer's node stops after its reduced part reached one peer and before the rest:
    the others must take that peer's copy, not reduce the part again without it."""


REPLY_WRITE_S = 0.2
"""DIE_WHILE_REPLYING waits this long after its first reply, so that reply is on the wire."""


def faulty_averager(
    fault: Fault, at_step: int, on_fault: Callable[[], Awaitable[None]]
) -> type[Averager]:
    """An Averager class that fails at `at_step`; `await on_fault()` as it fails: it must
    cancel the peer's training, and for the faults that kill, stop its node from a task of
    its own (the stopping node cancels the handler that calls it)."""

    class FaultyAverager(Averager):
        async def allreduce(
            self, step: int, values: Vector, weight: float, digest: str = ""
        ) -> StepResult:
            if fault is Fault.HANG and step == at_step:
                await on_fault()
                await trio.sleep_forever()
            return await super().allreduce(step, values, weight, digest)

        async def _send(self, step: int, *args: Any, **kwargs: Any) -> PartResult | None:
            if fault is Fault.KILL_MID_STEP and step == at_step:
                self.sends_at_fault = getattr(self, "sends_at_fault", 0) + 1
                if self.sends_at_fault > 1:
                    await on_fault()
                    await trio.sleep_forever()
            return await super()._send(step, *args, **kwargs)

        async def _serve_reduce(self, request: Message, caller: str) -> Reply:
            reply = await super()._serve_reduce(request, caller)
            if fault is Fault.DIE_WHILE_REPLYING and request.body.get("step") == at_step:
                self.replies_at_fault = getattr(self, "replies_at_fault", 0) + 1
                if self.replies_at_fault > 1:
                    await trio.sleep(REPLY_WRITE_S)
                    await on_fault()
                    await trio.sleep_forever()
            return reply

    return FaultyAverager


@dataclass(frozen=True)
class StageKill:
    """The node of pipeline stage `stage` dies as it starts step `step`, having finished the
    steps before it: `hivenode sim parallel --kill-stage` and the fail-over tests."""

    stage: int
    step: int

    def on_step(self, die: Callable[[], None]) -> Callable[[StageStep], None]:
        """The victim stage's `on_step`: calls `die()` once, after step `step - 1`. `die`
        must cancel the stage's training and stop its node from a task of its own."""

        def hook(record: StageStep) -> None:
            if record.step == self.step - 1:
                die()

        return hook
