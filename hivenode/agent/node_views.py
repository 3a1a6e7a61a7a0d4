"""What the control API and `/hivenode/status/1.0.0` say about a node: plain JSON-able views."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from hivenode import __version__
from hivenode.agent.adverts import ADVERT_CHECK_PERIOD
from hivenode.agent.hardware import probe_load

if TYPE_CHECKING:
    from hivenode.agent.node import Node


def status_view(node: Node) -> dict[str, Any]:
    """What `hivenode status` shows: identity, addresses, peers, hardware, load, health."""
    now = time.time()
    connected = node.connected_peers() if node.running else []
    since_advert = time.monotonic() - node.state.last_advert_at if node.state.last_advert else None
    return {
        "peer_id": node.peer_id,
        "agent_version": __version__,
        "addrs": node.swarm.listen_addrs() if node.running else [],
        "roles": [r.value for r in node.settings.roles],
        "uptime_s": round(now - node.state.started_at, 3),
        "peers": len(node.peer_table),
        "connections": len(connected),
        "advert_period_s": round(node.current_period(), 3),
        "adverts": {
            "sent": node.metrics.value("hivenode_adverts_sent_total"),
            "received": node.metrics.value("hivenode_adverts_received_total"),
        },
        "hardware": node.hardware.model_dump(mode="json") if node.hardware else None,
        "load": probe_load(node.running_tasks).model_dump(mode="json"),
        "health": _health(node, connected, since_advert),
    }


def _health(node: Node, connected: list[str], since_advert: float | None) -> list[dict[str, Any]]:
    wanted = len(node.settings.bootstrap_peers)
    reached = len(node.state.bootstrap_reached)
    period = node.current_period()
    return [
        {
            "check": "swarm",
            "ok": bool(connected) or wanted == 0,
            "detail": f"{len(connected)} connections, {len(node.peer_table)} peers known",
        },
        {
            "check": "bootstrap",
            "ok": wanted == 0 or reached > 0,
            "detail": f"reached {reached} of {wanted} bootstrap peers",
        },
        {
            "check": "adverts",
            "ok": since_advert is not None and since_advert < 2 * period + ADVERT_CHECK_PERIOD,
            "detail": "none sent yet"
            if since_advert is None
            else f"last sent {since_advert:.0f} s ago (period {period:.0f} s)",
        },
    ]


def peers_view(node: Node) -> list[dict[str, Any]]:
    """The peer table as `hivenode peers` shows it."""
    now = time.time()
    rows = []
    for entry in node.peer_table.entries():
        advert = entry.advert
        rows.append(
            {
                "peer_id": advert.origin,
                "addrs": list(advert.addrs),
                "roles": [r.value for r in advert.roles],
                "agent_version": advert.agent_version,
                "hardware": advert.hardware.model_dump(mode="json"),
                "load": advert.load.model_dump(mode="json"),
                "rtt_ms": None if entry.rtt_s is None else round(entry.rtt_s * 1000, 3),
                "last_seen_s": round(now - entry.received_at, 3),
                "expires_in_s": round(entry.expires_at() - now, 3),
            }
        )
    return rows
