"""Per-peer, per-protocol token buckets: a flood is refused at once, other peers are not
slowed, and the table of buckets stays bounded."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
from swarm_helpers import local_swarm

from hivenode.agent import rpc
from hivenode.agent.errors import RpcError
from hivenode.agent.node import Node
from hivenode.agent.rate_limit import RateLimiter
from hivenode.agent.settings import RateLimitSettings, RequestRate, load_settings
from hivenode.protocol.ids import STATUS_PROTOCOL
from hivenode.protocol.message import Message

SESSION_PROTOCOL = "/hivenode/test-session/1.0.0"
"""Not in wire_guard's table: the data class, as any protocol a role above agent/ adds."""


def limits(**classes: dict[str, float]) -> dict[str, Any]:
    return {"security": {"rate_limits": classes}}


async def dialled(server: Node, *clients: Node) -> Node:
    for client in clients:
        await client.connect(server.swarm.listen_addrs()[0])
    return server


async def status_codes(client: Node, server: Node, count: int) -> list[str]:
    codes = []
    for _ in range(count):
        try:
            await rpc.request(
                client.swarm.host, server.peer_id, STATUS_PROTOCOL, "status", timeout=5
            )
            codes.append("ok")
        except RpcError as exc:
            codes.append(exc.code)
    return codes


async def test_a_flooding_peer_is_refused_while_another_is_served(tmp_path: Path) -> None:
    async with local_swarm(tmp_path) as start:
        server = await start("server", **limits(control={"per_s": 0.5, "burst": 5}))
        flooder = await start("flooder")
        polite = await start("polite")
        await dialled(server, flooder, polite)

        codes = await status_codes(flooder, server, 12)
        assert codes[:5] == ["ok"] * 5  # the burst
        assert codes[-1] == rpc.RATE_LIMITED
        assert codes.count(rpc.RATE_LIMITED) >= 5  # 0.5/s: a token or two more came meanwhile
        assert await status_codes(polite, server, 3) == ["ok"] * 3
        refused = server.metrics.value(
            "hivenode_messages_rejected_total", where=STATUS_PROTOCOL, reason=rpc.RATE_LIMITED
        )
        assert refused == codes.count(rpc.RATE_LIMITED)


async def test_a_session_stream_goes_on_after_a_refusal(tmp_path: Path) -> None:
    """A refusal is an answer like any other: the caller's pooled stream stays usable, and
    serves again once tokens are back (nothing was queued meanwhile)."""

    async def echo(request: Message, caller: str) -> Mapping[str, Any]:
        return {"n": request.body["n"]}

    async with local_swarm(tmp_path) as start:
        server = await start(
            "server",
            setup=lambda n: n.add_handler(SESSION_PROTOCOL, echo, session=True),
            **limits(data={"per_s": 5.0, "burst": 2}),
        )
        client = await dialled(await start("client"), server)
        pool = rpc.StreamPool(client.swarm.host, SESSION_PROTOCOL)
        try:
            outcomes = []
            for n in range(4):
                try:
                    reply = await pool.request(server.peer_id, "echo", {"n": n}, timeout=5)
                    outcomes.append(reply.body["n"])
                except RpcError as exc:
                    outcomes.append(exc.code)
            assert outcomes[:2] == [0, 1]
            assert rpc.RATE_LIMITED in outcomes[2:]
            await trio.sleep(0.5)  # two tokens at 5/s
            reply = await pool.request(server.peer_id, "echo", {"n": 9}, timeout=5)
            assert reply.body["n"] == 9
        finally:
            await pool.aclose()


def test_a_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    rate = RequestRate(per_s=2.0, burst=3)
    limiter = RateLimiter(idle_s=60, max_buckets=10, rates=[rate])
    key = ("peer", "/p")
    assert [limiter.admit(key, rate, now=0.0) for _ in range(3)] == [None, None, None]
    assert limiter.admit(key, rate, now=0.0) == pytest.approx(0.5)
    assert limiter.admit(key, rate, now=0.5) is None  # one token came back
    assert limiter.admit(key, rate, now=0.5) is not None
    assert [limiter.admit(key, rate, now=100.0) for _ in range(4)][:3] == [None] * 3


def test_buckets_of_peers_gone_quiet_are_forgotten() -> None:
    rate = RequestRate(per_s=10.0, burst=20)
    limiter = RateLimiter(idle_s=30, max_buckets=100_000, rates=[rate])
    for i in range(1000):
        limiter.admit((f"peer{i}", "/p"), rate, now=i * 0.01)
    assert len(limiter) == 1000
    limiter.admit(("newcomer", "/p"), rate, now=9.99 + 30.0)
    assert len(limiter) == 1  # every other peer has been quiet for 30 s


def test_the_table_never_holds_more_than_max_buckets() -> None:
    rate = RequestRate(per_s=10.0, burst=20)
    limiter = RateLimiter(idle_s=3600, max_buckets=100, rates=[rate])
    for i in range(5000):
        limiter.admit((f"peer{i}", "/p"), rate, now=0.0)
        assert len(limiter) <= 100
    # the busiest peers stay: a touched bucket is the most recently used
    limiter.admit(("peer4999", "/p"), rate, now=0.0)
    assert limiter.admit(("peer4999", "/p"), rate, now=0.0) is None


def test_forgetting_a_bucket_never_hands_out_tokens_early() -> None:
    """A bucket is kept at least until it would be full again, whatever idle_s says."""
    slow = RequestRate(per_s=0.1, burst=10)  # 100 s to fill
    limiter = RateLimiter(idle_s=1, max_buckets=10, rates=[slow])
    assert limiter.forget_after == pytest.approx(100.0)


def test_rate_limits_read_from_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        "[security.rate_limits]\ncontrol = { per_s = 5.0, burst = 10 }\nidle_s = 60.0\n"
    )
    settings = load_settings(config)
    assert settings.security.rate_limits.control.per_s == 5.0
    assert settings.security.rate_limits.job == RateLimitSettings().job
    assert settings.security.rate_limits.idle_s == 60.0
