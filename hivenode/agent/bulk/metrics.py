"""Prometheus counters of bulk transfers, in the node's own registry beside `Metrics`.

A receiver's refusals go to the node's existing `hivenode_messages_rejected{where="bulk"}`,
where an operator already looks for refused traffic; these counters say what moved and how.
"""

from __future__ import annotations

import weakref
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter

SENT: Final = "sent"
RECEIVED: Final = "received"


class BulkMetrics:
    """Transfers, bytes, resumes and failures, by role ("sent"/"received") and path ("bulk"
    for the direct channel, "stream" for the libp2p fallback)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.transfers = Counter(
            "hivenode_bulk_transfers",
            "Bulk transfers completed, by role and path",
            ["role", "path"],
            registry=registry,
        )
        self.bytes = Counter(
            "hivenode_bulk_bytes",
            "Payload bytes of completed bulk transfers, by role and path",
            ["role", "path"],
            registry=registry,
        )
        self.resumes = Counter(
            "hivenode_bulk_resumes",
            "Resumes of bulk transfers whose channel broke, by role",
            ["role"],
            registry=registry,
        )
        self.resent_bytes = Counter(
            "hivenode_bulk_resent_bytes",
            "Payload bytes a sender wrote again after a resume (in flight when the channel broke)",
            registry=registry,
        )
        self.send_failures = Counter(
            "hivenode_bulk_send_failures",
            "Bulk transfers this node sent that failed, by error code",
            ["code"],
            registry=registry,
        )

    def completed(self, role: str, path: str, nbytes: int) -> None:
        self.transfers.labels(role=role, path=path).inc()
        self.bytes.labels(role=role, path=path).inc(nbytes)


_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, BulkMetrics] = (
    weakref.WeakKeyDictionary()
)


def bulk_metrics(node: Any) -> BulkMetrics | None:
    """The bulk counters in `node`'s registry, created on first use (a registry refuses a
    second counter of one name, and both roles of every transfer on a node share them);
    None for a node without metrics."""
    metrics = getattr(node, "metrics", None)
    registry = getattr(metrics, "registry", None)
    if not isinstance(registry, CollectorRegistry):
        return None
    found = _by_registry.get(registry)
    if found is None:
        found = _by_registry[registry] = BulkMetrics(registry)
    return found


def count_rejection(node: Any, code: str) -> None:
    """A refused offer, resume or channel, in the node's `hivenode_messages_rejected`."""
    metrics = getattr(node, "metrics", None)
    if metrics is not None:
        metrics.reject("bulk", code)
