"""The node agent: one libp2p host, its adverts, its peer table and its request handlers."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from hivenode import __version__
from hivenode.agent import rpc
from hivenode.agent.adverts import ADVERT_CHECK_PERIOD, advert_period, sequence_numbers
from hivenode.agent.blob_transfer import BLOB_PROTOCOL, BlobResolver, blob_handler
from hivenode.agent.errors import RpcError
from hivenode.agent.gossip import GossipMessage, drain_topic, peek_signed, verify_signed
from hivenode.agent.hardware import HardwareProbe, probe_load
from hivenode.agent.host import SwarmHost, running_host
from hivenode.agent.metrics import Metrics
from hivenode.agent.node_views import status_view
from hivenode.agent.peer_table import PeerTable, Update
from hivenode.agent.settings import Settings
from hivenode.agent.wire_guard import WireGuard
from hivenode.protocol.advert import Advert, Hardware, Role
from hivenode.protocol.errors import ProtocolError
from hivenode.protocol.ids import (
    ADVERTS_TOPIC,
    BUILTIN_APP,
    FL_PROTOCOL,
    PEER_TABLE_PROTOCOL,
    QTABLE_PROTOCOL,
    QTABLE_TOPIC,
    STATUS_PROTOCOL,
)
from hivenode.protocol.limits import CONTROL_LIMITS, DEFAULT_LIMITS, Limits
from hivenode.protocol.message import Message

if TYPE_CHECKING:
    from libp2p.crypto.keys import KeyPair

    from hivenode.agent.qtable_gossip import QTableGossip
    from hivenode.agent.trainer import Trainer

log = logging.getLogger(__name__)

PEER_TABLE_LIMITS = Limits(max_header_bytes=16 * 1024**2, max_tensors=0, max_total_bytes=0)
"""A peer table of a few thousand adverts; still bounded so a hostile peer cannot balloon it."""

MIN_ADVERT_SPACING = 1.0
"""No origin's adverts are accepted, nor ours sent, more often than this."""
MESH_WAIT = 5.0
"""How long a joiner waits for a gossip mesh before its first advert (else it reaches nobody)."""
MESH_RETRY = 2.0
"""An advert sent while the mesh was still empty reached nobody: the next goes out this soon."""
BOOTSTRAP_RETRY = 10.0
"""Seconds between checks that a connection is left (else the bootstrap peers are re-dialled)."""
DIAL_ADDR_TTL = 120
"""Seconds libp2p keeps a peer's advertised addresses after we dialled it."""
QTABLE_PULL_PERIOD = 600.0
"""Seconds between pulls of a peer's Q-table snapshot (gossip carries changes between)."""
FIRST_PULL_DELAY = 5.0
"""The first anti-entropy pull after joining, and the pace while pulls bring news."""


@dataclass
class NodeState:
    """What the node knows of itself between loop iterations."""

    started_at: float = field(default_factory=time.time)
    last_advert: Advert | None = None
    last_advert_at: float = 0.0
    bootstrap_reached: set[str] = field(default_factory=set)
    signed_adverts: dict[str, bytes] = field(default_factory=dict)
    """Origin → the signed gossip message that carried its newest advert, ours included."""


