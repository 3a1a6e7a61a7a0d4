"""A Flower `Grid` whose messages travel over the swarm, to trainers named by peer id.

Flower strategies are synchronous: `Strategy.start(grid=...)` runs in a worker thread and
calls this Grid, which hands each send to the node's trio loop (`trio.from_thread`) and waits
for the replies there. Every send is bounded: a trainer that is gone, fails or outlives the
timeout yields a Flower error reply, never a hang and never a silently missing reply.

Node ids are `node_id_of(peer_id)`. Flower's strategies leave `group_id` empty, so the
round is the Grid's `round`, which the runner advances after each round; it goes out as the
messages' `group_id`. A job resumed from a checkpoint restarts Flower's count at 1:
`round_offset` shifts the config's "server-round" so trainers keep counting where the job was.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from flwr.app import Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from hivenode.agent.errors import RpcError
from hivenode.agent.flower_wire import decode_flower, encode_flower, node_id_of
from hivenode.agent.node import Node
from hivenode.agent.rpc import StreamPool
from hivenode.agent.update_codec import decode_update_off_loop
from hivenode.aggregator.update_screen import screen_train_replies
from hivenode.protocol.errors import ProtocolError
from hivenode.protocol.ids import FL_PROTOCOL
from hivenode.protocol.message import Message as WireMessage

log = logging.getLogger(__name__)

STRAGGLER_DROPPED = ErrorCode.REPLY_MESSAGE_UNAVAILABLE
"""The code of the error reply that replaces a straggler's partial work under `drop`."""
UPDATE_REJECTED = ErrorCode.MOD_FAILED_PRECONDITION
"""The code of the error reply that replaces a train reply the update screen rejected."""
CONNECT_GRACE = 5.0
"""Seconds past the round deadline allowed for opening a stream and sending the message."""


class GridError(Exception):
    """The job cannot go on over this Grid: too few trainers left."""


@dataclass
class RoundTraffic:
    """What one round's messages of one type cost on the wire, and who answered how."""

    sent: int = 0
    replied: int = 0
    failed: int = 0
    stragglers: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    started: float = field(default_factory=time.monotonic)
    compute_s: float = 0.0
    """The longest time a trainer said it spent in the app (queueing for a worker included)."""
    errors: dict[str, str] = field(default_factory=dict)
    """Peer id → why its reply was an error."""
    rejected: dict[str, str] = field(default_factory=dict)
    """Peer id → why the update screen rejected its train reply (no longer in `replied`)."""
    selected: list[int] = field(default_factory=list)
    """Partition ids (the trainers' indexes in the job) the strategy sent messages to."""


@dataclass(frozen=True)
class JobAddress:
    """What every request of a job says besides the Flower message."""

    job_id: str
    app: str
    run_config: Mapping[str, bool | int | float | str] = field(default_factory=dict)


