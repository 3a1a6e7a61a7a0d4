"""Fuzz every decoder of network bytes and every request handler for a fixed budget.

    python benchmarks/fuzz.py [--json] [--seconds-per-target 30] [--seed 0] [--deadline 2]
        [--out DIR] [--targets message,advert,...] [--atheris-targets message,...]
        [--network-seconds S]
    python benchmarks/fuzz.py --replay TARGET FILE

Targets (benchmarks/fuzz_targets.py): the message envelope and stream framing, gossip records
(adverts, Q-table deltas, signed pubsub messages), Q-table files, Flower messages and arrays,
parallel job orders, bulk manifests, inference requests and replies, and model files
(pickle opcodes, ONNX/SavedModel protobuf, safetensors, identify() on every kind). Each is
fuzzed by hypothesis (`st.binary()`, valid encodings with bytes mutated, valid documents with
one field altered, random nested msgpack); the codec targets also by atheris (libFuzzer,
coverage-guided) when it is installed, else by a mutation fuzzer over the valid corpus.
`handlers` sends fuzzed requests to a real node's handlers over libp2p on 127.0.0.1 and
checks that the node keeps answering a status request.

A crash is any exception a target does not document; a hang is an input that takes longer
than --deadline (measured), or a node that stops answering. Each (target, engine) runs in a
worker process, so a segfault or an unkillable hang ends only that worker. Findings are saved
under --out with their minimised inputs; `--replay` reruns one. Exit status: 0 when there is
no crash and no hang, 1 otherwise.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import emit, machine, make_parser, progress
from fuzz_engines import DEADLINE_S, SHRINK_GRACE_S, Inflight, atheris_version, judge
from fuzz_targets import TARGETS

WORKER = Path(__file__).with_name("fuzz_worker.py")
ATHERIS_TARGETS = ("message", "advert", "pickle_scan", "flower_array")
"""The byte-level codecs atheris fuzzes besides hypothesis (the msgpack + tensor codec first)."""
STARTUP_S = 90.0
"""A worker's allowance beyond its budget: imports, corpus, starting nodes, a last shrink."""


def plan(
    targets: list[str], atheris: list[str], network_s: float, seconds: float
) -> list[tuple[str, str, float]]:
    jobs = [(name, "hypothesis", seconds) for name in targets]
    coverage_engine = "atheris" if atheris_version() else "mutation"
    jobs += [(name, coverage_engine, seconds) for name in atheris]
    if network_s > 0:
        jobs.append(("handlers", "network", network_s))
    return jobs


