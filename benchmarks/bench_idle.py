"""Idle cost of a real daemon: RSS and CPU of `hivenode run` doing nothing but staying joined.

    python benchmarks/bench_idle.py [--json] [--seconds 60] [--settle 10]
                                    [--variants alone,one_peer]

`alone`: one daemon, no peers. `one_peer`: daemon A, and daemon B bootstrapping through A;
the figures are A's (B's are reported beside them). Each variant waits until the control
socket answers (and, with a peer, until A's peer table holds B), lets the daemon settle,
then samples its RSS once a second and its CPU time over the whole window.
CPU is in percent of one core, as psutil and top report it.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import psutil
from _common import (
    Daemon,
    emit,
    machine,
    make_parser,
    median,
    progress,
    rounded,
    wait_until,
)

TARGETS = {"rss_mb_max": 150.0, "cpu_percent_avg_max": 2.0}
PEER_JOIN_TIMEOUT = 60.0
SAMPLE_PERIOD = 1.0


def sample(pids: dict[str, int], seconds: float) -> dict[str, dict[str, Any]]:
    """RSS every SAMPLE_PERIOD and CPU time over the window, for several processes at once."""
    procs = {name: psutil.Process(pid) for name, pid in pids.items()}
    rss: dict[str, list[float]] = {name: [] for name in procs}
    cpu_start = {name: _cpu_seconds(proc) for name, proc in procs.items()}
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        for name, proc in procs.items():
            rss[name].append(proc.memory_info().rss / 1e6)
        now = time.perf_counter()
        if now >= deadline:
            break
        time.sleep(min(SAMPLE_PERIOD, deadline - now))
    wall = time.perf_counter() - started
    figures = {}
    for name, proc in procs.items():
        cpu = _cpu_seconds(proc) - cpu_start[name]
        full = proc.memory_full_info()
        figures[name] = {
            "rss_mb": rounded(median(rss[name])),
            "rss_mb_max": rounded(max(rss[name])),
            "uss_mb": rounded(full.uss / 1e6),
            "cpu_percent_avg": round(100 * cpu / wall, 2),
            "cpu_s": round(cpu, 3),
            "threads": proc.num_threads(),
            "seconds": round(wall, 1),
        }
    return figures


def _cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def judge(figures: dict[str, Any]) -> bool:
    return bool(
        figures["rss_mb_max"] <= TARGETS["rss_mb_max"]
        and figures["cpu_percent_avg"] <= TARGETS["cpu_percent_avg_max"]
    )


def run_alone(seconds: float, settle: float) -> dict[str, Any]:
    with Daemon("idle") as daemon:
        ready = daemon.wait_ready()
        progress(f"alone: daemon ready in {ready:.2f} s; settling {settle:g} s")
        time.sleep(settle)
        progress(f"alone: sampling for {seconds:g} s")
        figures = sample({"a": daemon.pid}, seconds)["a"]
        figures["ready_s"] = round(ready, 2)
        figures["peers"] = daemon.status()["peers"]
    return figures


def run_one_peer(seconds: float, settle: float) -> dict[str, Any]:
    with Daemon("a") as a:
        a.wait_ready()
        with Daemon("b", bootstrap=[a.address()]) as b:
            b.wait_ready()
            joined = wait_until(
                lambda: a.status()["peers"] >= 1 and b.status()["peers"] >= 1,
                PEER_JOIN_TIMEOUT,
                "A and B to hold each other's adverts",
            )
            progress(f"one_peer: A and B joined in {joined:.2f} s; settling {settle:g} s")
            time.sleep(settle)
            progress(f"one_peer: sampling A and B for {seconds:g} s")
            both = sample({"a": a.pid, "b": b.pid}, seconds)
            status = a.status()
    figures = both["a"]
    figures["peers"] = status["peers"]
    figures["connections"] = status["connections"]
    figures["adverts"] = status["adverts"]
    figures["peer_b"] = both["b"]
    return figures


def main() -> None:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="sampling window")
    parser.add_argument("--settle", type=float, default=10.0, help="wait before sampling")
    parser.add_argument("--variants", default="alone,one_peer", help="alone, one_peer or both")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - {"alone", "one_peer"}
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(sorted(unknown))}")

    result: dict[str, Any] = {}
    verdicts = []
    if "alone" in variants:
        result.update(run_alone(args.seconds, args.settle))
        result["alone_pass"] = judge(result)
        verdicts.append(result["alone_pass"])
    if "one_peer" in variants:
        one_peer = run_one_peer(args.seconds, args.settle)
        one_peer["pass"] = judge(one_peer)
        verdicts.append(one_peer["pass"])
        result["one_peer"] = one_peer
    result["targets"] = TARGETS
    result["pass"] = all(verdicts)
    result["machine"] = machine()

    rows: list[tuple[str, Any]] = []
    for label, figures in (("alone", result), ("one peer (A)", result.get("one_peer"))):
        if not figures or "rss_mb" not in figures:
            continue
        rows += [
            (f"{label}: RSS MB (median)", figures["rss_mb"]),
            (f"{label}: RSS MB (max)", figures["rss_mb_max"]),
            (f"{label}: CPU % of one core (avg)", figures["cpu_percent_avg"]),
            (f"{label}: seconds sampled", figures["seconds"]),
        ]
    rows.append(("targets", "RSS <= 150 MB, CPU <= 2 % of one core"))
    rows.append(("overall", result["pass"]))
    emit(result, args.json, rows, "bench_idle: one idle daemon")
    sys.exit(0 if result["pass"] else 1)


if __name__ == "__main__":
    main()
