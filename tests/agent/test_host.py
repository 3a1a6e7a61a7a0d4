"""The host's bounds on py-libp2p's gossip stores: equivocation memory, the seen-cache thread."""

from __future__ import annotations

import threading
import time
from typing import Any

import trio

from hivenode.agent.host import RecentMessages, running_host
from hivenode.agent.settings import GossipSettings

TOPIC = "/hivenode/test-equivocation"


def router_with(store: RecentMessages) -> Any:
    from libp2p.pubsub.gossipsub import PROTOCOL_ID, GossipSub

    router = GossipSub([PROTOCOL_ID], degree=6, degree_low=4, degree_high=12)
    router.equivocation_detection = store
    return router


def message(seqno: int, data: bytes) -> Any:
    from libp2p.pubsub.pb import rpc_pb2

    return rpc_pb2.Message(
        from_id=b"origin", seqno=seqno.to_bytes(8, "big"), data=data, topicIDs=[TOPIC]
    )


def test_an_equivocating_origin_is_caught_within_the_ttl() -> None:
    router = router_with(RecentMessages(ttl=60.0))
    assert router._check_equivocation(message(1, b"first"))
    assert router._check_equivocation(message(1, b"first")), "a plain duplicate is no lie"
    assert not router._check_equivocation(message(1, b"second"))


def test_messages_are_forgotten_after_the_ttl() -> None:
    store = RecentMessages(ttl=0.05)
    router = router_with(store)
    for seqno in range(100):
        router._check_equivocation(message(seqno, b"x" * 1000))
    time.sleep(0.06)
    router._check_equivocation(message(1000, b"late"))
    assert list(store) == [message(1000, b"").from_id + (1000).to_bytes(8, "big")]


def test_py_libp2p_pruning_its_store_is_harmless() -> None:
    store = RecentMessages(ttl=0.05)
    router = router_with(store)
    for seqno in range(1100):
        router._check_equivocation(message(seqno, b"x"))
    router._periodic_security_cleanup()  # drops all but the newest 500
    time.sleep(0.06)
    router._check_equivocation(message(5000, b"late"))
    assert len(store) == 1


async def test_a_stopped_host_leaves_no_thread_behind() -> None:
    from libp2p.crypto.ed25519 import create_new_key_pair

    before = threading.active_count()
    for _ in range(3):
        async with running_host(
            create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"], GossipSettings()
        ) as swarm:
            assert isinstance(swarm.gossipsub.equivocation_detection, RecentMessages)
            await trio.lowlevel.checkpoint()
    assert threading.active_count() == before
