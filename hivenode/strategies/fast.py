"""Flower's FedAvg and FedProx with hivenode's averaging kernel in `aggregate_train`.

Everything else (sampling, configuration, evaluation, FedProx's μ sent to trainers) is
Flower's own; only the weighted mean of the replies' arrays changes: read once from the
received buffers, BLAS-fused, ≥ 3× Flower's `aggregate_arrayrecords` on 10 × 10M and
100 × 1M float32 updates with the same rounding error (benchmarks/bench_aggregate.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg, FedProx

from hivenode.strategies.flower_arrays import aggregate_arrayrecords


def fast_aggregate_train(
    strategy: FedAvg, replies: Iterable[Message]
) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """What `FedAvg.aggregate_train` returns, computed with `aggregate_arrayrecords`."""
    valid, _ = strategy._check_and_log_replies(replies, is_train=True)
    if not valid:
        return None, None
    contents = [message.content for message in valid]
    arrays = aggregate_arrayrecords(contents, strategy.weighted_by_key)
    return arrays, strategy.train_metrics_aggr_fn(contents, strategy.weighted_by_key)


class FastFedAvg(FedAvg):
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return fast_aggregate_train(self, replies)


class FastFedProx(FedProx):
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return fast_aggregate_train(self, replies)
