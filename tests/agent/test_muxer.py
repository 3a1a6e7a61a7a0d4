"""hivenode's muxers on real hosts: wide yamux between hivenode peers, standard with the rest."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from swarm_helpers import local_swarm

from hivenode.agent.host import running_host
from hivenode.agent.muxer import (
    HIVENODE_MAX_FRAME_BYTES,
    HIVENODE_YAMUX,
    MPLEX,
    NOISE_SIZED_MAX_FRAME_BYTES,
    YAMUX,
    YAMUX_PROTOCOL,
    _with_globals,
    frame_stats_of,
    muxer_of,
)
from hivenode.agent.settings import GossipSettings

SINK_PROTOCOL = "/hivenode/test-sha256-sink/1.0.0"
PAYLOAD_BYTES = 8 * 1024 * 1024
WRITE_BYTES = 2 * 1024 * 1024
"""What the wire layer hands a stream at once is 1-4 MiB; frames are cut from such writes."""
UPSTREAM_FRAME_BYTES = 64 * 1024
"""py-libp2p 0.8.1's yamux frame, header included (its MAX_MESSAGE_SIZE)."""
EXCHANGE_TIMEOUT = 60.0


class Peer:
    """A host with a sink that answers the sha256 of everything a stream sent it."""

    def __init__(self, host: Any) -> None:
        from libp2p.custom_types import TProtocol

        self.host = host
        self.received_on: list[Any] = []  # the streams the sink served, for their muxers
        host.set_stream_handler(TProtocol(SINK_PROTOCOL), self._sink)

    @property
    def addr(self) -> str:
        return str(self.host.get_addrs()[0])

    async def _sink(self, stream: Any) -> None:
        from libp2p.network.stream.exceptions import StreamEOF

        self.received_on.append(stream)
        digest = hashlib.sha256()
        while True:
            try:
                chunk = await stream.read(WRITE_BYTES)
            except StreamEOF:
                break
            if not chunk:
                break
            digest.update(chunk)
        await stream.write(digest.digest())
        await stream.close()

    async def connect(self, other: Peer) -> None:
        import multiaddr
        from libp2p.peer.peerinfo import info_from_p2p_addr

        await self.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(other.addr)))

    async def send(self, other: Peer, payload: bytes) -> Any:
        """Send `payload` to `other`'s sink in WRITE_BYTES writes; check the digest it answers;
        return the stream."""
        from libp2p.custom_types import TProtocol

        with trio.fail_after(EXCHANGE_TIMEOUT):
            stream = await self.host.new_stream(other.host.get_id(), [TProtocol(SINK_PROTOCOL)])
            for start in range(0, len(payload), WRITE_BYTES):
                await stream.write(payload[start : start + WRITE_BYTES])
            await stream.close_write()
            answer = await stream.read(32)
            await stream.close()
        assert answer == hashlib.sha256(payload).digest(), "the bytes arrived altered"
        return stream


@asynccontextmanager
async def hivenode_peer() -> AsyncIterator[Peer]:
    """A host exactly as a hivenode node runs it."""
    from libp2p.crypto.ed25519 import create_new_key_pair

    async with running_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"], GossipSettings()) as h:
        yield Peer(h.host)


@asynccontextmanager
async def plain_peer(muxer: str = "default") -> AsyncIterator[Peer]:
    """A py-libp2p host with none of hivenode's code: its defaults, or mplex alone."""
    import multiaddr
    from libp2p import new_host
    from libp2p.stream_muxer.mplex.mplex import MPLEX_PROTOCOL_ID, Mplex

    host = new_host() if muxer == "default" else new_host(muxer_opt={MPLEX_PROTOCOL_ID: Mplex})
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        yield Peer(host)


def random_payload(seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(PAYLOAD_BYTES)


async def test_hivenode_peers_negotiate_wide_yamux_and_move_8_mib_intact() -> None:
    async with hivenode_peer() as a, hivenode_peer() as b:
        await a.connect(b)
        sent_on = await a.send(b, random_payload(1))

        assert muxer_of(sent_on) == HIVENODE_YAMUX
        assert muxer_of(b.received_on[0]) == HIVENODE_YAMUX
        sent, received = frame_stats_of(sent_on), frame_stats_of(b.received_on[0])
        assert sent is not None and received is not None
        # frames wider than any standard yamux frame left one end and were read by the other
        assert UPSTREAM_FRAME_BYTES < sent.largest_sent <= HIVENODE_MAX_FRAME_BYTES
        assert UPSTREAM_FRAME_BYTES < received.largest_received <= HIVENODE_MAX_FRAME_BYTES

        # the peer that accepted the connection sends wide frames too
        back_on = await b.send(a, random_payload(2))
        stats = frame_stats_of(back_on)
        assert stats is not None and stats.largest_sent > UPSTREAM_FRAME_BYTES


@pytest.mark.parametrize("dialer", ["hivenode", "plain"])
async def test_plain_libp2p_peer_gets_standard_yamux_both_ways(dialer: str) -> None:
    from libp2p.stream_muxer.yamux.yamux import Yamux

    async with hivenode_peer() as ours, plain_peer() as theirs:
        if dialer == "hivenode":
            await ours.connect(theirs)
        else:
            await theirs.connect(ours)

        ours_sent_on = await ours.send(theirs, random_payload(3))
        theirs_sent_on = await theirs.send(ours, random_payload(4))

        for stream in (ours_sent_on, theirs_sent_on, *ours.received_on, *theirs.received_on):
            assert muxer_of(stream) == YAMUX
            assert stream.muxed_conn.negotiated_muxer_protocol == YAMUX_PROTOCOL
        stats = frame_stats_of(ours_sent_on)
        assert stats is not None
        # every frame we sent fits one Noise message, and the bulk of them filled it
        assert stats.largest_sent == NOISE_SIZED_MAX_FRAME_BYTES
        # the plain peer kept py-libp2p's own yamux and frames: nothing of ours leaked into it
        assert type(theirs_sent_on.muxed_conn) is Yamux
        assert frame_stats_of(theirs_sent_on) is None
        assert stats.largest_received == UPSTREAM_FRAME_BYTES


async def test_mplex_only_peer_still_connects() -> None:
    async with hivenode_peer() as ours, plain_peer("mplex") as theirs:
        await ours.connect(theirs)
        sent_on = await ours.send(theirs, random_payload(5))
        await theirs.send(ours, random_payload(6))
        assert muxer_of(sent_on) == MPLEX
        assert frame_stats_of(sent_on) is None


async def test_nodes_requests_travel_on_the_hivenode_muxer(tmp_path: Path) -> None:
    from libp2p.peer.id import ID

    async with local_swarm(tmp_path) as start:
        hub = await start("hub")
        leaf = await start("leaf", bootstrap=[hub])
        status = await leaf.remote_status(hub.peer_id)
        assert status["peer_id"] == hub.peer_id
        connections = leaf.swarm.host.get_network().get_connections(ID.from_base58(hub.peer_id))
        assert connections and {muxer_of(c) for c in connections} == {HIVENODE_YAMUX}


def test_an_override_that_upstream_no_longer_reads_refuses_to_import() -> None:
    """Were py-libp2p to stop reading a constant we override, frames would silently go back to
    64 KiB; the module must refuse to load instead."""

    def reads_no_constant() -> int:
        return 1

    with pytest.raises(ImportError, match="MAX_MESSAGE_SIZE"):
        _with_globals(reads_no_constant, MAX_MESSAGE_SIZE=1)
