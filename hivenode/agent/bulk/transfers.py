"""A receiver's table of pending transfers and the live tokens that open their channels:
who may present what, which transfers are parked for a resume, and when each one ends."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator

import trio

from hivenode.agent.bulk.channel import ChannelBroken
from hivenode.agent.bulk.errors import BulkError
from hivenode.agent.bulk.inbound import Attempt, InboundTransfer, OnAbandoned
from hivenode.agent.bulk.keys import Secrets

log = logging.getLogger(__name__)


class TransferTable:
    """Every transfer from its offer to its end, and the tokens of their live attempts.

    A transfer is *served* while a libp2p stream handler owns it (that handler's deadline
    ends it) and *parked* between a broken channel and its resume (`expire_parked` ends it at
    its deadline). Dropping a transfer voids its token, stops its channel and lets go of its
    buffer, so nothing of it outlives the deadline.
    """

    def __init__(
        self, on_abandoned: OnAbandoned | None, reject: Callable[[str, BulkError], None]
    ) -> None:
        self._on_abandoned = on_abandoned
        self._reject = reject
        self._transfers: dict[bytes, InboundTransfer] = {}
        self._tokens: dict[bytes, tuple[InboundTransfer, Attempt]] = {}
        self._served: set[bytes] = set()
        self._parked_changed = trio.Event()

    def __len__(self) -> int:
        return len(self._transfers)

    def __iter__(self) -> Iterator[InboundTransfer]:
        return iter(list(self._transfers.values()))

    def held_bytes(self) -> int:
        return sum(t.manifest.total_bytes for t in self._transfers.values())

    def add(self, transfer: InboundTransfer) -> None:
        self._transfers[transfer.id] = transfer
        self._served.add(transfer.id)

    def find(self, transfer_id: bytes) -> InboundTransfer | None:
        return self._transfers.get(transfer_id)

    def holds(self, transfer: InboundTransfer) -> bool:
        return self._transfers.get(transfer.id) is transfer

    def serve(self, transfer: InboundTransfer) -> None:
        """A resume's handler owns the transfer from now on."""
        self._served.add(transfer.id)

    def park(self, transfer: InboundTransfer) -> None:
        """No handler owns it: it waits for a resume until its deadline."""
        self._served.discard(transfer.id)
        self._parked_changed.set()
        self._parked_changed = trio.Event()

    def start_attempt(self, transfer: InboundTransfer) -> Attempt:
        """A new attempt with a fresh key as well as a fresh token: see sender.Upload.resume."""
        attempt = Attempt(Secrets.fresh(), transfer.verified_frames)
        transfer.attempt = attempt
        if transfer.complete:  # the break came after the last frame: nothing left to carry
            attempt.settle(None)
        else:
            self._tokens[attempt.secrets.token] = (transfer, attempt)
        return attempt

    def take_token(self, token: bytes) -> tuple[InboundTransfer, Attempt] | None:
        """The attempt a token opens, removed: a token works once."""
        return self._tokens.pop(token, None)

    def stop_attempt_nowait(self, attempt: Attempt, reason: str) -> None:
        """Void the attempt's token and stop its channel; it settles as resumable."""
        self._tokens.pop(attempt.secrets.token, None)
        if attempt.scope is None:
            broken = ChannelBroken(f"no connection presented the token ({reason})")
            attempt.settle(broken, resumable=True)
        else:
            attempt.stop_reason = reason
            attempt.scope.cancel()

    async def stop_attempt(self, attempt: Attempt, reason: str) -> None:
        self.stop_attempt_nowait(attempt, reason)
        await attempt.settled.wait()

    def finish(self, transfer: InboundTransfer) -> None:
        self._transfers.pop(transfer.id, None)
        self._served.discard(transfer.id)

    def drop(self, transfer: InboundTransfer, error: BulkError) -> bool:
        """Forget `transfer` and its buffer; whether it was still here."""
        if self._transfers.pop(transfer.id, None) is None:
            return False
        self._served.discard(transfer.id)
        if transfer.attempt is not None:
            self._tokens.pop(transfer.attempt.secrets.token, None)
            if transfer.attempt.scope is not None:
                transfer.attempt.scope.cancel()
            transfer.attempt.settle(error)
        transfer.payload = None
        return True

    async def abandon(self, transfer: InboundTransfer, error: BulkError) -> None:
        """Drop it, and tell the consumer if it had already handed tensors on."""
        if self.drop(transfer, error) and transfer.delivered and self._on_abandoned:
            try:
                await self._on_abandoned(transfer.peer_id, transfer.hex_id, error)
            except Exception:
                log.exception("on_abandoned failed for a transfer from %s", transfer.peer_id)

    async def expire_parked(self) -> None:
        """Drop each parked transfer at its deadline, for ever (run it in a nursery)."""
        while True:
            now = trio.current_time()
            parked = [t for t in self._transfers.values() if t.id not in self._served]
            for transfer in parked:
                if transfer.deadline <= now:
                    error = BulkError("timeout", "no resume came before the transfer's deadline")
                    self._reject(transfer.peer_id, error)
                    await self.abandon(transfer, error)
            changed = self._parked_changed
            soonest = min((t.deadline for t in parked if t.deadline > now), default=math.inf)
            with trio.move_on_at(soonest):
                await changed.wait()

    def close(self) -> None:
        for transfer in list(self._transfers.values()):
            self.drop(transfer, BulkError("closed", "the receiver stopped"))
