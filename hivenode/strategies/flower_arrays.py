"""Flower ArrayRecord adapters for the fast aggregation in `aggregate.py`.

A Flower `Array` holds `np.save` bytes; `Array.numpy()` copies them through `np.load`. Here the
.npy header is parsed and the array is a `np.frombuffer` view over `Array.data`: decoding costs
nothing and the update is read once, by the aggregation itself.

A Flower Message-API strategy uses it in `aggregate_train`, e.g.::

    class FastFedAvg(FedAvg):
        def aggregate_train(self, server_round, replies):
            valid, _ = self._check_and_log_replies(replies, is_train=True)
            contents = [msg.content for msg in valid]
            arrays = aggregate_arrayrecords(contents, self.weighted_by_key) if contents else None
            metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key) ...
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord, RecordDict

from hivenode.strategies.aggregate import (
    CHUNK_ELEMENTS,
    AggregationError,
    NDArray,
    weighted_mean,
)

NUMPY_STYPE = "numpy.ndarray"  # flwr.common.constant.SType.NUMPY


def array_to_numpy(array: Array) -> NDArray:
    """A read-only view over a Flower Array's .npy bytes, without copying them."""
    if array.stype != NUMPY_STYPE:
        raise AggregationError(f"cannot read an Array of serialisation type {array.stype!r}")
    data = array.data
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version in ((2, 0), (3, 0)):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise AggregationError(f"unsupported .npy version {version}")
    except ValueError as exc:
        raise AggregationError(f"Array data is not a valid .npy buffer: {exc}") from exc
    if dtype.hasobject:
        raise AggregationError(f"Array holds Python objects ({dtype}); refusing to read it")
    count = math.prod(shape)
    offset = stream.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise AggregationError(
            f"Array data holds {len(data) - offset} bytes after its header, "
            f"expected {count * dtype.itemsize} for {dtype} {shape}"
        )
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran_order else "C")


def numpy_to_array(array: NDArray) -> Array:
    """A Flower Array (the same fields as `Array(ndarray)`), built with one copy, not two."""
    if not array.flags.c_contiguous:
        array = array.copy(order="C")
    header = io.BytesIO()
    header_fields = np.lib.format.header_data_from_array_1_0(array)
    try:
        np.lib.format.write_array_header_1_0(header, header_fields)
    except ValueError:  # a header too long for version 1.0, as np.save would do
        header = io.BytesIO()
        np.lib.format.write_array_header_2_0(header, header_fields)
    data = b"".join((header.getvalue(), array.reshape(-1).view(np.uint8).data))
    return Array(dtype=str(array.dtype), shape=tuple(array.shape), stype=NUMPY_STYPE, data=data)


def arrayrecord_to_numpy(record: ArrayRecord) -> dict[str, NDArray]:
    """Zero-copy views of every Array in `record`, by key."""
    return {key: array_to_numpy(value) for key, value in record.items()}


def reply_weight(content: RecordDict, weighting_metric_name: str) -> float:
    """The weighting metric of a reply, read as Flower does (its first MetricRecord)."""
    if not content.metric_records:
        raise AggregationError("reply has no MetricRecord to read its weight from")
    metrics = next(iter(content.metric_records.values()))
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
    chunk_elements: int = CHUNK_ELEMENTS,
    workers: int | None = None,
) -> ArrayRecord:
    """Drop-in for `flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords`.

    Weighted mean of every reply's arrays (all its ArrayRecords, by key), each weighted by
    `weighting_metric_name` of its first MetricRecord; float64 accumulation, results in each
    tensor's input dtype unless `dtype` says otherwise. Tensors are done one at a time, so the
    peak extra memory is the result record plus one result tensor.
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
            chunk_elements=chunk_elements,
            workers=workers,
        )
        result[key] = numpy_to_array(mean)
        del mean
    return result


def _reply_arrays(content: RecordDict) -> dict[str, NDArray]:
    arrays: dict[str, NDArray] = {}
    for record in content.array_records.values():
        for key, value in record.items():
            if key in arrays:
                raise AggregationError(f"array {key!r} appears in two ArrayRecords of a reply")
            arrays[key] = array_to_numpy(value)
    return arrays
