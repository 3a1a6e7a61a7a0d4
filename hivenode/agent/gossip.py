"""Topic subscriptions that never lose messages to py-libp2p's quiet queue overflow.

py-libp2p hands each subscription a queue of 32 and drops what does not fit, silently, and
delivers a node's own messages back to it. A `TopicReader` drains its queue at once and
passes every message (the node's own included: it is the signed copy of what the node
published) to a synchronous handler, which must be quick.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hivenode.agent.host import SwarmHost
from hivenode.protocol.limits import MAX_GOSSIP_BYTES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GossipMessage:
    """A message as libp2p delivered it, after libp2p checked its signature."""

    origin: str
    """The peer that signed it (not the neighbour that forwarded it)."""
    data: bytes
    signed: bytes
    """The whole signed pubsub message, so it can be handed on and re-verified by others."""


GossipHandler = Callable[[GossipMessage], None]


async def drain_topic(swarm: SwarmHost, topic: str, handler: GossipHandler) -> None:
    """Subscribe to `topic` and feed every message to `handler`, forever."""
    from libp2p.peer.id import ID

    subscription: Any = await swarm.pubsub.subscribe(topic)
    async for message in subscription:
        origin = ID(message.from_id)
        if len(message.data) > MAX_GOSSIP_BYTES:
            log.warning("dropped a %d-byte message on %s from %s", len(message.data), topic, origin)
            continue
        handler(GossipMessage(str(origin), message.data, message.SerializeToString()))


def peek_signed(signed: bytes, topic: str) -> tuple[GossipMessage, object] | None:
    """Parse a signed pubsub message without checking its signature (cheap)."""
    from libp2p.peer.id import ID
    from libp2p.pubsub.pb import rpc_pb2

    try:
        message = rpc_pb2.Message.FromString(signed)
        origin = str(ID(message.from_id))
    except Exception:
        return None
    if topic not in message.topicIDs or not message.signature:
        return None
    return GossipMessage(origin, message.data, signed), message


def verify_signed(signed: bytes, topic: str) -> GossipMessage | None:
    """Re-check a pubsub message handed on by a third party: its signature and its topic."""
    from libp2p.pubsub.validators import signature_validator

    peeked = peek_signed(signed, topic)
    if peeked is None:
        return None
    try:
        valid = signature_validator(peeked[1])
    except Exception:
        valid = False
    return peeked[0] if valid else None
