"""Nodes on real libp2p hosts: joining, hostile input, forged adverts, expiry."""

from __future__ import annotations

import struct
from pathlib import Path

import msgpack
import pytest
import trio
from swarm_helpers import local_swarm, wait_until

from hivenode.agent.errors import RpcError
from hivenode.agent.node import Node
from hivenode.agent.rpc import StreamAdapter, request
from hivenode.protocol.advert import Advert
from hivenode.protocol.ids import ADVERTS_TOPIC, PEER_TABLE_PROTOCOL, STATUS_PROTOCOL
from hivenode.protocol.message import Message
from hivenode.protocol.streams import read_message


async def test_joiners_converge_through_one_bootstrap_node(tmp_path: Path) -> None:
    async with local_swarm(tmp_path) as start:
        hub = await start("hub")
        leaves = [await start(f"leaf{i}", bootstrap=[hub]) for i in range(3)]
        everyone = [hub, *leaves]
        await wait_until(
            lambda: all(len(n.peer_table) == 3 for n in everyone), 15, "every table holds all 4"
        )
        entry = leaves[0].peer_table.get(leaves[2].peer_id)
        assert entry is not None
        assert entry.advert.hardware.cpu.logical_cores > 0
        assert entry.advert.addrs and entry.advert.addrs[0].endswith(leaves[2].peer_id)


async def test_remote_status_travels_through_the_swarm(tmp_path: Path) -> None:
    async with local_swarm(tmp_path) as start:
        hub = await start("hub")
        leaf = await start("leaf", bootstrap=[hub])
        status = await leaf.remote_status(hub.peer_id)
        assert status["peer_id"] == hub.peer_id
        assert {c["check"] for c in status["health"]} >= {"swarm", "adverts"}
        rtt = await leaf.measure_rtt(hub.peer_id)
        assert rtt is not None and 0 < rtt < 1


async def raw_exchange(client_node, server_id: str, protocol: str, payload: bytes) -> Message:  # type: ignore[no-untyped-def]
    """Send raw bytes on a fresh stream, half-close, read whatever the server answers."""
    from libp2p.custom_types import TProtocol
    from libp2p.peer.id import ID

    stream = await client_node.swarm.host.new_stream(
        ID.from_base58(server_id), [TProtocol(protocol)]
    )
    with trio.fail_after(10):
        await stream.write(payload)
        await stream.close_write()
        reply = await read_message(StreamAdapter(stream))
    await stream.close()
    return reply


def rejected(node: Node, where: str, reason: str) -> float:
    return node.metrics.value("hivenode_messages_rejected_total", where=where, reason=reason)


def envelope(version: int = 1, method: str = "status", body: object = None) -> bytes:
    header = msgpack.packb(
        {"v": version, "t": method, "id": 9, "from": "x", "body": body or {}, "tensors": []}
    )
    return struct.pack(">I", len(header)) + header


HOSTILE_INPUTS = {
    "garbage": b"\x93\xff\x00garbage that is not a message at all",
    "truncated": envelope()[:-3],
    "header_length_over_limit": struct.pack(">I", 0xFFFFFFF0) + b"\x80",
    "wrong_version": envelope(version=99),
    "body_not_a_map": envelope(body=[1, 2, 3]),
    "tensors_where_none_allowed": struct.pack(">I", 60)
    + msgpack.packb(
        {
            "v": 1,
            "t": "status",
            "id": 1,
            "from": "x",
            "body": {},
            "tensors": [{"dtype": "<f4", "shape": [4], "nbytes": 16}],
        }
    ).ljust(60, b"\x00"),
    "unknown_method": envelope(method="format_disk"),
    "empty": b"",
}


@pytest.mark.parametrize("protocol", [STATUS_PROTOCOL, PEER_TABLE_PROTOCOL])
async def test_hostile_requests_get_error_replies_and_the_node_keeps_serving(
    tmp_path: Path, protocol: str
) -> None:
    async with local_swarm(tmp_path) as start:
        server = await start("server")
        client = await start("client", bootstrap=[server])
        for name, payload in HOSTILE_INPUTS.items():
            reply = await raw_exchange(client, server.peer_id, protocol, payload)
            assert reply.type == "error", name
            assert reply.body["code"] in {"bad_request", "unknown_method"}, name
            assert reply.body["message"], name
        counted = sum(rejected(server, protocol, r) for r in ("bad_request", "unknown_method"))
        assert counted == len(HOSTILE_INPUTS)
        method = "status" if protocol == STATUS_PROTOCOL else "peer_table"
        reply = await request(client.swarm.host, server.peer_id, protocol, method, timeout=5)
        assert reply.type == "ok"


async def test_unknown_method_is_a_typed_rpc_error(tmp_path: Path) -> None:
    async with local_swarm(tmp_path) as start:
        server = await start("server")
        client = await start("client", bootstrap=[server])
        with pytest.raises(RpcError) as caught:
            await request(client.swarm.host, server.peer_id, STATUS_PROTOCOL, "reboot", timeout=5)
        assert caught.value.code == "unknown_method"


async def test_adverts_forged_for_another_peer_are_rejected(tmp_path: Path) -> None:
    async with local_swarm(tmp_path) as start:
        hub = await start("hub")
        victim = await start("victim", bootstrap=[hub])
        liar = await start("liar", bootstrap=[hub])
        await wait_until(lambda: len(hub.peer_table) == 2, 15, "hub sees both")
        held = hub.peer_table.get(victim.peer_id)
        assert held is not None
        forged = held.advert.model_copy(update={"seq": held.advert.seq + 10, "roles": ()})
        await liar.swarm.pubsub.publish(ADVERTS_TOPIC, forged.to_wire())
        await wait_until(
            lambda: rejected(hub, "gossip", "forged") >= 1, 10, "the forged advert is counted"
        )
        still = hub.peer_table.get(victim.peer_id)
        assert still is not None and still.advert.seq == held.advert.seq


