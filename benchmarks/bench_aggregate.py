"""Weighted averaging of client updates: ours against Flower's, decode included.

    python benchmarks/bench_aggregate.py [--json] [--repeats 3]

Two shapes, float32: 10 clients × a 10M-parameter model and 100 clients × a 1M-parameter model,
each model 4 tensors. Every method starts from the same serialized inputs, the clients' Flower
ArrayRecords (whose Array.data are np.save bytes, the same bytes Flower's legacy `Parameters`
carry):

- `flower_inplace`: flwr.server.strategy.aggregate.aggregate_inplace over FitRes whose
  Parameters are those bytes (decodes with np.load, returns ndarrays);
- `flower_arrayrecords`: flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords
  (decodes with Array.numpy(), returns an ArrayRecord);
- `ours`: hivenode.strategies.flower_arrays.aggregate_arrayrecords as FedAvg/FedProx use it
  (zero-copy decode, headers parsed once per distinct header, chunked BLAS saxpy into a float32
  accumulator like Flower's, returns an ArrayRecord), one thread (the default); also shown
  with two threads (`ours_2threads_s`), with a float64 accumulator (`ours_float64_s`, ≤ 1 ulp)
  and streaming (`ours_streaming_s`: one WeightedMean.add per reply as it would arrive, then
  result(), float64 accumulator).

Times are the median of --repeats. Every result is checked against np.average over float64
copies (computed once); `max_abs_err` is the worst of our results. `extra_mem_ratio` is the
peak of numpy allocations during one call (tracemalloc, separate untimed run) over one model's
bytes; the result counts. Targets (issue 3): speedup ≥ 3× Flower's best, extra memory ≤ 2×.
"""

from __future__ import annotations

import gc
import statistics
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
from _common import emit, machine, make_parser, progress
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Parameters, Status
from flwr.server.strategy.aggregate import aggregate_inplace
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords as flower_arrayrecords

from hivenode.models.flower_arrays import array_to_numpy
from hivenode.strategies.aggregate import WeightedMean
from hivenode.strategies.flower_arrays import aggregate_arrayrecords

SHAPES = {"10x10M": (10, 10_000_000), "100x1M": (100, 1_000_000)}
TENSORS_PER_MODEL = 4
TARGET_SPEEDUP = 3.0
TARGET_MEM_RATIO = 2.0
WEIGHT_KEY = "num-examples"


