"""Prometheus metrics in hivenode's own registry (py-libp2p fills the default one with its own)."""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Info

from hivenode import __version__

log = logging.getLogger(__name__)


class Metrics:
    """The node's counters and gauges, all prefixed `hivenode_`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.started_at = time.monotonic()
        self.peers = Gauge("hivenode_peers", "Peers in the peer table", registry=self.registry)
        self.connections = Gauge(
            "hivenode_connections", "Open libp2p connections", registry=self.registry
        )
        self.adverts_sent = Counter(
            "hivenode_adverts_sent", "Hardware adverts published", registry=self.registry
        )
        self.adverts_received = Counter(
            "hivenode_adverts_received",
            "Adverts received and accepted (new or newer)",
            registry=self.registry,
        )
        self.rejected = Counter(
            "hivenode_messages_rejected",
            "Messages and requests refused, by where and why",
            ["where", "reason"],
            registry=self.registry,
        )
        self.requests = Counter(
            "hivenode_requests_served",
            "Requests answered, by protocol",
            ["protocol"],
            registry=self.registry,
        )
        self.updates_rejected = Counter(
            "hivenode_updates_rejected",
            "Train replies this node's update screen rejected as an aggregator, by trainer",
            ["peer"],
            registry=self.registry,
        )
        self.blob_bytes_served = Counter(
            "hivenode_blob_bytes_served", "Model blob bytes sent to peers", registry=self.registry
        )
        uptime = Gauge("hivenode_uptime_seconds", "Seconds since start", registry=self.registry)
        uptime.set_function(lambda: time.monotonic() - self.started_at)
        Info("hivenode_build", "Agent version", registry=self.registry).info(
            {"version": __version__}
        )

    def value(self, sample: str, **labels: str) -> float:
        """Current value of one sample (0 before the first increment)."""
        return self.registry.get_sample_value(sample, labels) or 0.0

    def reject(self, where: str, reason: str) -> None:
        self.rejected.labels(where=where, reason=reason).inc()

    def serve(self, host: str, port: int) -> None:
        """Expose /metrics on host:port from a daemon thread (prometheus_client's own server)."""
        from prometheus_client import start_http_server

        start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", host, port)
