"""Latency of the CLI's client commands against a running daemon, as a user runs them.

    python benchmarks/bench_status.py [--json] [--repeats 15] [--peers 1]

Times `hivenode status --json` and `hivenode peers --json` as subprocesses (interpreter
start-up, imports, the request and the print), and in the same run, interleaved, the floor
every Python command pays: `python -c pass` with the same interpreter, and the import of
the CLI module alone. With --peers K, K more daemons join first so `peers` has rows.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from _common import (
    Daemon,
    clean_env,
    emit,
    hivenode_command,
    machine,
    make_parser,
    median,
    percentile,
    progress,
    rounded,
    wait_until,
)

TARGET_MS = 300.0
PEER_JOIN_TIMEOUT = 60.0


def timed_ms(cmd: list[str], env: dict[str, str], expect_json: bool) -> float:
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True)
    elapsed = (time.perf_counter() - started) * 1000
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.decode()}")
    if expect_json:
        json.loads(done.stdout)  # a run that printed garbage must not count as fast
    return elapsed


def measure(commands: dict[str, tuple[list[str], bool]], repeats: int) -> dict[str, list[float]]:
    """Each repeat runs every command once, in turn, so machine noise hits them alike."""
    env = clean_env()
    for cmd, expect_json in commands.values():  # warm the page cache and .pyc files
        timed_ms(cmd, env, expect_json)
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for repeat in range(repeats):
        for name, (cmd, expect_json) in commands.items():
            samples[name].append(timed_ms(cmd, env, expect_json))
        if (repeat + 1) % 5 == 0:
            progress(f"{repeat + 1}/{repeats} repeats")
    return samples


def main() -> None:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--peers", type=int, default=1, help="extra daemons joined to the first")
    args = parser.parse_args()

    daemons: list[Daemon] = []
    try:
        hub = Daemon("status").start()
        daemons.append(hub)
        hub.wait_ready()
        for index in range(args.peers):
            daemons.append(Daemon(f"peer{index}", bootstrap=[hub.address()]).start())
        for daemon in daemons[1:]:
            daemon.wait_ready()
        wait_until(
            lambda: hub.status()["peers"] >= args.peers,
            PEER_JOIN_TIMEOUT,
            f"{args.peers} peer(s) in the daemon's table",
        )
        progress(f"daemon ready with {hub.status()['peers']} peer(s); timing {args.repeats} runs")
        runtime = ["--runtime-dir", str(hub.runtime_dir)]
        hivenode = hivenode_command()
        commands = {
            "python_startup": ([sys.executable, "-c", "pass"], False),
            "cli_import": ([sys.executable, "-c", "import hivenode.cli"], False),
            "status": ([*hivenode, "status", "--json", *runtime], True),
            "peers": ([*hivenode, "peers", "--json", *runtime], True),
        }
        samples = measure(commands, args.repeats)
        peer_rows = len(hub.peers())
    finally:
        for daemon in daemons:
            daemon.stop()

    result: dict[str, Any] = {}
    for name, values in samples.items():
        result[f"{name}_ms_median"] = rounded(median(values))
        result[f"{name}_ms_p90"] = rounded(percentile(values, 0.9))
    result.update(
        target_ms=TARGET_MS,
        repeats=args.repeats,
        peer_rows=peer_rows,
        samples_ms={name: [round(v, 1) for v in values] for name, values in samples.items()},
        machine=machine(),
    )
    result["pass"] = (
        result["status_ms_median"] <= TARGET_MS and result["peers_ms_median"] <= TARGET_MS
    )
    rows: list[tuple[str, Any]] = []
    for name, label in (
        ("status", "hivenode status --json"),
        ("peers", f"hivenode peers --json ({peer_rows} rows)"),
        ("python_startup", "python -c pass (baseline)"),
        ("cli_import", "python -c 'import hivenode.cli'"),
    ):
        rows.append((f"{label}: median / p90 ms", f"{result[f'{name}_ms_median']:.0f} / "
                     f"{result[f'{name}_ms_p90']:.0f}"))  # fmt: skip
    rows += [("target", f"status and peers <= {TARGET_MS:g} ms (median)"), ("pass", result["pass"])]
    emit(result, args.json, rows, f"bench_status ({args.repeats} runs each)")
    sys.exit(0 if result["pass"] else 1)


if __name__ == "__main__":
    main()