class Node:
    """A hivenode agent. `run()` serves until `stop()` or cancellation."""

    def __init__(
        self,
        settings: Settings,
        key_pair: KeyPair,
        probe: HardwareProbe,
        metrics: Metrics | None = None,
        blob_resolver: BlobResolver | None = None,
        trainer: Trainer | None = None,
        qtable: QTableGossip | None = None,
    ) -> None:
        from hivenode.agent.identity import peer_id_of

        self.settings = settings
        self.key_pair = key_pair
        self.peer_id = peer_id_of(key_pair)
        self.probe = probe
        self.metrics = metrics or Metrics()
        self.blob_resolver = blob_resolver
        self.trainer = trainer if Role.TRAINER in settings.roles else None
        self.qtable = qtable
        """The swarm's Q-table as this node holds it; None: the node takes no part."""
        self._extra_handlers: list[tuple[str, rpc.Handler, Limits, float | None, bool]] = []
        self.advert_hooks: list[Callable[[Advert], Advert]] = []
        """Roles living above `agent/` (inference workers...) add what their adverts say."""
        self.peer_table = PeerTable(self.peer_id)
        self.state = NodeState()
        self.running_tasks = 0
        self._seq = sequence_numbers()
        self._swarm: SwarmHost | None = None
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self.joined = trio.Event()
        """Set once the first round of bootstrap dials has finished, reached or not."""
        self._advert_now = trio.Event()
        self.hardware: Hardware | None = None
        """The last hardware probe, refreshed before each advert."""
        self._nursery: trio.Nursery | None = None
        self.wire_guard = WireGuard(self.peer_id, settings.security, trio.current_time)
        """The allow-list and rate limits every request from a peer passes (rpc.RpcServer)."""

    def add_handler(
        self,
        protocol_id: str,
        handler: rpc.Handler,
        limits: Limits = CONTROL_LIMITS,
        timeout: float | None = None,
        session: bool = False,
    ) -> None:
        """Serve `protocol_id` too (see `RpcServer.register`); call before `run`."""
        self._extra_handlers.append((protocol_id, handler, limits, timeout, session))

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def swarm(self) -> SwarmHost:
        if self._swarm is None:
            raise RuntimeError("the node is not running")
        return self._swarm

    @property
    def running(self) -> bool:
        return self._swarm is not None

    def stop(self) -> None:
        self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start the host, join the swarm, advertise; `task_status.started()` once listening."""
        try:
            await self._run(task_status)
        except* Exception as group:
            if not self._stop.is_set():
                raise
            # py-libp2p's services race each other on the way down ("Nursery is closed to
            # new arrivals"); once we chose to stop, that is noise, not a failure
            log.debug("libp2p raised while shutting down: %r", group.exceptions)
        finally:
            self._swarm = None
            self._stopped.set()

    async def _run(self, task_status: Any) -> None:
        self.hardware = await trio.to_thread.run_sync(self.probe.refresh)
        async with running_host(
            self.key_pair,
            self.settings.listen_addrs,
            self.settings.gossip,
            psk=self.settings.psk,
            mdns=self.settings.mdns,
        ) as swarm:
            self._swarm = swarm
            self._register_handlers()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(drain_topic, swarm, ADVERTS_TOPIC, self._on_advert)
                nursery.start_soon(self._expire_loop)
                nursery.start_soon(self._ping_loop)
                if self.qtable is not None:
                    nursery.start_soon(drain_topic, swarm, QTABLE_TOPIC, self.qtable.on_gossip)
                task_status.started(self)
                await self._join()
                if self.qtable is not None:
                    nursery.start_soon(self.qtable.run, swarm)
                    nursery.start_soon(self._qtable_pull_loop, self.qtable)
                nursery.start_soon(self._advert_loop)
                nursery.start_soon(self._bootstrap_loop)
                nursery.start_soon(self._anti_entropy_loop)
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        log.info("node %s stopped", self.peer_id)

    # --- joining ---------------------------------------------------------------------------

    async def _qtable_pull_loop(self, qtable: QTableGossip) -> None:
        """Pull a connected peer's Q-table now (we just joined), then once a period: what
        gossip lost comes back."""
        while True:
            peers = sorted(self.connected_peers())
            if peers:
                peer = random.choice(peers)
                try:
                    changed = await qtable.pull(self.swarm.host, peer)
                    log.debug("pulled the Q-table of %s: %d cells changed", peer, changed)
                except RpcError as exc:
                    log.info("could not pull the Q-table of %s: %s", peer, exc)
            await trio.sleep(QTABLE_PULL_PERIOD * random.uniform(0.8, 1.2))

    async def _join(self) -> None:
        """Dial the bootstrap peers, fetch their peer tables, then announce ourselves."""
        async with trio.open_nursery() as nursery:
            for addr in self.settings.bootstrap_peers:
                nursery.start_soon(self._join_one, addr)
        if self.state.bootstrap_reached:
            await self._wait_for_mesh()
        self._advert_now.set()
        self.joined.set()

    async def _join_one(self, addr: str) -> None:
        try:
            peer_id = await self.connect(addr)
        except RpcError as exc:
            log.warning("bootstrap peer %s unreachable: %s", addr, exc.message)
            return
        self.state.bootstrap_reached.add(peer_id)
        try:
            merged = await self.fetch_peer_table(peer_id)
        except RpcError as exc:
            log.warning("could not fetch the peer table of %s: %s", peer_id, exc)
            return
        log.info("joined through %s: %d peers learned from its table", peer_id, merged)

    async def _wait_for_mesh(self) -> None:
        with trio.move_on_after(MESH_WAIT):
            while not self.swarm.gossipsub.mesh.get(ADVERTS_TOPIC):
                await trio.sleep(0.05)

    async def _bootstrap_loop(self) -> None:
        """Re-dial bootstrap peers when every connection to them is gone (a hub restarted)."""
        while True:
            await trio.sleep(BOOTSTRAP_RETRY * random.uniform(0.8, 1.2))
            if not self.settings.bootstrap_peers or self.connected_peers():
                continue
            log.info("no connections left; re-dialling the bootstrap peers")
            await self._join()

    async def _anti_entropy_loop(self) -> None:
        """Now and then pull a connected peer's table: whatever gossip lost (queues that
        overflowed, a mesh not formed yet) comes back. While pulls bring news or fail (the
        swarm is forming, the loop is busy) the next one comes soon, backing off up to a
        period; once they bring nothing, once a period."""
        await trio.sleep(FIRST_PULL_DELAY)
        retry = FIRST_PULL_DELAY
        while True:
            merged, failed = 0, False
            connected = self.connected_peers()
            # a connection whose advert we lack (its first one reached nobody, or we missed
            # it) holds at least that advert: ask it first
            unknown = [p for p in connected if p not in self.peer_table]
            if connected:
                peer_id = random.choice(unknown or connected)
                try:
                    merged = await self.fetch_peer_table(peer_id)
                except RpcError as exc:
                    failed = True
                    log.debug("anti-entropy pull from %s failed: %s", peer_id, exc)
            if merged:
                retry = FIRST_PULL_DELAY
            elif failed:
                retry = min(retry * 2, self.current_period())
            else:
                retry = self.current_period()
            await trio.sleep(retry * random.uniform(0.5, 1.0))

    async def connect(self, addr: str) -> str:
        """Dial a `/…/p2p/<id>` multiaddr; returns the peer id."""
        import multiaddr
        from libp2p.peer.peerinfo import info_from_p2p_addr

        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as exc:
            raise RpcError(
                "bad_address", f"{addr} is not a /…/p2p/<peer id> address: {exc}"
            ) from exc
        try:
            with trio.fail_after(self.settings.request_timeout):
                await self.swarm.host.connect(info)
        except trio.TooSlowError as exc:
            raise RpcError("timeout", f"dialling {addr} timed out") from exc
        except Exception as exc:
            raise RpcError("unreachable", f"{addr}: {type(exc).__name__}: {exc}") from exc
        return str(info.peer_id)

    def connected_peers(self) -> list[str]:
        return [str(p) for p in self.swarm.host.get_network().connections]

    # --- adverts ---------------------------------------------------------------------------

    def advertise_soon(self) -> None:
        """Announce now rather than at the next check: a role's advert hook says something
        new (an inference worker started or stopped serving a model)."""
        self._advert_now.set()

    def current_period(self) -> float:
        return advert_period(
            len(self.peer_table), self.settings.advert_period, self.settings.advert_deliveries_per_s
        )

    def build_advert(self, hardware: Hardware) -> Advert:
        advert = self._own_advert(hardware)
        for hook in self.advert_hooks:
            advert = hook(advert)
        return advert

    def _own_advert(self, hardware: Hardware) -> Advert:
        period = self.current_period()
        return Advert(
            origin=self.peer_id,
            seq=next(self._seq),
            timestamp=time.time(),
            ttl=period * self.settings.advert_ttl_periods,
            agent_version=__version__,
            roles=tuple(self.settings.roles),
            addrs=tuple(self.swarm.listen_addrs()),
            hardware=hardware,
            load=probe_load(self.running_tasks),
            datasets=self.trainer.datasets() if self.trainer else (),
            apps=tuple(sorted(k for k in self.trainer.apps if k != BUILTIN_APP))
            if self.trainer
            else (),
        )

    async def _advert_loop(self) -> None:
        """Announce at once when something changed, else once per (swarm-sized) period.

        It wakes at least when the next periodic advert is due, so a period shorter than
        ADVERT_CHECK_PERIOD is kept too (the TTL, a multiple of the period, depends on it).
        """
        next_due = 0.0
        while True:
            wait = min(ADVERT_CHECK_PERIOD, next_due - time.monotonic())
            with trio.move_on_after(max(0.0, wait)):
                await self._advert_now.wait()
            self._advert_now = trio.Event()
            self.hardware = await trio.to_thread.run_sync(self.probe.refresh)
            advert = self.build_advert(self.hardware)
            last = self.state.last_advert
            if last is not None and last.same_content(advert) and time.monotonic() < next_due:
                continue
            since = time.monotonic() - self.state.last_advert_at
            if since < MIN_ADVERT_SPACING:
                await trio.sleep(MIN_ADVERT_SPACING - since)
            await self.swarm.pubsub.publish(ADVERTS_TOPIC, advert.to_wire())
            self.state.last_advert, self.state.last_advert_at = advert, time.monotonic()
            self.metrics.adverts_sent.inc()
            period = self.current_period() * random.uniform(0.85, 1.0)
            if self.connected_peers() and not self.swarm.gossipsub.mesh.get(ADVERTS_TOPIC):
                period = MESH_RETRY  # published to nobody: say it again once a mesh exists
            next_due = time.monotonic() + period

    def _on_advert(self, message: GossipMessage) -> None:
        if message.origin == self.peer_id:  # our own, signed: what joiners fetch from us
            self.state.signed_adverts[self.peer_id] = message.signed
            return
        self._accept_advert(message, where="gossip")

    def _accept_advert(self, message: GossipMessage, where: str, age_s: float = 0.0) -> bool:
        try:
            advert = Advert.from_wire(message.data)
        except ProtocolError as exc:
            log.warning("bad advert from %s: %s", message.origin, exc.reason)
            self.metrics.reject(where, "malformed")
            return False
        if advert.origin != message.origin:
            log.warning("advert for %s signed by %s: forged", advert.origin, message.origin)
            self.metrics.reject(where, "forged")
            return False
        held = self.peer_table.get(advert.origin)
        if held and time.time() - held.received_at < MIN_ADVERT_SPACING and where == "gossip":
            self.metrics.reject(where, "rate")
            return False
        outcome = self.peer_table.offer(advert, age_s=age_s)
        if outcome in (Update.NEW, Update.NEWER):
            self.state.signed_adverts[advert.origin] = message.signed
            self.metrics.adverts_received.inc()
            self.metrics.peers.set(len(self.peer_table))
            if outcome is Update.NEW:
                log.info("peer joined: %s (%d peers)", advert.origin, len(self.peer_table))
                self._first_rtt(advert.origin)
            return True
        self.metrics.reject(where, outcome.value)
        return False

    def make_dialable(self, peer_id: str) -> None:
        """Give libp2p the advertised addresses of a peer we are about to dial.

        Only then: py-libp2p's auto-connector dials every peer in its peerstore until it
        holds about 200 connections, so filling the peerstore from adverts turned a 100-node
        swarm into a full mesh of 9,900 connections whose handshakes starved the event loop.
        """
        import multiaddr
        from libp2p.peer.id import ID

        entry = self.peer_table.get(peer_id)
        if entry is None:
            return
        addrs = []
        for text in entry.advert.addrs:
            try:
                addrs.append(multiaddr.Multiaddr(text.split("/p2p/")[0]))
            except Exception:
                continue
        if addrs:
            self.swarm.host.get_peerstore().add_addrs(ID.from_base58(peer_id), addrs, DIAL_ADDR_TTL)

    async def _expire_loop(self) -> None:
        while True:
            await trio.sleep(1.0)
            for peer_id in self.peer_table.expire():
                self.state.signed_adverts.pop(peer_id, None)
                log.info("peer left (advert expired): %s", peer_id)
            self.metrics.peers.set(len(self.peer_table))
            self.metrics.connections.set(len(self.connected_peers()))

    # --- RTT -------------------------------------------------------------------------------

    async def _ping_loop(self) -> None:
        """Measure RTT to the peers we hold connections to (dialling everyone costs N²)."""
        while True:
            await trio.sleep(self.settings.ping_period * random.uniform(0.8, 1.2))
            for peer_id in self.connected_peers():
                if peer_id in self.peer_table:
                    with trio.move_on_after(self.settings.request_timeout):
                        await self.measure_rtt(peer_id)

    def _first_rtt(self, peer_id: str) -> None:
        """A newcomer we hold a connection to gets its RTT now, not a ping period later."""
        if self._nursery is not None and peer_id in self.connected_peers():
            self._nursery.start_soon(self.measure_rtt, peer_id)

    async def measure_rtt(self, peer_id: str) -> float | None:
        """One libp2p ping round trip, in seconds (None when the peer does not answer)."""
        from libp2p.custom_types import TProtocol
        from libp2p.host.ping import ID as PING_ID
        from libp2p.host.ping import perform_ping_roundtrip
        from libp2p.peer.id import ID

        stream = None
        try:
            stream = await self.swarm.host.new_stream(ID.from_base58(peer_id), [TProtocol(PING_ID)])
            start = time.perf_counter()
            await perform_ping_roundtrip(stream)
            rtt = time.perf_counter() - start
        except Exception as exc:
            log.debug("ping %s failed: %r", peer_id, exc)
            return None
        finally:
            if stream is not None:
                await rpc.close_quietly(stream)
        self.peer_table.set_rtt(peer_id, rtt)
        return rtt

    # --- requests --------------------------------------------------------------------------

    def _register_handlers(self) -> None:
        server = rpc.RpcServer(
            self.swarm.host,
            self.peer_id,
            self.settings.request_timeout,
            on_reject=lambda protocol, code: self.metrics.reject(protocol, code),
            check=self.wire_guard.check,
        )
        server.register(STATUS_PROTOCOL, self._serve_status, CONTROL_LIMITS)
        server.register(PEER_TABLE_PROTOCOL, self._serve_peer_table, CONTROL_LIMITS)
        if self.blob_resolver is not None:
            handler = blob_handler(self.blob_resolver, self.metrics.blob_bytes_served.inc)
            server.register(BLOB_PROTOCOL, handler, CONTROL_LIMITS)
        for protocol_id, handler, limits, timeout, session in self._extra_handlers:
            server.register(protocol_id, handler, limits, timeout, session)
        if self.qtable is not None:
            server.register(QTABLE_PROTOCOL, self.qtable.serve_snapshot, CONTROL_LIMITS)
        if self.trainer is not None:
            server.register(
                FL_PROTOCOL,
                self.trainer.handle,
                DEFAULT_LIMITS,
                self.trainer.max_round_s,
                session=True,
            )

    async def _serve_status(self, request: Message, caller: str) -> Mapping[str, Any]:
        self._expect(request, "status")
        self.metrics.requests.labels(protocol="status").inc()
        return status_view(self)

    async def _serve_peer_table(self, request: Message, caller: str) -> Mapping[str, Any]:
        self._expect(request, "peer_table")
        self.metrics.requests.labels(protocol="peer_table").inc()
        now = time.time()
        adverts = []
        for origin, signed in self.state.signed_adverts.items():
            entry = self.peer_table.get(origin)
            heard_at = entry.received_at if entry else self._own_advert_time()
            adverts.append({"signed": signed, "age_s": round(max(0.0, now - heard_at), 3)})
        return {"adverts": adverts}

    def _own_advert_time(self) -> float:
        last = self.state.last_advert
        return last.timestamp if last is not None else time.time()

    @staticmethod
    def _expect(request: Message, method: str) -> None:
        if request.type != method:
            raise RpcError("unknown_method", f"expected {method!r}, got {request.type!r}")

    async def fetch_peer_table(self, peer_id: str) -> int:
        """Merge `peer_id`'s table into ours, keeping only adverts whose signatures verify."""
        reply = await self.ask(peer_id, PEER_TABLE_PROTOCOL, "peer_table", PEER_TABLE_LIMITS)
        signed = reply.get("adverts")
        if not isinstance(signed, list):
            raise RpcError("bad_reply", f"{peer_id} sent a peer table without adverts")
        merged = 0
        for item in signed:
            raw, age_s = _table_item(item)
            peeked = peek_signed(raw, ADVERTS_TOPIC) if raw is not None else None
            if peeked is not None and not self._is_news(peeked[0]):
                continue  # skip the costly signature check for what we already hold
            message = verify_signed(raw, ADVERTS_TOPIC) if raw is not None else None
            if message is None:
                self.metrics.reject("peer_table", "bad_signature")
                continue
            merged += self._accept_advert(message, where="peer_table", age_s=age_s)
        return merged

    def _is_news(self, message: GossipMessage) -> bool:
        """Would this advert be new or newer here? (Garbage counts as news: the full path
        logs and counts it.)"""
        if message.origin == self.peer_id:
            return False
        try:
            advert = Advert.from_wire(message.data)
        except ProtocolError:
            return True
        held = self.peer_table.get(message.origin)
        return held is None or held.advert.seq < advert.seq

    async def remote_status(self, peer_id: str) -> Mapping[str, Any]:
        return await self.ask(peer_id, STATUS_PROTOCOL, "status", CONTROL_LIMITS)

    async def ask(
        self, peer_id: str, protocol_id: str, method: str, limits: Limits
    ) -> Mapping[str, Any]:
        """One request to a peer (dialled from its advert if need be); the reply's body."""
        self.make_dialable(peer_id)
        reply = await rpc.request(
            self.swarm.host,
            peer_id,
            protocol_id,
            method,
            timeout=self.settings.request_timeout,
            limits=limits,
        )
        return reply.body


def _table_item(item: Any) -> tuple[bytes | None, float]:
    """One entry of a peer-table reply: the signed message and its age at the sender."""
    if not isinstance(item, dict):
        return None, 0.0
    signed, age_s = item.get("signed"), item.get("age_s", 0.0)
    if not isinstance(signed, bytes) or not isinstance(age_s, (int, float)):
        return None, 0.0
    return signed, float(age_s)
