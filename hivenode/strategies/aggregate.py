"""Fast weighted averaging of client updates, straight from the received buffers.

Flower's `aggregate_inplace` / `aggregate_arrayrecords` deserialise every update into a fresh
array and scale it into another before adding (measured here: about 2× one model of extra
memory). Here every update is read once, in cache-sized chunks, into one accumulator:

- `WeightedMean` streams: `add()` each update as it arrives (it may be a view over the
  received buffer, e.g. from `hivenode.protocol.message.decode_message`), `result()` once.
  It holds one float64 (default) or float32 accumulator per tensor and nothing else full-size;
  `result()` writes the mean into the accumulator's own buffer, so its peak extra memory is the
  accumulator: 2× a float32 model with float64 accumulation, 1× with float32.
- `weighted_mean()` is the batch form for when all updates are already there (a Flower
  strategy's `aggregate_train`): chunk-major, the accumulator for one chunk stays in cache and
  the only full-size allocation is the result (1× one model).

When an update already has the accumulator's dtype, acc += w·x is one BLAS axpy (scipy's
saxpy/daxpy: fused, reads x once); otherwise x is widened into a chunk buffer first. float32
models averaged with a float32 accumulator (what `flower_arrays.aggregate_arrayrecords` does by
default, like Flower) run at 16–20 GB/s here, close to this machine's memory read rate
(~24 GB/s): 3.1–4.9× Flower's best (benchmarks/bench_aggregate.py, docs/performance.md).

Work can be split over `workers` threads by element ranges (numpy releases the GIL); the
default is one, which measured fastest here (OpenBLAS already threads axpy).

Accuracy (measured by benchmarks/bench_aggregate.py and the tests, against np.average over
float64 copies): with float64 accumulation the only error is the final rounding to the result
dtype, max abs error ≤ 1 ulp of the result (≈ 6e-8 × |mean| for float32 results; measured
max abs err 6.0e-8 at 10×10M and 2.8e-8 at 100×1M, N(0,1) float32 inputs). With float32
accumulation the error grows with the number of updates (≈ N · 2^-24 · max|x| worst case):
measured 2.9e-7 and 2.2e-7, Flower's own float32 accumulation 3.1e-7 and 2.6e-7.

Chunks of 256 Ki elements were fastest here (2 MiB float64 per chunk buffer; 64 Ki–1 Mi were
within 30 %, 4 Mi was 1.8× slower: its buffers fall out of L2/L3).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt

NDArray = np.ndarray[Any, Any]

CHUNK_ELEMENTS = 1 << 18


class AggregationError(Exception):
    """Updates that cannot be averaged together: wrong count, shape, dtype or weight."""


def default_workers() -> int:
    """One thread: on the 2-core dev box a second thread measured ~12 % slower (the kernel is
    bound by memory, and threads cost a pool per call); pass `workers` to try more."""
    return 1


class WeightedMean:
    """Streaming weighted mean of updates, each a sequence of same-shaped float tensors.

    `WeightedMean(template)` takes the tensor shapes (or arrays, whose shapes are used: the
    first update is a fine template; it is not added). `add(arrays, weight)` accumulates
    `weight · arrays` chunk by chunk without copying the update; `result(dtype)` returns
    Σ wᵢ·xᵢ / Σ wᵢ per tensor and consumes the accumulator (no `add` after it).
    """

    def __init__(
        self,
        template: Sequence[NDArray | Sequence[int]],
        *,
        accumulator_dtype: npt.DTypeLike = np.float64,
        chunk_elements: int = CHUNK_ELEMENTS,
        workers: int | None = None,
    ) -> None:
        self._shapes = [_shape_of(item) for item in template]
        self._acc_dtype = np.dtype(accumulator_dtype)
        if self._acc_dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise AggregationError(
                f"accumulator dtype must be float32 or float64, not {self._acc_dtype}"
            )
        if chunk_elements < 1:
            raise AggregationError(f"chunk_elements must be ≥ 1, got {chunk_elements}")
        self._chunk = chunk_elements
        self._workers = workers or default_workers()
        self._acc = [np.empty(math.prod(shape), self._acc_dtype) for shape in self._shapes]
        self._input_dtypes: list[np.dtype[Any]] = []
        self._total_weight = 0.0
        self._count = 0
        self._consumed = False

    @property
    def count(self) -> int:
        """How many updates have been added."""
        return self._count

    @property
    def total_weight(self) -> float:
        return self._total_weight

    def add(self, arrays: Sequence[NDArray], weight: float) -> None:
        """Accumulate one update; `arrays` are read, never copied whole nor kept."""
        if self._consumed:
            raise AggregationError("result() was already taken; start a new WeightedMean")
        flat = _check_update(arrays, self._shapes, "update")
        weight = _check_weight(weight, self._count)
        first = self._count == 0
        if first:
            self._input_dtypes = [a.dtype for a in flat]

        def work(tasks: Sequence[_Task]) -> None:
            tmp = np.empty(min(self._chunk, _largest(tasks)), self._acc_dtype)
            for index, start, stop in tasks:
                acc = self._acc[index][start:stop]
                if first:
                    _scaled_into(acc, flat[index][start:stop], weight)
                else:
                    _add_scaled(acc, flat[index][start:stop], weight, tmp[: stop - start])

        _run(self._tasks(), work, self._workers)
        self._total_weight += weight
        self._count += 1

    def result(self, dtype: npt.DTypeLike | None = None) -> list[NDArray]:
        """The weighted mean per tensor, in `dtype` (default: each tensor's input dtype).

        When `dtype` is no wider than the accumulator the mean is written into the
        accumulator's buffer (forward, chunk by chunk, so no value is overwritten before it is
        read) and the returned arrays are views of it: no new full-size allocation.
        """
        if self._consumed:
            raise AggregationError("result() can be taken once")
        if self._count == 0:
            raise AggregationError("no update was added")
        dtypes = [_result_dtype(dtype, d) for d in self._input_dtypes]
        outs: list[NDArray] = []
        for acc, out_dtype in zip(self._acc, dtypes, strict=True):
            if out_dtype.itemsize <= acc.itemsize:
                outs.append(acc.view(np.uint8)[: acc.size * out_dtype.itemsize].view(out_dtype))
            else:
                outs.append(np.empty(acc.size, out_dtype))
        total = self._total_weight

        def work(tasks: Sequence[_Task]) -> None:
            tmp = np.empty(min(self._chunk, _largest(tasks)), self._acc_dtype)
            for index, start, stop in tasks:
                mean = tmp[: stop - start]
                np.divide(self._acc[index][start:stop], total, out=mean)
                np.copyto(outs[index][start:stop], mean, casting="same_kind")

        # In-place narrowing must go forward within each tensor: one worker per tensor range
        # would overwrite the next range's unread values, so this pass runs on one thread.
        _run(self._tasks(), work, 1)
        self._consumed = True
        self._acc = []
        return [out.reshape(shape) for out, shape in zip(outs, self._shapes, strict=True)]

    def _tasks(self) -> list[_Task]:
        return _chunk_tasks([math.prod(s) for s in self._shapes], self._chunk)


def weighted_mean(
    updates: Sequence[Sequence[NDArray]],
    weights: Sequence[float],
    *,
    dtype: npt.DTypeLike | None = None,
    accumulator_dtype: npt.DTypeLike = np.float64,
    chunk_elements: int = CHUNK_ELEMENTS,
    workers: int | None = None,
) -> list[NDArray]:
    """Σ wᵢ·updateᵢ / Σ wᵢ per tensor when all updates are at hand, chunk-major.

    For each chunk of each tensor the chunk's accumulator stays in cache while every update's
    slice is added into it, then the mean is written to the result: each input byte is read
    once and the result is the only full-size allocation. `dtype` defaults to the first
    update's dtype per tensor.
    """
    if not updates:
        raise AggregationError("no update to aggregate")
    if len(weights) != len(updates):
        raise AggregationError(f"{len(updates)} updates but {len(weights)} weights")
    acc_dtype = np.dtype(accumulator_dtype)
    if acc_dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise AggregationError(f"accumulator dtype must be float32 or float64, not {acc_dtype}")
    shapes = [np.shape(a) for a in updates[0]]
    flats = [_check_update(u, shapes, f"update {i}") for i, u in enumerate(updates)]
    checked = [_check_weight(w, i) for i, w in enumerate(weights)]
    total = math.fsum(checked)
    if not math.isfinite(total):
        raise AggregationError(f"the weights sum to {total}")
    outs = [np.empty(a.size, _result_dtype(dtype, a.dtype)) for a in flats[0]]

    def work(tasks: Sequence[_Task]) -> None:
        size = min(chunk_elements, _largest(tasks))
        acc_buf = np.empty(size, acc_dtype)
        tmp_buf = np.empty(size, acc_dtype)
        for index, start, stop in tasks:
            acc = acc_buf[: stop - start]
            tmp = tmp_buf[: stop - start]
            _scaled_into(acc, flats[0][index][start:stop], checked[0])
            for flat, weight in zip(flats[1:], checked[1:], strict=True):
                _add_scaled(acc, flat[index][start:stop], weight, tmp)
            np.divide(acc, total, out=acc)
            np.copyto(outs[index][start:stop], acc, casting="same_kind")

    _run(
        _chunk_tasks([a.size for a in flats[0]], chunk_elements),
        work,
        workers or default_workers(),
    )
    return [out.reshape(shape) for out, shape in zip(outs, shapes, strict=True)]


# --- kernels and checks ----------------------------------------------------------------------

_Task = tuple[int, int, int]  # tensor index, first element, end element


def _scaled_into(out: NDArray, x: NDArray, weight: float) -> NDArray:
    """out = weight · x in out's dtype; a widening copy then an in-place multiply measured
    1.5× faster than one `np.multiply(x, w, out=out, dtype=...)` with its buffered cast."""
    if x.dtype == out.dtype:
        np.multiply(x, weight, out=out)
    else:
        np.copyto(out, x, casting="same_kind")
        np.multiply(out, weight, out=out)
    return out


def _add_scaled(acc: NDArray, x: NDArray, weight: float, tmp: NDArray) -> None:
    """acc += weight · x. BLAS axpy when x already has the accumulator's dtype: one fused pass
    that reads x once (measured 2.4× numpy's multiply-then-add on 256 Ki chunks); otherwise
    `tmp` holds weight · x widened to the accumulator's dtype."""
    axpy = _blas_axpy(acc.dtype) if x.dtype == acc.dtype else None
    if axpy is not None:
        axpy(x, acc, a=weight)
    else:
        np.add(acc, _scaled_into(tmp, x, weight), out=acc)


@functools.cache
def _blas_axpy(dtype: np.dtype[Any]) -> Callable[..., NDArray] | None:
    """scipy's saxpy/daxpy (in place on a contiguous accumulator), None without scipy."""
    try:
        from scipy.linalg import blas
    except ImportError:  # scipy is a dependency; numpy's two-pass path still works without it
        return None
    kernels: dict[np.dtype[Any], Callable[..., NDArray]] = {
        np.dtype(np.float32): blas.saxpy,
        np.dtype(np.float64): blas.daxpy,
    }
    return kernels.get(np.dtype(dtype))


def _check_update(
    arrays: Sequence[NDArray], shapes: Sequence[tuple[int, ...]], what: str
) -> list[NDArray]:
    if len(arrays) != len(shapes):
        raise AggregationError(f"{what} has {len(arrays)} tensors, expected {len(shapes)}")
    flat: list[NDArray] = []
    for i, (array, shape) in enumerate(zip(arrays, shapes, strict=True)):
        if not isinstance(array, np.ndarray):
            raise AggregationError(f"{what}, tensor {i}: expected a numpy array, got {type(array)}")
        if array.shape != tuple(shape):
            raise AggregationError(
                f"{what}, tensor {i}: shape {array.shape}, expected {tuple(shape)}"
            )
        if not np.issubdtype(array.dtype, np.floating):
            raise AggregationError(f"{what}, tensor {i}: dtype {array.dtype} is not floating point")
        # a view for C-contiguous arrays (what frombuffer gives); others are copied, since
        # element i must be the same logical element in every update
        flat.append(array.ravel())
    return flat


def _check_weight(weight: float, index: int) -> float:
    try:
        value = float(weight)
    except (TypeError, ValueError) as exc:
        raise AggregationError(f"weight of update {index} is not a number: {weight!r}") from exc
    if not math.isfinite(value) or value <= 0.0:
        raise AggregationError(f"weight of update {index} must be finite and > 0, got {value}")
    return value


def _result_dtype(requested: npt.DTypeLike | None, input_dtype: np.dtype[Any]) -> np.dtype[Any]:
    dtype = input_dtype if requested is None else np.dtype(requested)
    if not np.issubdtype(dtype, np.floating):
        raise AggregationError(f"result dtype must be floating point, not {dtype}")
    return dtype


def _shape_of(item: NDArray | Sequence[int]) -> tuple[int, ...]:
    if isinstance(item, np.ndarray):
        return tuple(item.shape)
    shape = tuple(int(n) for n in item)
    if any(n < 0 for n in shape):
        raise AggregationError(f"negative dimension in shape {shape}")
    return shape


def _chunk_tasks(sizes: Sequence[int], chunk: int) -> list[_Task]:
    return [
        (index, start, min(start + chunk, size))
        for index, size in enumerate(sizes)
        for start in range(0, size, chunk)
    ]


def _largest(tasks: Sequence[_Task]) -> int:
    return max((stop - start for _, start, stop in tasks), default=1)


def _run(tasks: list[_Task], work: Callable[[Sequence[_Task]], None], workers: int) -> None:
    """`work` over contiguous shares of `tasks`, on up to `workers` threads."""
    workers = max(1, min(workers, len(tasks)))
    if workers == 1:
        work(tasks)
        return
    share = math.ceil(len(tasks) / workers)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="aggregate") as pool:
        for done in [pool.submit(work, tasks[i : i + share]) for i in range(0, len(tasks), share)]:
            done.result()
