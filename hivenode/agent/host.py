"""Builds and runs the libp2p host with GossipSub set up the way a swarm needs it.

py-libp2p pitfalls this module exists to handle (measured): the Pubsub and GossipSub services
must run before any dial or connect deadlocks; the default 120 s heartbeat stalls mesh
repair; spam protection drops a forwarder's messages over 10/s per topic, which a hub relaying
every origin's adverts exceeds at once; two of its stores grow with time unless bounded
here (the equivocation store, the seen-cache's sweeper thread).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hivenode.agent.settings import GossipSettings

if TYPE_CHECKING:
    from libp2p.crypto.keys import KeyPair

log = logging.getLogger(__name__)

GOSSIP_SEEN_TTL = 120
"""Seconds a node remembers a gossip message's id after its last copy (py-libp2p's default;
its sweeper forgets the id up to 60 s later), and its validation result."""
EQUIVOCATION_MEMORY = 2 * GOSSIP_SEEN_TTL
"""Seconds a node keeps a received message to compare a later copy with. py-libp2p checks
only copies its seen-cache let through, that is those that came once the cache forgot the
id, so this outlasts the cache; later still, hivenode's own records refuse a replayed or
reused (origin, seq)."""


@dataclass
class SwarmHost:
    """A running host and its pubsub stack (py-libp2p objects, untyped upstream)."""

    host: Any
    pubsub: Any
    gossipsub: Any

    @property
    def peer_id(self) -> str:
        return str(self.host.get_id())

    def listen_addrs(self) -> list[str]:
        """Our dialable addresses, each ending in /p2p/<peer id>."""
        return [str(a) for a in self.host.get_addrs()]


@asynccontextmanager
async def running_host(
    key_pair: KeyPair,
    listen_addrs: list[str],
    gossip: GossipSettings,
    psk: str | None = None,
    mdns: bool = False,
) -> AsyncIterator[SwarmHost]:
    """Start a host listening on `listen_addrs`, with pubsub services up before any dial.

    Its muxers are hivenode's (see hivenode.agent.muxer): wide yamux frames with hivenode
    peers, standard yamux sized to Noise with any other libp2p peer.
    """
    import multiaddr
    from libp2p import new_host
    from libp2p.pubsub.gossipsub import PROTOCOL_ID, GossipSub
    from libp2p.tools.anyio_service import background_trio_service

    from hivenode.agent.muxer import hivenode_muxer_options, install_hivenode_muxers

    host = new_host(
        key_pair=key_pair, psk=psk, enable_mDNS=mdns, muxer_opt=hivenode_muxer_options()
    )
    # before run(): every connection, the first included, must get the tuned muxers
    install_hivenode_muxers(host)
    router = GossipSub(
        [PROTOCOL_ID],
        degree=gossip.degree,
        degree_low=gossip.degree_low,
        degree_high=gossip.degree_high,
        heartbeat_interval=gossip.heartbeat_interval,
        max_messages_per_topic_per_second=gossip.max_messages_per_topic_per_second,
    )
    # a validation result is looked up only for a copy the seen-cache let through, one that
    # came after it forgot the id: results need not outlive ids (py-libp2p keeps them 300 s)
    pubsub = _hardened_pubsub_class()(
        host, router, seen_ttl=GOSSIP_SEEN_TTL, validation_cache_ttl=GOSSIP_SEEN_TTL
    )
    router.equivocation_detection = RecentMessages(EQUIVOCATION_MEMORY)
    addrs = [multiaddr.Multiaddr(a) for a in listen_addrs]
    try:
        async with (
            host.run(addrs),
            background_trio_service(pubsub),
            background_trio_service(router),
        ):
            await pubsub.wait_until_ready()
            # py-libp2p numbers gossip from the wall clock in seconds, one per message: a node
            # restarted soon after it published much would reuse numbers its peers still hold
            # as seen, and they would drop its messages; nanoseconds leave no overlap
            pubsub.counter = time.time_ns()
            yield SwarmHost(host, pubsub, router)
    finally:
        # the seen-cache's sweeper is a thread that nothing in py-libp2p stops: one more
        # thread, and its cache, for every host a process has stopped
        pubsub.seen_messages.stop()


class RecentMessages(dict[bytes, Any]):
    """GossipSub's `equivocation_detection`, forgetting a message `ttl` seconds after it came.

    py-libp2p keeps there every message a node receives, payload included, to notice an
    origin that sends two different messages under one sequence number, and prunes only
    above 1,000 per node (measured in a 20-node swarm: 0.7 MB more a minute, until every
    node held its 1,000); it has no option for this.
    """

    def __init__(self, ttl: float) -> None:
        super().__init__()
        self.ttl = ttl
        self._arrivals: deque[tuple[float, bytes]] = deque()

    def __setitem__(self, msg_key: bytes, message: Any) -> None:
        now = time.monotonic()
        while self._arrivals and now - self._arrivals[0][0] >= self.ttl:
            _, old = self._arrivals.popleft()
            self.pop(old, None)  # py-libp2p's own pruning may have dropped it already
        super().__setitem__(msg_key, message)
        self._arrivals.append((now, msg_key))


def _hardened_pubsub_class() -> Any:
    """py-libp2p's Pubsub, minus one way for a peer to kill the node.

    Its per-peer reader lets a protobuf DecodeError escape (measured: one malformed RPC on
    /meshsub/1.1.0 ended the whole process); here a peer's broken stream is reset and logged,
    and the node keeps serving everyone else.
    """
    from libp2p.pubsub.pubsub import Pubsub

    class HardenedPubsub(Pubsub):  # type: ignore[misc]
        async def continuously_read_stream(self, stream: Any) -> None:
            try:
                await super().continuously_read_stream(stream)
            except Exception as exc:
                peer = getattr(stream.muxed_conn, "peer_id", "?")
                log.warning(
                    "dropped the pubsub stream of %s: %s: %s", peer, type(exc).__name__, exc
                )
                with contextlib.suppress(Exception):
                    await stream.reset()

    return HardenedPubsub
