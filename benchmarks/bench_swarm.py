"""Swarm convergence: N in-process nodes on 127.0.0.1, timed until every peer table is full.

    python benchmarks/bench_swarm.py [--json] [--nodes 20,100] [--repeats 1] [--seed 0]

Each size runs in a fresh child process (this script re-invoked with --child): run_swarm
uses trio.run and py-libp2p keeps module-level state, and a fresh process keeps the RSS
figure of one size free of the previous one's heap.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import time
from typing import Any

from _common import clean_env, emit, machine, make_parser, median, progress, rounded

TARGETS: dict[str, dict[str, float]] = {
    "20": {"convergence_s_max": 10},
    "100": {"convergence_s_max": 60, "rss_mb_total_max": 2000},
}
FIELDS = (
    "nodes",
    "converged",
    "convergence_s",
    "startup_s",
    "rss_mb_total",
    "rss_mb_per_node",
    "adverts_per_s",
)
MEDIANS = (
    "convergence_s",
    "startup_s",
    "rss_mb_total",
    "rss_mb_per_node",
    "adverts_per_s",
    "cpu_percent",
)
CHILD_GRACE_S = 120.0
"""On top of --timeout: start-up, shutdown and the import of libp2p (about 1.4 s)."""


def run_child(nodes: int, seed: int, timeout: float) -> None:
    """One swarm in this process; its report as one JSON line on stdout."""
    from hivenode.sim.swarm import run_swarm

    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    report = run_swarm(nodes=nodes, processes=False, seed=seed, timeout=timeout, progress=False)
    result = report.as_dict()
    wall_s = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["wall_s"] = round(wall_s, 3)
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1e3, 1)  # Linux reports KiB
    # one trio loop can use one core: near 100 % here means the loop was the bottleneck
    cpu_s = usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime
    result["cpu_percent"] = round(100 * cpu_s / wall_s, 1)
    print(json.dumps(result))


def run_size(nodes: int, seed: int, timeout: float) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "--child",
        "--nodes", str(nodes), "--seed", str(seed), "--timeout", str(timeout),
    ]  # fmt: skip
    try:
        done = subprocess.run(
            cmd, env=clean_env(), capture_output=True, text=True, timeout=timeout + CHILD_GRACE_S
        )
    except subprocess.TimeoutExpired:
        return {"nodes": nodes, "seed": seed, "converged": False, "error": "child timed out"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        error = last_exception(done.stderr) or f"exit status {done.returncode}, no report"
        return {"nodes": nodes, "seed": seed, "converged": False, "error": error}
    report: dict[str, Any] = json.loads(lines[-1])
    run = {name: report.get(name) for name in FIELDS}
    run.update(
        seed=seed,
        hubs=report.get("hubs"),
        shutdown_s=report.get("shutdown_s"),
        peak_rss_mb=report.get("peak_rss_mb"),
        cpu_percent=report.get("cpu_percent"),
        wall_s=report.get("wall_s"),
    )
    return run


def last_exception(stderr: str) -> str:
    """The innermost exception line of a traceback (exception groups nest them)."""
    pattern = re.compile(r"^[\s|+]*((?:[\w.]+\.)?\w*(?:Error|Exception|Exit)\w*(?::.*)?)$")
    found = [m.group(1) for line in stderr.splitlines() if (m := pattern.match(line))]
    plain = [f for f in found if not f.startswith(("ExceptionGroup", "BaseExceptionGroup"))]
    return (plain or found or [""])[-1].strip()


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per size: medians over the repeats, and whether every repeat converged."""
    sizes: dict[str, dict[str, Any]] = {}
    for nodes in sorted({run["nodes"] for run in runs}):
        mine = [run for run in runs if run["nodes"] == nodes]
        done = [run for run in mine if run.get("converged")]
        summary: dict[str, Any] = {
            "repeats": len(mine),
            "all_converged": len(done) == len(mine),
        }
        for name in MEDIANS:
            values = [run[name] for run in done if run.get(name) is not None]
            summary[f"{name}_median"] = rounded(median(values), 3)
        sizes[str(nodes)] = summary
    return sizes


def judge(sizes: dict[str, dict[str, Any]]) -> bool:
    """Every size converged every time, and those with a target have medians within it."""
    verdict = all(summary["all_converged"] for summary in sizes.values())
    for size, target in TARGETS.items():
        summary = sizes.get(size)
        if summary is None:
            continue
        ok = summary["all_converged"]
        for name, bound in target.items():
            value = summary.get(name.removesuffix("_max") + "_median")
            ok = ok and value is not None and value <= bound
        summary["pass"] = ok
        verdict = verdict and ok
    return verdict


def main() -> None:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="20,100", help="comma-separated swarm sizes")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="first seed; repeat i uses seed+i")
    parser.add_argument("--timeout", type=float, default=180.0, help="per swarm, seconds")
    parser.add_argument("--child", action="store_true", help="internal: run one swarm here")
    args = parser.parse_args()
    if args.child:
        run_child(int(args.nodes), args.seed, args.timeout)
        return

    sizes = [int(n) for n in args.nodes.split(",") if n.strip()]
    runs = []
    for nodes in sizes:
        for repeat in range(args.repeats):
            seed = args.seed + repeat
            progress(f"swarm of {nodes} nodes, seed {seed} ({repeat + 1}/{args.repeats})")
            run = run_size(nodes, seed, args.timeout)
            progress(
                f"  converged={run.get('converged')} in {run.get('convergence_s')} s, "
                f"RSS {run.get('rss_mb_total')} MB, CPU {run.get('cpu_percent')} % of a core"
                + (f", {run['error']}" if "error" in run else "")
            )
            runs.append(run)
    summary = summarise(runs)
    passed = judge(summary)
    result = {
        "runs": runs,
        "summary": summary,
        "targets": TARGETS,
        "pass": passed,
        "machine": machine(),
    }
    rows: list[tuple[str, Any]] = []
    for size, figures in summary.items():
        rows += [
            (f"{size} nodes: converged (all repeats)", figures["all_converged"]),
            (f"{size} nodes: convergence s (median)", figures["convergence_s_median"]),
            (f"{size} nodes: start-up s (median)", figures["startup_s_median"]),
            (f"{size} nodes: RSS MB total (median)", figures["rss_mb_total_median"]),
            (f"{size} nodes: RSS MB per node (median)", figures["rss_mb_per_node_median"]),
            (f"{size} nodes: adverts/s (median)", figures["adverts_per_s_median"]),
            (f"{size} nodes: CPU % of one core (median)", figures["cpu_percent_median"]),
        ]
        if size in TARGETS:
            rows.append((f"{size} nodes: target {TARGETS[size]}", figures["pass"]))
    rows.append(("overall", passed))
    emit(result, args.json, rows, f"bench_swarm ({args.repeats} repeat(s) per size)")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