def run_worker(name: str, engine: str, seconds: float, args: Any, out: Path) -> dict[str, Any]:
    """One worker; its tally, completed by what its exit status and libFuzzer's output say."""
    (out / "workers").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{name}-{engine}-", dir=out / "workers"))
    result, inflight = work / "result.json", work / "inflight"
    command = [
        sys.executable,
        str(WORKER),
        "--target",
        name,
        "--engine",
        engine,
        "--seconds",
        str(seconds),
        "--seed",
        str(args.seed),
        "--deadline",
        str(args.deadline),
        "--out",
        str(out),
        "--result",
        str(result),
        "--inflight",
        str(inflight),
    ]
    limit = seconds + STARTUP_S + SHRINK_GRACE_S
    with (work / "stdout").open("wb") as stdout, (work / "stderr").open("wb") as stderr:
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, cwd=WORKER.parent)
        try:
            code = proc.wait(limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
    tally = _load(result, name, engine)
    log = (work / "stderr").read_text(errors="replace")
    if engine == "atheris":
        _atheris_stats(tally, log)
    if code != 0:
        tally["findings"].append(_death(name, engine, code, log, inflight, limit))
    tally["crashes"] = sum(f["kind"] == "crash" for f in tally["findings"])
    tally["hangs"] = sum(f["kind"] == "hang" for f in tally["findings"])
    tally["masked"] = sum(f["kind"] == "masked" for f in tally["findings"])
    tally["worker_dir"] = str(work)
    return tally


def _load(result: Path, name: str, engine: str) -> dict[str, Any]:
    import json

    try:
        loaded: dict[str, Any] = json.loads(result.read_text())
        return loaded
    except (OSError, ValueError):
        return {
            "target": name,
            "engine": engine,
            "inputs": 0,
            "refused": 0,
            "slowest_s": 0.0,
            "findings": [],
            "notes": ["the worker wrote no result"],
        }


def _atheris_stats(tally: dict[str, Any], log: str) -> None:
    """libFuzzer's own count of runs (the tally's lags by up to half a second) and coverage."""
    runs = re.findall(r"stat::number_of_executed_units: (\d+)", log)
    if runs:
        tally["inputs"] = max(tally.get("inputs", 0), int(runs[-1]))
    progress_lines = re.findall(r"cov: (\d+) ft: (\d+)", log)
    if progress_lines:
        tally["coverage_edges"], tally["coverage_features"] = map(int, progress_lines[-1])


def _death(
    name: str, engine: str, code: int | None, log: str, inflight: Path, limit: float
) -> dict[str, Any]:
    """A worker that died or had to be killed: a crash (a signal, libFuzzer's own error) or
    a hang (past its allowance), with the input that was running."""
    data = Inflight.read(inflight) if inflight.exists() else b""
    if code is None:
        kind, error = "hang", f"worker killed after {limit:.0f} s without finishing"
    elif code < 0:
        kind, error = "crash", f"worker died of {signal.Signals(-code).name}"
    else:
        kind = "hang" if "libFuzzer: timeout" in log else "crash"
        error = f"worker exited with status {code}: " + " | ".join(log.strip().splitlines()[-3:])
    return {
        "kind": kind,
        "target": name,
        "engine": engine,
        "error": error[:300],
        "location": "(worker process)",
        "seconds": 0.0,
        "count": 1,
        "input_bytes": len(data),
        "input_hex": data[:256].hex(),
        "saved": None,
        "traceback": log[-4000:],
    }


def replay(name: str, path: Path, deadline: float) -> int:
    """Run one saved input again and print what happens."""
    data = path.read_bytes()
    if name == "handlers":
        from fuzz_network import replay_network

        outcome, detail = replay_network(data, deadline)
    else:
        outcome, finding = judge(TARGETS[name], data, deadline, "replay")
        detail = finding.traceback or finding.error if finding is not None else ""
    print(f"{name}: {outcome} ({len(data)} bytes)")
    if detail:
        print(detail)
    return 1 if outcome in ("crash", "hang") else 0


def summarise(tallies: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per target: every engine's figures, and the distinct findings of all of them."""
    out: dict[str, dict[str, Any]] = {}
    for tally in tallies:
        name = tally["target"]
        entry = out.setdefault(
            name,
            {
                "exercises": TARGETS[name].exercises
                if name in TARGETS
                else "every libp2p request handler of a real node, over 127.0.0.1",
                "inputs": 0,
                "crashes": 0,
                "hangs": 0,
                "masked": 0,
                "slowest_s": 0.0,
                "engines": {},
            },
        )
        entry["inputs"] += tally["inputs"]
        for kind in ("crashes", "hangs", "masked"):
            entry[kind] += tally[kind]
        entry["slowest_s"] = max(entry["slowest_s"], tally.get("slowest_s", 0.0))
        entry["engines"][tally["engine"]] = {
            k: v for k, v in tally.items() if k not in ("findings", "target", "engine")
        }
    return out


def main() -> int:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--seconds-per-target", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--deadline",
        type=float,
        default=DEADLINE_S,
        help="seconds one input may take before it counts as a hang",
    )
    parser.add_argument("--out", type=Path, help="where findings are saved (default: a temp dir)")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--atheris-targets", default=",".join(ATHERIS_TARGETS))
    parser.add_argument(
        "--network-seconds",
        type=float,
        help="budget of the `handlers` target (default: --seconds-per-target; 0: skip)",
    )
    parser.add_argument("--replay", nargs=2, metavar=("TARGET", "FILE"))
    args = parser.parse_args()
    if args.replay:
        return replay(args.replay[0], Path(args.replay[1]), args.deadline)

    names = [n for n in args.targets.split(",") if n]
    atheris = [n for n in args.atheris_targets.split(",") if n]
    unknown = sorted(set(names + atheris) - set(TARGETS))
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    network_s = args.seconds_per_target if args.network_seconds is None else args.network_seconds
    out = args.out or Path(tempfile.mkdtemp(prefix="hivenode-fuzz-"))
    out.mkdir(parents=True, exist_ok=True)
    jobs = plan(names, atheris, network_s, args.seconds_per_target)
    load_before = os.getloadavg()
    started = time.monotonic()
    tallies = []
    for index, (name, engine, seconds) in enumerate(jobs, 1):
        progress(f"[{index}/{len(jobs)}] {name} with {engine} for {seconds:g} s")
        tally = run_worker(name, engine, seconds, args, out)
        progress(
            f"    {tally['inputs']} inputs, {tally['crashes']} crashes, {tally['hangs']} "
            f"hangs, slowest {tally.get('slowest_s', 0):.3f} s"
        )
        tallies.append(tally)
    targets = summarise(tallies)
    findings = [f for t in tallies for f in t["findings"]]
    version = atheris_version()
    result = {
        "benchmark": "fuzz",
        "machine": machine(),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "budget_s": args.seconds_per_target,
        "network_budget_s": network_s,
        "deadline_s": args.deadline,
        "seed": args.seed,
        "wall_s": round(time.monotonic() - started, 1),
        "atheris": {
            "available": version is not None,
            "version": version,
            "targets": atheris if version else [],
            "fallback": None if version else "mutation engine over the valid corpus",
        },
        "targets": targets,
        "inputs": sum(t["inputs"] for t in targets.values()),
        "crashes": sum(t["crashes"] for t in targets.values()),
        "hangs": sum(t["hangs"] for t in targets.values()),
        "masked": sum(t["masked"] for t in targets.values()),
        "findings": findings,
        "out_dir": str(out),
    }
    result["pass"] = result["crashes"] == 0 and result["hangs"] == 0
    rows: list[tuple[str, Any]] = [
        (
            name,
            f"{t['inputs']:>8} inputs  {t['crashes']} crashes  {t['hangs']} hangs  "
            f"{t['masked']} masked  slowest {t['slowest_s']:.3f} s  "
            f"({', '.join(t['engines'])})",
        )
        for name, t in targets.items()
    ]
    rows += [
        ("inputs", result["inputs"]),
        ("crashes", result["crashes"]),
        ("hangs", result["hangs"]),
        ("masked (caught by a catch-all)", result["masked"]),
        ("budget per target (s)", args.seconds_per_target),
        ("findings saved in", str(out)),
        ("0 crashes and 0 hangs", result["pass"]),
    ]
    emit(result, args.json, rows, "hivenode fuzzing")
    if not args.json:
        for f in findings:
            where = f["saved"] or f["input_hex"][:80]
            print(f"\n{f['kind']} in {f['target']} ({f['engine']}, {f['count']}x): {f['error']}")
            print(f"  at {f['location']}\n  input {f['input_bytes']} bytes: {where}")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
