"""Peer-to-peer data, pipeline and model parallelism: throughput and traffic.

    python benchmarks/bench_parallel.py [--json] [--nodes 2,4,8] [--steps 30] [--seed 0]

Every scenario is `hivenode sim parallel` (`hivenode.parallel.simulation.run_parallel_sim`):
real nodes on 127.0.0.1 in one process and one trio loop, an MLP on a synthetic task, then
the same training on one node from the same weights and batches.

- data parallel, N nodes × batch 32 (an 85k-parameter MLP, and a 1.1M one at 4 nodes):
  samples/s against the single node on batch N·32, the bytes each node sends per step
  against the all-reduce minimum 2·(n−1)/n of the gradient, and `max_param_diff`;
- fp16 and 8-bit updates: bytes against the uncompressed all-reduce;
- pipeline (3 stages × 4 micro-batches) and model parallel (3 stages, one micro-batch);
- one of 4 data-parallel peers killed mid-step, one dying while it sends its reduced part
  back, and one hanging (2 s peer timeout): the time the failed step lost against the
  median step.

Targets: float32 runs equal the single node (max_param_diff ≤ 1e-5, replicas identical);
each node sends at most 5 % over the all-reduce minimum (headers); a killed peer costs under
a second, a hanging one at most its peer timeout plus a second. Throughput has no target:
the simulated nodes share one event loop and the machine's cores, so samples/s measures the
protocol's overhead, not a speed-up.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from _common import emit, machine, make_parser, progress, rounded

from hivenode.parallel.faults import Fault
from hivenode.parallel.simulation import SimConfig, SimReport, run_parallel_sim
from hivenode.protocol.compression import Compression
from hivenode.sim.swarm import quiet_libp2p

BYTES_SLACK = 1.05
KILL_LOST_MAX_S = 1.0
HANG_TIMEOUT_S = 2.0
BIG_MODEL = (1024, 1024)


def measure(config: SimConfig) -> SimReport:
    progress(
        f"{config.mode}: {config.nodes} nodes, {config.steps} steps"
        + (f", {config.compression}" if config.compression is not Compression.NONE else "")
        + (f", fault {config.fault.value}" if config.fault else "")
        + (f", hidden {list(config.hidden)}" if config.hidden else "")
    )
    return trio.run(run_parallel_sim, config)


def summary(report: SimReport) -> dict[str, Any]:
    theoretical = report.theoretical_bytes_per_node
    return {
        "mode": report.mode,
        "nodes": report.nodes,
        "parameters": report.parameters,
        "global_batch": report.global_batch,
        "samples_per_s": rounded(report.samples_per_s),
        "single_node_samples_per_s": rounded(report.single_node_samples_per_s),
        "speed_vs_single": rounded(report.samples_per_s / report.single_node_samples_per_s, 3),
        "step_ms_p50": rounded(report.step_ms_p50, 2),
        "bytes_per_node_per_step": report.bytes_per_node_per_step,
        "theoretical_bytes_per_node": theoretical,
        "bytes_vs_minimum": rounded(report.bytes_per_node_per_step / theoretical, 4)
        if theoretical
        else None,
        "bytes_per_step": report.bytes_per_step,
        "max_param_diff": report.max_param_diff,
        "equivalent": report.equivalent,
        "replicas_identical": report.replicas_identical,
        "compression": report.compression,
        "fault": report.fault,
        "time_lost_s": rounded(report.time_lost_s, 3) if report.time_lost_s is not None else None,
    }


def main() -> None:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="2,4,8", help="data-parallel sizes")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    quiet_libp2p()
    steps, seed = args.steps, args.seed
    runs: dict[str, dict[str, Any]] = {}
    for n in (int(v) for v in args.nodes.split(",") if v):
        runs[f"data_{n}"] = summary(measure(SimConfig("data", n, seed, steps)))
    runs["data_4_big"] = summary(
        measure(SimConfig("data", 4, seed, max(5, steps // 3), hidden=BIG_MODEL))
    )
    for codec in (Compression.FP16, Compression.INT8):
        runs[f"data_4_{codec.value}"] = summary(
            measure(SimConfig("data", 4, seed, steps, compression=codec))
        )
    runs["pipeline_3x4"] = summary(measure(SimConfig("pipeline", 3, seed, steps, 128)))
    runs["model_3"] = summary(measure(SimConfig("model", 3, seed, steps, 128)))
    fault_steps = max(steps, 20)
    runs["data_4_kill"] = summary(
        measure(SimConfig("data", 4, seed, fault_steps, fault=Fault.KILL_MID_STEP))
    )
    runs["data_4_die_replying"] = summary(
        measure(SimConfig("data", 4, seed, fault_steps, fault=Fault.DIE_WHILE_REPLYING))
    )
    runs["data_4_hang"] = summary(
        measure(
            SimConfig("data", 4, seed, fault_steps, fault=Fault.HANG, peer_timeout=HANG_TIMEOUT_S)
        )
    )
    exact = [r for r in runs.values() if r["equivalent"] is not None]
    uncompressed = [r for k, r in runs.items() if k.startswith("data_") and r["fault"] is None]
    uncompressed = [r for r in uncompressed if r["compression"] == "none"]
    checks = {
        "equivalent": all(r["equivalent"] for r in exact),
        "replicas_identical": all(
            r["replicas_identical"] for r in runs.values() if r["replicas_identical"] is not None
        ),
        "bytes_within_5pct_of_minimum": all(
            r["bytes_vs_minimum"] <= BYTES_SLACK for r in uncompressed
        ),
        "kill_costs_under_1s": runs["data_4_kill"]["time_lost_s"] < KILL_LOST_MAX_S
        and runs["data_4_die_replying"]["time_lost_s"] < KILL_LOST_MAX_S,
        "hang_costs_at_most_timeout_plus_1s": runs["data_4_hang"]["time_lost_s"]
        <= HANG_TIMEOUT_S + 1,
    }
    result = {"machine": machine(), "steps": steps, "seed": seed, "runs": runs, **checks}
    result["pass"] = all(checks.values())
    rows: list[tuple[str, Any]] = []
    for name, run in runs.items():
        figure = (
            f"{run['samples_per_s']} samples/s (single node {run['single_node_samples_per_s']})"
        )
        if run["bytes_vs_minimum"] is not None:
            figure += f", {run['bytes_per_node_per_step']:,.0f} B/node/step"
            figure += f" = {run['bytes_vs_minimum']}× minimum"
        else:
            figure += f", {run['bytes_per_step']:,.0f} B/step"
        figure += f", Δ {run['max_param_diff']:.1e}"
        if run["time_lost_s"] is not None:
            figure += f", lost {run['time_lost_s']} s"
        rows.append((name, figure))
    rows += [(name, value) for name, value in checks.items()]
    emit(result, args.json, rows, "peer-to-peer parallel training on 127.0.0.1")
    raise SystemExit(0 if result["pass"] else 1)


if __name__ == "__main__":
    main()