def tensor_shapes(params: int) -> list[tuple[int, ...]]:
    """4 tensors: a big matrix, a second one, a vector and the rest (sums to `params`)."""
    a, b, c = params // 2, params // 4, params // 8
    return [(a // 1000, 1000), (b // 500, 500), (c,), (params - a - b - c,)]


def make_inputs(clients: int, params: int) -> tuple[list[RecordDict], list[float]]:
    rng = np.random.default_rng(0)
    shapes = tensor_shapes(params)
    assert sum(int(np.prod(s)) for s in shapes) == params
    replies, weights = [], []
    for _ in range(clients):
        examples = int(rng.integers(10, 1000))
        arrays = ArrayRecord(
            {
                f"t{i}": Array(rng.standard_normal(shape, dtype=np.float32))
                for i, shape in enumerate(shapes)
            }
        )
        replies.append(
            RecordDict({"arrays": arrays, "metrics": MetricRecord({WEIGHT_KEY: examples})})
        )
        weights.append(float(examples))
    return replies, weights


def reference(replies: list[RecordDict], weights: list[float]) -> list[np.ndarray[Any, Any]]:
    keys = list(replies[0]["arrays"])
    return [
        np.average(
            np.stack([r["arrays"][k].numpy().astype(np.float64) for r in replies]),
            axis=0,
            weights=weights,
        )
        for k in keys
    ]


def fit_results(replies: list[RecordDict]) -> list[tuple[Any, FitRes]]:
    """The same np.save bytes as Flower's legacy FitRes (no copy: bytes are shared)."""
    ok = Status(code=Code.OK, message="")
    return [
        (
            None,
            FitRes(
                status=ok,
                parameters=Parameters(
                    tensors=[a.data for a in r["arrays"].values()], tensor_type="numpy.ndarray"
                ),
                num_examples=int(r["metrics"][WEIGHT_KEY]),  # type: ignore[arg-type]
                metrics={},
            ),
        )
        for r in replies
    ]


def ours_streaming(replies: list[RecordDict], weights: list[float]) -> list[Any]:
    first = [array_to_numpy(a) for a in replies[0]["arrays"].values()]
    mean = WeightedMean(first)
    for reply, weight in zip(replies, weights, strict=True):
        mean.add([array_to_numpy(a) for a in reply["arrays"].values()], weight)
    return mean.result()


def as_arrays(result: Any) -> list[np.ndarray[Any, Any]]:
    if isinstance(result, ArrayRecord):
        return [a.numpy() for a in result.values()]
    return list(result)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        result = None
        gc.collect()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def peak_extra_bytes(fn: Callable[[], Any]) -> int:
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    result = fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del result
    return peak - base


def max_abs_err(result: Any, ref: list[np.ndarray[Any, Any]]) -> float:
    arrays = as_arrays(result)
    return max(
        float(np.abs(a.astype(np.float64) - r).max()) for a, r in zip(arrays, ref, strict=True)
    )


def bench_shape(name: str, clients: int, params: int, repeats: int) -> dict[str, Any]:
    progress(f"{name}: building {clients} ArrayRecords of {params:,} float32 parameters")
    replies, weights = make_inputs(clients, params)
    model_bytes = params * 4
    ref = reference(replies, weights)
    fits = fit_results(replies)
    methods: dict[str, Callable[[], Any]] = {
        "flower_inplace": lambda: aggregate_inplace(fits),  # type: ignore[arg-type]
        "flower_arrayrecords": lambda: flower_arrayrecords(replies, WEIGHT_KEY),
        "ours": lambda: aggregate_arrayrecords(replies, WEIGHT_KEY),
        "ours_2threads": lambda: aggregate_arrayrecords(replies, WEIGHT_KEY, workers=2),
        "ours_float64": lambda: aggregate_arrayrecords(
            replies, WEIGHT_KEY, accumulator_dtype=np.float64
        ),
        "ours_streaming": lambda: ours_streaming(replies, weights),
    }
    row: dict[str, Any] = {"clients": clients, "params": params, "model_mb": model_bytes / 1e6}
    errors: dict[str, float] = {}
    for method, fn in methods.items():
        progress(f"{name}: {method}")
        seconds, result = timed(fn, repeats)
        errors[method] = max_abs_err(result, ref)
        del result
        row[f"{method}_s"] = round(seconds, 4)
        row[f"{method}_mem_ratio"] = round(peak_extra_bytes(fn) / model_bytes, 3)
    flower_best = min(row["flower_inplace_s"], row["flower_arrayrecords_s"])
    row["flower_best_s"] = flower_best
    row["speedup"] = round(flower_best / row["ours_s"], 2)
    row["gb_per_s"] = round(clients * model_bytes / row["ours_s"] / 1e9, 2)
    row["flower_gb_per_s"] = round(clients * model_bytes / flower_best / 1e9, 2)
    row["max_abs_err"] = errors["ours"]
    row["float64_max_abs_err"] = errors["ours_float64"]
    row["flower_max_abs_err"] = max(errors[m] for m in errors if m.startswith("flower"))
    row["extra_mem_ratio"] = row["ours_mem_ratio"]
    return row


def main() -> None:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shapes = {
        name: bench_shape(name, clients, params, args.repeats)
        for name, (clients, params) in SHAPES.items()
    }
    worst = min(shapes, key=lambda name: shapes[name]["speedup"])
    result = {
        "shapes": shapes,
        "speedup_vs_flower": shapes[worst]["speedup"],
        "gb_per_s": shapes[worst]["gb_per_s"],
        "worst_shape": worst,
        "extra_mem_ratio": max(s["extra_mem_ratio"] for s in shapes.values()),
        "targets": {"speedup": TARGET_SPEEDUP, "extra_mem_ratio": TARGET_MEM_RATIO},
        "passed": shapes[worst]["speedup"] >= TARGET_SPEEDUP
        and all(s["extra_mem_ratio"] <= TARGET_MEM_RATIO for s in shapes.values()),
        "machine": machine(),
    }
    rows: list[tuple[str, Any]] = []
    for name, s in shapes.items():
        rows += [
            (f"{name} flower aggregate_inplace s", s["flower_inplace_s"]),
            (f"{name} flower aggregate_arrayrecords s", s["flower_arrayrecords_s"]),
            (f"{name} ours s (2 threads)", f"{s['ours_s']:.3g} ({s['ours_2threads_s']:.3g})"),
            (f"{name} ours streaming s", s["ours_streaming_s"]),
            (f"{name} speedup / GB/s", f"{s['speedup']}x / {s['gb_per_s']}"),
            (f"{name} max abs err", s["max_abs_err"]),
            (f"{name} extra memory / model", s["extra_mem_ratio"]),
        ]
    rows += [("speedup vs flower (worst shape)", result["speedup_vs_flower"])]
    rows += [("targets met", result["passed"])]
    emit(result, args.json, rows, "Weighted aggregation, decode included")


if __name__ == "__main__":
    main()
