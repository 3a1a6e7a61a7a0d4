"""Inference metrics in the node's own Prometheus registry, and the figures read back from
them: request counts by outcome, latency histograms dense around the p95 of a served model,
throughput over a sliding window.

Worker side (`hivenode_inference_served_*`): per model, what this node computed. Router
side (`hivenode_inference_requests_*`): per model and worker, what callers saw end to end.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS_S: tuple[float, ...] = tuple(round(0.0005 * 1.2**i, 7) for i in range(61))
"""0.5 ms to 28 s, each bound 1.2× the last: wherever p95 falls, its bucket is 20% wide, so
a quantile read back with linear interpolation is off by a few percent at most (a fixed
decade-ish ladder like Prometheus' default is off by up to 2× near 10-50 ms)."""
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
THROUGHPUT_WINDOW_S = 60.0
MIN_THROUGHPUT_SPAN_S = 1.0
OK = "ok"


@dataclass(frozen=True)
class Summary:
    """Figures for one model (and worker): what `hivenode models stats` shows."""

    requests: int
    succeeded: int
    success_rate: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    throughput_rps: float

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "succeeded": self.succeeded,
            "success_rate": self.success_rate,
            "p50_ms": self.p50_ms,
            "p95_ms": self.p95_ms,
            "p99_ms": self.p99_ms,
            "throughput_rps": self.throughput_rps,
        }


class InferenceMetrics:
    """The inference part's metrics, registered once in `registry` (the node's)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.served = Counter(
            "hivenode_inference_served",
            "Inference requests this worker answered, by model and outcome (ok or error code)",
            ["model", "outcome"],
            registry=registry,
        )
        self.served_seconds = Histogram(
            "hivenode_inference_served_seconds",
            "Time a request spent at this worker: queue, batch and compute",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.batch_samples = Histogram(
            "hivenode_inference_batch_samples",
            "Samples per computed batch",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.queue = Gauge(
            "hivenode_inference_queue",
            "Requests waiting at this worker, by model",
            ["model"],
            registry=registry,
        )
        self.requests = Counter(
            "hivenode_inference_requests",
            "Routed inference requests, by model, worker and outcome (ok or error code)",
            ["model", "worker", "outcome"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "hivenode_inference_request_seconds",
            "End-to-end latency of routed requests that succeeded, by model and worker",
            ["model", "worker"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self._completions: dict[tuple[str, str], deque[float]] = {}
        self._first_completion: dict[tuple[str, str], float] = {}

    def record_request(self, model: str, worker: str, outcome: str, seconds: float) -> None:
        """One routed attempt; `outcome` is OK or an error code."""
        self.requests.labels(model=model, worker=worker, outcome=outcome).inc()
        if outcome == OK:
            self.request_seconds.labels(model=model, worker=worker).observe(seconds)
            window = self._completions.setdefault((model, worker), deque())
            now = time.monotonic()
            self._first_completion.setdefault((model, worker), now)
            window.append(now)
            while window and window[0] < now - THROUGHPUT_WINDOW_S:
                window.popleft()

    def record_served(self, model: str, outcome: str, seconds: float | None = None) -> None:
        self.served.labels(model=model, outcome=outcome).inc()
        if seconds is not None:
            self.served_seconds.labels(model=model).observe(seconds)

    def summary(self, model: str, worker: str | None = None) -> Summary:
        """Routed figures for `model`, on one worker or all of them together."""
        requests = succeeded = 0
        buckets = [0.0] * (len(LATENCY_BUCKETS_S) + 1)
        for metric in self.registry.collect():
            for sample in metric.samples:
                labels = sample.labels
                if labels.get("model") != model or (worker and labels.get("worker") != worker):
                    continue
                if sample.name == "hivenode_inference_requests_total":
                    requests += int(sample.value)
                    succeeded += int(sample.value) if labels.get("outcome") == OK else 0
                elif sample.name == "hivenode_inference_request_seconds_bucket":
                    buckets[_bucket_index(labels["le"])] += sample.value
        counts = _per_bucket(buckets)
        now = time.monotonic()
        keys = [k for k in self._completions if k[0] == model and worker in (None, k[1])]
        recent = sum(
            sum(1 for t in self._completions[k] if t >= now - THROUGHPUT_WINDOW_S) for k in keys
        )
        # over the window, or since the first answer when that is more recent (a fresh node
        # that answered 100 requests in 2 s serves 50/s, not 100/60)
        since = min((self._first_completion[k] for k in keys), default=now)
        span = max(MIN_THROUGHPUT_SPAN_S, min(THROUGHPUT_WINDOW_S, now - since))

        def ms(q: float) -> float | None:
            value = bucket_quantile(LATENCY_BUCKETS_S, counts, q)
            return None if value is None else round(value * 1000, 3)

        return Summary(
            requests=requests,
            succeeded=succeeded,
            success_rate=succeeded / requests if requests else None,
            p50_ms=ms(0.50),
            p95_ms=ms(0.95),
            p99_ms=ms(0.99),
            throughput_rps=round(recent / span, 3),
        )

    def workers_of(self, model: str) -> list[str]:
        """Workers the router sent `model` to, by peer id."""
        found = set()
        for metric in self.registry.collect():
            for sample in metric.samples:
                named = sample.name == "hivenode_inference_requests_total"
                if named and sample.labels.get("model") == model:
                    found.add(sample.labels["worker"])
        return sorted(found)


def bucket_quantile(bounds: Sequence[float], counts: Sequence[float], q: float) -> float | None:
    """The q-quantile of observations counted per bucket (counts[i] in (bounds[i-1],
    bounds[i]], the last count above every bound), interpolated linearly inside its bucket
    as Prometheus' histogram_quantile does; None without observations. Above the last
    bound the answer is that bound (the histogram knows no more)."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index >= len(bounds):
                return bounds[-1]
            lower = bounds[index - 1] if index else 0.0
            return lower + (bounds[index] - lower) * (rank - seen) / count
        seen += count
    return bounds[-1]


_BUCKET_INDEX = {bound: index for index, bound in enumerate(LATENCY_BUCKETS_S)}


def _bucket_index(le: str) -> int:
    return _BUCKET_INDEX.get(float(le), len(LATENCY_BUCKETS_S))  # "+Inf" parses as inf


def _per_bucket(cumulative: list[float]) -> list[float]:
    """Prometheus buckets are cumulative; quantiles want the count in each."""
    out, previous = [], 0.0
    for value in cumulative:
        out.append(max(0.0, value - previous))
        previous = value
    return out if not math.isnan(sum(out)) else [0.0] * len(out)
