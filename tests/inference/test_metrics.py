"""Latency quantiles read back from histogram buckets, against numpy on the raw samples."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from hivenode.inference.metrics import (
    LATENCY_BUCKETS_S,
    OK,
    InferenceMetrics,
    bucket_quantile,
)


@pytest.mark.parametrize("scale_s", [0.002, 0.015, 0.2])
def test_p95_from_the_buckets_is_within_a_few_percent_of_the_samples(scale_s: float) -> None:
    samples = np.random.default_rng(0).lognormal(np.log(scale_s), 0.5, size=20_000)
    counts, _ = np.histogram(samples, bins=[0.0, *LATENCY_BUCKETS_S, np.inf])
    for q in (0.5, 0.95, 0.99):
        estimate = bucket_quantile(LATENCY_BUCKETS_S, counts.tolist(), q)
        assert estimate == pytest.approx(np.quantile(samples, q), rel=0.05)


def test_no_observations_have_no_quantile() -> None:
    assert bucket_quantile(LATENCY_BUCKETS_S, [0] * (len(LATENCY_BUCKETS_S) + 1), 0.5) is None


def test_the_summary_counts_success_per_worker_and_together() -> None:
    metrics = InferenceMetrics(CollectorRegistry())
    for seconds in (0.001, 0.002, 0.003):
        metrics.record_request("digits", "a", OK, seconds)
    metrics.record_request("digits", "b", "busy", 0.0001)
    metrics.record_request("digits", "b", OK, 0.010)
    together = metrics.summary("digits")
    assert together.requests == 5 and together.succeeded == 4
    assert together.success_rate == pytest.approx(0.8)
    assert together.p50_ms is not None and 1.5 < together.p50_ms < 3.5
    only_b = metrics.summary("digits", "b")
    assert only_b.requests == 2 and only_b.success_rate == pytest.approx(0.5)
    assert metrics.workers_of("digits") == ["a", "b"]
    assert together.throughput_rps == pytest.approx(4.0)  # 4 answers within the first second
