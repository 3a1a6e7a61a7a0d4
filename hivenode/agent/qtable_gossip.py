"""The node's share of the swarm's Q-table: signed deltas on gossip, snapshots on join.

Every node keeps the whole table as a CRDT (`hivenode.planner.crdt`): its own cells change
only when a job it aggregated finishes (`record`), and it publishes them as deltas on
`hivenode/qtable/1`, signed by libp2p like adverts. Deltas from others are merged as they
come; a forged one (origin ≠ signer), an expired one or a replay is dropped and counted.
Gossip can lose messages (a mesh not formed yet, a full queue), so a node also pulls a
peer's snapshot — the signed messages themselves, re-verified here — when it joins and
every ten minutes, and republishes all its own cells every `REPUBLISH_PERIOD`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from hivenode.agent.errors import RpcError
from hivenode.agent.gossip import GossipMessage, verify_signed
from hivenode.agent.rpc import request
from hivenode.planner.crdt import QDelta
from hivenode.planner.qtable import QTable, read_legacy_pickle
from hivenode.planner.state import Action, State
from hivenode.protocol.errors import ProtocolError
from hivenode.protocol.ids import QTABLE_PROTOCOL, QTABLE_TOPIC
from hivenode.protocol.limits import Limits
from hivenode.protocol.message import Message

if TYPE_CHECKING:
    from hivenode.agent.host import SwarmHost

log = logging.getLogger(__name__)

SAVE_DELAY = 2.0
"""Merged deltas are written to disk at most this often."""
REPUBLISH_PERIOD = 600.0
PULL_TIMEOUT = 10.0
SNAPSHOT_LIMITS = Limits(max_header_bytes=16 * 1024**2, max_tensors=0, max_total_bytes=0)
"""A snapshot holds up to one ≤ 64 KiB signed delta per origin and table slice."""


def verify_delta(signed: bytes) -> tuple[str, bytes] | None:
    """(signer, payload) of a signed pubsub message on the Q-table topic, or None if forged."""
    message = verify_signed(signed, QTABLE_TOPIC)
    return (message.origin, message.data) if message is not None else None


class QTableGossip:
    """Keeps `qtable.json` in `state_dir` merged with the swarm's."""

    def __init__(self, state_dir: Path, peer_id: str) -> None:
        self.state_dir = state_dir
        self.table = QTable.load(state_dir, origin=peer_id, verify=verify_delta)
        self.merged = 0
        self.rejected = 0
        self._published = -1
        self._dirty = trio.Event()
        self._publish_now = trio.Event()

    # --- receiving -------------------------------------------------------------------------

    def on_gossip(self, message: GossipMessage) -> None:
        try:
            delta = QDelta.from_wire(message.data)
            changed = self.table.swarm.apply(
                delta, message.origin, now=time.time(), signed=message.signed
            )
        except ProtocolError as exc:  # DeltaRejected is one
            self.rejected += 1
            log.debug("Q-table delta from %s dropped: %s", message.origin, exc)
            return
        if changed:
            self.merged += changed
            self._dirty.set()

    async def serve_snapshot(self, request_message: Message, caller: str) -> Mapping[str, Any]:
        return {"messages": self.table.swarm.snapshot()}

    async def pull(self, host: Any, peer_id: str) -> int:
        """Merge `peer_id`'s snapshot; the number of cells that changed here."""
        reply = await request(
            host, peer_id, QTABLE_PROTOCOL, "snapshot", timeout=PULL_TIMEOUT, limits=SNAPSHOT_LIMITS
        )
        messages = reply.body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, bytes) for m in messages):
            raise RpcError("bad_reply", f"{peer_id} sent a malformed Q-table snapshot")
        changed, refused = self.table.swarm.apply_snapshot(messages, verify_delta)
        self.rejected += refused
        if changed:
            self.merged += changed
            self._dirty.set()
        return changed

    # --- our own experience ------------------------------------------------------------------

    def record(self, state: State, action: Action, reward: float) -> None:
        """A finished job's reward for (state, action); published and saved soon after."""
        self.table.update(state, action, reward)
        self._publish_now.set()
        self._dirty.set()

    def import_data(self, data: bytes) -> int:
        """Merge a file the operator chose (`hivenode qtable import`: a JSON export, or an old
        q_table.pkl read without unpickling) into the live table, gossip it and save it; the
        number of cells changed. PlannerError or ValueError when the file is refused."""
        changed = import_into(self.table, data)
        if changed:
            self._publish_now.set()
            self._dirty.set()
        return changed

    async def publish(self, swarm: SwarmHost, everything: bool = False) -> int:
        deltas = self.table.swarm.deltas(
            since=-1 if everything else self._published, now=time.time()
        )
        for delta in deltas:
            await swarm.pubsub.publish(QTABLE_TOPIC, delta.to_wire())
            self._published = max(self._published, delta.seq)
        return len(deltas)

    # --- background ------------------------------------------------------------------------

    async def run(self, swarm: SwarmHost) -> None:
        """Publish our changes as they happen and everything now and then; save merges."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._save_loop)
            next_full = time.monotonic() + REPUBLISH_PERIOD
            while True:
                with trio.move_on_at(trio.current_time() + max(0.0, next_full - time.monotonic())):
                    await self._publish_now.wait()
                self._publish_now = trio.Event()
                everything = time.monotonic() >= next_full
                await self.publish(swarm, everything)
                if everything:
                    next_full = time.monotonic() + REPUBLISH_PERIOD

    async def _save_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            await trio.to_thread.run_sync(self.table.save, self.state_dir)
            await trio.sleep(SAVE_DELAY)


def import_into(table: QTable, data: bytes) -> int:
    """Merge `data` (a JSON export or an old q_table.pkl) into `table`; the cells changed."""
    if data.lstrip().startswith(b"{"):
        return table.swarm.absorb(QTable.from_json(json.loads(data)).swarm)
    return table.import_values(read_legacy_pickle(data))