async def test_malformed_gossip_is_counted_and_ignored(tmp_path: Path) -> None:
    async with local_swarm(tmp_path) as start:
        hub = await start("hub")
        noisy = await start("noisy", bootstrap=[hub])
        await wait_until(lambda: noisy.peer_id in hub.peer_table, 15, "hub sees noisy")
        await noisy.swarm.pubsub.publish(ADVERTS_TOPIC, b"\xc1 not msgpack")
        await wait_until(
            lambda: rejected(hub, "gossip", "malformed") >= 1, 10, "the malformed advert is counted"
        )
        assert noisy.peer_id in hub.peer_table


async def test_peer_table_entries_with_broken_signatures_are_dropped(tmp_path: Path) -> None:
    async with local_swarm(tmp_path) as start:
        hub = await start("hub")
        honest = await start("honest", bootstrap=[hub])
        await wait_until(lambda: honest.peer_id in hub.peer_table, 15, "hub sees honest")
        signed = hub.state.signed_adverts[honest.peer_id]
        # a peer table that claims the honest node gave up all its roles
        advert = Advert.from_wire(_data_of(signed))
        tampered = _with_data(
            signed, advert.model_copy(update={"seq": advert.seq + 1, "roles": ()}).to_wire()
        )
        hub.state.signed_adverts[honest.peer_id] = tampered
        joiner = await start("joiner", bootstrap=[hub])
        await wait_until(
            lambda: rejected(joiner, "peer_table", "bad_signature") >= 1,
            10,
            "the tampered entry is counted",
        )
        entry = joiner.peer_table.get(honest.peer_id)
        assert entry is None or entry.advert.roles  # never the tampered copy


def _data_of(signed: bytes) -> bytes:
    from libp2p.pubsub.pb import rpc_pb2

    return bytes(rpc_pb2.Message.FromString(signed).data)


def _with_data(signed: bytes, data: bytes) -> bytes:
    from libp2p.pubsub.pb import rpc_pb2

    message = rpc_pb2.Message.FromString(signed)
    message.data = data
    return bytes(message.SerializeToString())


async def test_a_stopped_peer_leaves_the_table_within_its_ttl(tmp_path: Path) -> None:
    async with local_swarm(tmp_path) as start:
        hub = await start("hub", advert_period=1, advert_ttl_periods=2)
        leaf = await start("leaf", bootstrap=[hub], advert_period=1, advert_ttl_periods=2)
        await wait_until(lambda: leaf.peer_id in hub.peer_table, 15, "hub sees leaf")
        entry = hub.peer_table.get(leaf.peer_id)
        assert entry is not None
        ttl = entry.advert.ttl
        leaf.stop()
        await leaf.wait_stopped()
        stopped = trio.current_time()
        await wait_until(lambda: leaf.peer_id not in hub.peer_table, ttl + 3, "leaf expires")
        assert trio.current_time() - stopped <= ttl + 3


async def test_private_swarm_admits_only_nodes_with_its_key(tmp_path: Path) -> None:
    key, other = "11" * 32, "22" * 32
    async with local_swarm(tmp_path) as start:
        hub = await start("hub", psk=key)
        member = await start("member", bootstrap=[hub], psk=key)
        outsider = await start("outsider", bootstrap=[hub], psk=other)
        await wait_until(lambda: member.peer_id in hub.peer_table, 15, "the member joins")
        with trio.fail_after(15):
            await outsider.joined.wait()
        assert member.state.bootstrap_reached == {hub.peer_id}
        assert outsider.state.bootstrap_reached == set()
        assert outsider.peer_id not in hub.peer_table


async def test_a_malformed_pubsub_rpc_does_not_take_the_node_down(tmp_path: Path) -> None:
    from libp2p.custom_types import TProtocol
    from libp2p.peer.id import ID
    from libp2p.pubsub.gossipsub import PROTOCOL_ID

    async with local_swarm(tmp_path) as start:
        hub = await start("hub")
        attacker = await start("attacker", bootstrap=[hub])
        friend = await start("friend", bootstrap=[hub])
        stream = await attacker.swarm.host.new_stream(
            ID.from_base58(hub.peer_id), [TProtocol(PROTOCOL_ID)]
        )
        garbage = b"\xff\xff\xff\xff not a protobuf RPC at all"
        await stream.write(bytes([len(garbage)]) + garbage)
        await trio.sleep(0.5)
        status = await friend.remote_status(hub.peer_id)
        assert status["peer_id"] == hub.peer_id
        await wait_until(lambda: friend.peer_id in hub.peer_table, 15, "gossip still flows")


async def test_a_closed_connection_left_in_the_swarm_records_is_replaced(tmp_path: Path) -> None:
    from libp2p.peer.id import ID

    async with local_swarm(tmp_path) as start:
        hub = await start("hub")
        leaf = await start("leaf", bootstrap=[hub])
        await request(leaf.swarm.host, hub.peer_id, STATUS_PROTOCOL, "status", timeout=5)
        network, peer = leaf.swarm.host.get_network(), ID.from_base58(hub.peer_id)
        (connection,) = network.connections[peer]
        await connection.close()
        # what py-libp2p 0.8 is left with when a connection closes under it unnoticed (the
        # loser of a simultaneous dial): the closed one still listed, so it never dials
        network.connections[peer] = [connection]
        reply = await request(leaf.swarm.host, hub.peer_id, STATUS_PROTOCOL, "status", timeout=5)
        assert reply.body["peer_id"] == hub.peer_id
        assert all(not c.is_closed for c in network.connections[peer])