class SwarmGrid(Grid):
    """Flower's Grid over libp2p streams to the job's trainers (peer ids)."""

    def __init__(
        self,
        node: Node,
        address: JobAddress,
        trainers: Sequence[str],
        token: trio.lowlevel.TrioToken,
        nursery: trio.Nursery,
        *,
        run_id: int,
        round_offset: int = 0,
        drop_stragglers: bool = False,
        local: Callable[[WireMessage, str], Any] | None = None,
        seed: int = 0,
        min_available: int = 1,
        short_wait_s: float = 60.0,
        screen_factor: float | None = None,
    ) -> None:
        self._node = node
        self._address = address
        self._peers = {node_id_of(peer): peer for peer in trainers}
        self._partition = {peer: index for index, peer in enumerate(trainers)}
        self._token = token
        self._nursery = nursery
        self._run = Run.create_empty(run_id)
        self._round_offset = round_offset
        self.round = round_offset + 1
        """The job's round in progress, as trainers and the traffic records see it."""
        self._drop_stragglers = drop_stragglers
        self._local = local
        self._seed = seed
        self._min_available = min_available
        self._short_wait_s = short_wait_s
        self._screen_factor = screen_factor
        """None: train replies go to the strategy unscreened; else `update_screen`'s factor."""
        self._short_since: float | None = None
        self._unreachable: set[str] = set()
        """Trainers a send could not reach: skipped until they advertise again."""
        self._seen_advert: dict[str, int] = {}
        self._streams = StreamPool(node.swarm.host, FL_PROTOCOL)
        """One stream per trainer for the whole job: opening one costs more than a round."""
        self._replies: dict[str, Message] = {}
        self._pending: dict[str, trio.CancelScope] = {}
        self._done = trio.Event()
        self.traffic: dict[tuple[int, str], RoundTraffic] = {}
        """(round, message type) → what it cost and who answered."""

    # --- Grid ------------------------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """The job's trainers that the node still knows (its peer table, or itself).

        Flower's `sample_nodes` calls this and then samples with the global `random`, and
        loops forever while fewer than its minimum are available. So the global `random` is
        seeded here from the job's seed and round (a job's selection is reproducible, even
        with other tasks drawing from `random`), and a job short of trainers for longer than
        `short_wait_s` fails with GridError instead of waiting for ever.
        """
        table, own = self._node.peer_table, self._node.peer_id
        self._forgive_readvertised()
        ids = [
            node_id
            for node_id, peer in self._peers.items()
            if (peer in table or peer == own) and peer not in self._unreachable
        ]
        self._check_enough(len(ids))
        random.seed(self._seed * 1_000_003 + self.round)
        return ids

    def _check_enough(self, available: int) -> None:
        if available >= self._min_available:
            self._short_since = None
            return
        now = time.monotonic()
        self._short_since = self._short_since or now
        if now - self._short_since > self._short_wait_s:
            raise GridError(
                f"only {available} of the job's trainers are reachable, it needs "
                f"{self._min_available}"
            )

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids: list[str] = self._from_thread(self._push, list(messages), None)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = set(message_ids)
        return [self._replies.pop(mid) for mid in list(self._replies) if mid in wanted]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        sent = list(messages)
        ids = self._from_thread(self._push, sent, timeout)
        self._from_thread(self._wait, ids, timeout)
        replies = list(self.pull_messages(ids))
        if self._screen_factor is None:
            return replies
        return self._screen(sent, replies, self._screen_factor)

    def _screen(self, sent: list[Message], replies: list[Message], factor: float) -> list[Message]:
        """A round's train replies through the update screen (in the strategy's thread: the
        norms are CPU work); the rejected ones become error replies, counted per peer."""
        requests = {
            m.metadata.message_id: m for m in sent if m.metadata.message_type == MessageType.TRAIN
        }
        screened = [
            r for r in replies if not r.has_error() and r.metadata.reply_to_message_id in requests
        ]
        if not screened:
            return replies
        asked = [requests[r.metadata.reply_to_message_id] for r in screened]
        verdict = screen_train_replies(
            [m.content for m in asked], [r.content for r in screened], factor
        )
        traffic = self.traffic.setdefault((self.round, MessageType.TRAIN), RoundTraffic())
        swapped: dict[str, Message] = {}
        for index, reason in verdict.rejected.items():
            request = asked[index]
            peer = self._peers.get(request.metadata.dst_node_id, str(request.metadata.dst_node_id))
            traffic.replied -= 1
            traffic.rejected[peer] = reason
            self._node.metrics.updates_rejected.labels(peer=peer).inc()  # across jobs
            log.warning(
                "job %s round %d: rejected %s: %s", self._address.job_id, self.round, peer, reason
            )
            swapped[request.metadata.message_id] = Message(
                Error(UPDATE_REJECTED, f"update rejected: {reason}"), reply_to=request
            )
        return [swapped.get(r.metadata.reply_to_message_id, r) for r in replies]

    async def aclose(self) -> None:
        """Close the streams to the trainers (the job is over)."""
        await self._streams.aclose()

    # --- on the trio loop ------------------------------------------------------------------

    def _from_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    async def _push(self, messages: list[Message], timeout: float | None) -> list[str]:
        ids: list[str] = []
        for message in messages:
            # Flower leaves the message id to the transport (its SuperLink sets it likewise)
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            ids.append(message.metadata.message_id)
            scope = trio.CancelScope()
            self._pending[message.metadata.message_id] = scope
            self._nursery.start_soon(self._send, message, scope, timeout)
        return ids

    async def _wait(self, ids: list[str], timeout: float | None) -> None:
        with trio.move_on_after(timeout if timeout is not None else float("inf")):
            while any(mid in self._pending for mid in ids):
                await self._done.wait()
                self._done = trio.Event()
        for mid in ids:  # whoever is still out missed the deadline
            scope = self._pending.get(mid)
            if scope is not None:
                scope.cancel()
        while any(mid in self._pending for mid in ids):
            await self._done.wait()
            self._done = trio.Event()

    async def _send(self, message: Message, scope: trio.CancelScope, timeout: float | None) -> None:
        meta = message.metadata
        peer = self._peers.get(meta.dst_node_id)
        traffic = self.traffic.setdefault((self.round, meta.message_type), RoundTraffic())
        traffic.sent += 1
        if peer is not None:
            traffic.selected.append(self._partition[peer])
        # whatever happens — even the job being cancelled — the waiter gets a reply for it
        reply = Message(Error(ErrorCode.NODE_UNAVAILABLE, "the job stopped"), reply_to=message)
        try:
            reply = await self._reply_or_error(message, peer, scope, traffic, timeout)
        finally:
            self._replies[meta.message_id] = reply
            del self._pending[meta.message_id]
            self._done.set()

    async def _reply_or_error(
        self,
        message: Message,
        peer: str | None,
        scope: trio.CancelScope,
        traffic: RoundTraffic,
        timeout: float | None,
    ) -> Message:
        try:
            with scope:
                if peer is None:
                    raise RpcError(
                        "unknown_node", f"node {message.metadata.dst_node_id} is unknown"
                    )
                if peer in self._unreachable:
                    raise RpcError("unreachable", f"{peer} did not answer earlier in this job")
                reply = await self._exchange(message, peer, traffic, timeout)
            if scope.cancelled_caught:
                raise RpcError("timeout", "no reply before the round's deadline")
            return self._apply_straggler_policy(message, reply, traffic)
        except RpcError as exc:
            if exc.code == "unreachable" and peer is not None:
                self._mark_unreachable(peer)
            traffic.failed += 1
            traffic.errors[peer or str(message.metadata.dst_node_id)] = f"{exc.code}: {exc.message}"
            log.info("job %s: %s: %s", self._address.job_id, peer, exc)
            return Message(
                Error(ErrorCode.NODE_UNAVAILABLE, f"{exc.code}: {exc.message}"), reply_to=message
            )

    async def _exchange(
        self, message: Message, peer: str, traffic: RoundTraffic, timeout: float | None
    ) -> Message:
        body, tensors = encode_flower(message)
        self._shift_round(body)
        request_body = {
            "job": self._address.job_id,
            "app": self._address.app,
            "node_config": {
                "partition-id": self._partition[peer],
                "num-partitions": len(self._partition),
            },
            "run_config": dict(self._address.run_config),
            "message": body,
        }
        traffic.bytes_out += sum(t.nbytes for t in tensors)
        wire_tensors = tuple(tensors)
        limit = (timeout if timeout is not None else meta_ttl(message)) + CONNECT_GRACE
        if peer == self._node.peer_id and self._local is not None:
            wire = WireMessage("fl", 0, peer, request_body, wire_tensors)
            result = await self._local(wire, peer)
            reply_body, reply_tensors = result.body, result.tensors
        else:
            answer = await self._streams.request(
                peer, "fl", request_body, timeout=limit, tensors=wire_tensors
            )
            reply_body, reply_tensors = answer.body, answer.tensors
        traffic.bytes_in += sum(t.nbytes for t in reply_tensors)
        compute_s = reply_body.get("compute_s")
        if isinstance(compute_s, int | float):
            traffic.compute_s = max(traffic.compute_s, float(compute_s))
        try:
            meta = dict(reply_body["meta"])
            meta["group_id"] = message.metadata.group_id  # undo the shift for the strategy
            reply = decode_flower({**reply_body, "meta": meta}, reply_tensors)
            # a compressed update becomes the trainer's arrays again, rebuilt from ours
            reply = await decode_update_off_loop(message, reply)
        except (ProtocolError, KeyError, TypeError) as exc:
            raise RpcError("bad_reply", f"undecodable Flower reply: {exc}") from exc
        if reply.metadata.reply_to_message_id != message.metadata.message_id:
            raise RpcError("bad_reply", "the reply answers another message")
        return reply

    def _apply_straggler_policy(
        self, message: Message, reply: Message, traffic: RoundTraffic
    ) -> Message:
        """Count the reply; a straggler's partial work is kept or, under `drop`, refused."""
        peer = self._peers[message.metadata.dst_node_id]
        if reply.has_error():
            traffic.failed += 1
            traffic.errors[peer] = reply.error.reason or ""
            return reply
        if not _is_partial(reply):
            traffic.replied += 1
            return reply
        traffic.stragglers += 1
        # a straggler that took no step would only pull the mean back to the old model
        if not self._drop_stragglers and _metric(reply, "local-steps") != 0:
            traffic.replied += 1
            return reply
        return Message(
            Error(STRAGGLER_DROPPED, "straggler: partial work dropped by the job's policy"),
            reply_to=message,
        )

    def _mark_unreachable(self, peer: str) -> None:
        entry = self._node.peer_table.get(peer)
        self._unreachable.add(peer)
        self._seen_advert[peer] = entry.advert.seq if entry else -1

    def _forgive_readvertised(self) -> None:
        """A trainer that advertised again since it failed is back (it restarted)."""
        for peer in list(self._unreachable):
            entry = self._node.peer_table.get(peer)
            if entry is not None and entry.advert.seq > self._seen_advert.get(peer, -1):
                self._unreachable.discard(peer)

    def _shift_round(self, body: dict[str, Any]) -> None:
        if not body["meta"]["group_id"]:  # Flower's strategies leave it empty
            body["meta"]["group_id"] = str(self.round)
        if not self._round_offset:
            return
        for _name, kind, value in body.get("records", []):
            if kind == "config" and isinstance(value.get("server-round"), int):
                value["server-round"] += self._round_offset


def meta_ttl(message: Message) -> float:
    return float(message.metadata.ttl)


def _metric(reply: Message, key: str) -> Any:
    for record in reply.content.metric_records.values():
        if key in record:
            return record[key]
    return None


def _is_partial(reply: Message) -> bool:
    return any(record.get("partial") == 1 for record in reply.content.metric_records.values())
