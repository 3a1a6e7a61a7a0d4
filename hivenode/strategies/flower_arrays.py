"""Flower ArrayRecord adapters for the fast aggregation in `aggregate.py`.

Updates are read as zero-copy views (`hivenode.models.flower_arrays`), once, by the aggregation.

A Flower Message-API strategy uses it in `aggregate_train`, e.g.::

    class FastFedAvg(FedAvg):
        def aggregate_train(self, server_round, replies):
            valid, _ = self._check_and_log_replies(replies, is_train=True)
            contents = [msg.content for msg in valid]
            arrays = aggregate_arrayrecords(contents, self.weighted_by_key) if contents else None
            metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key) ...
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from hivenode.models.flower_arrays import array_to_numpy, numpy_to_array
from hivenode.strategies.aggregate import (
    CHUNK_ELEMENTS,
    AggregationError,
    NDArray,
    weighted_mean,
)


def reply_weight(content: RecordDict, weighting_metric_name: str) -> float:
    """The weighting metric of a reply, read as Flower does (its first MetricRecord)."""
    # not `content.metric_records`: Flower rebuilds that dict, through its setters, per access
    metrics = next((r for r in content.values() if isinstance(r, MetricRecord)), None)
    if metrics is None:
        raise AggregationError("reply has no MetricRecord to read its weight from")
    if weighting_metric_name not in metrics:
        raise AggregationError(f"reply's MetricRecord has no {weighting_metric_name!r}")
    value = metrics[weighting_metric_name]
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise AggregationError(f"weight {weighting_metric_name!r} is not a number: {value!r}")
    return float(value)


def aggregate_arrayrecords(
    records: Sequence[RecordDict],
    weighting_metric_name: str,
    *,
    dtype: npt.DTypeLike | None = None,
    accumulator_dtype: npt.DTypeLike | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
    workers: int | None = None,
) -> ArrayRecord:
    """Drop-in for `flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords`.

    Weighted mean of every reply's arrays (all its ArrayRecords, by key), each weighted by
    `weighting_metric_name` of its first MetricRecord; results in each tensor's input dtype
    unless `dtype` says otherwise. Tensors are done one at a time, so the peak extra memory is
    the result record plus one result tensor.

    The accumulator defaults to the model's own precision, as Flower's does (float64 for
    float64 tensors, float32 otherwise): float32 updates then go through BLAS saxpy, one fused
    pass per update, with Flower's rounding error (measured 2.4e-7 vs Flower's 2.6e-7 at
    100 × 1M N(0,1) values). Pass `accumulator_dtype=np.float64` for ≤ 1 ulp at ~4× the time.
    """
    if not records:
        raise AggregationError("no reply to aggregate")
    weights = [reply_weight(content, weighting_metric_name) for content in records]
    views = [_reply_arrays(content) for content in records]
    keys = list(views[0])
    for i, reply in enumerate(views[1:], start=1):
        if list(reply) != keys:
            raise AggregationError(f"reply {i} has arrays {list(reply)}, reply 0 has {keys}")
    result = ArrayRecord()
    for key in keys:
        (mean,) = weighted_mean(
            [[reply[key]] for reply in views],
            weights,
            dtype=dtype,
            accumulator_dtype=_model_precision(views[0][key], accumulator_dtype),
            chunk_elements=chunk_elements,
            workers=workers,
        )
        result[key] = numpy_to_array(mean)
        del mean
    return result


def _model_precision(array: NDArray, requested: npt.DTypeLike | None) -> np.dtype[Any]:
    if requested is not None:
        return np.dtype(requested)
    return np.dtype(np.float64 if array.dtype == np.float64 else np.float32)


def _reply_arrays(content: RecordDict) -> dict[str, NDArray]:
    arrays: dict[str, NDArray] = {}
    for record in content.values():
        if not isinstance(record, ArrayRecord):
            continue
        for key, value in record.items():
            if key in arrays:
                raise AggregationError(f"array {key!r} appears in two ArrayRecords of a reply")
            arrays[key] = array_to_numpy(value)
    return arrays
