"""One fuzzing engine on one target, in a process of its own (run by benchmarks/fuzz.py).

A segfault in C code, a hang the watchdog cannot interrupt or an allocation that exhausts
memory then ends this process only; the parent reads the input that was running from the
in-flight map and reports it.

    python benchmarks/fuzz_worker.py --target message --engine hypothesis --seconds 30 \\
        --seed 0 --deadline 2 --out DIR --result result.json [--inflight PATH]
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

from fuzz_engines import (
    DEADLINE_S,
    Runner,
    Tally,
    run_atheris,
    run_hypothesis,
    run_mutation,
    tally_json,
)
from fuzz_model_targets import scratch_dir
from fuzz_targets import TARGETS

ENGINES = ("hypothesis", "mutation", "atheris", "network")
MEMORY_LIMIT_BYTES = 4 * 1024**3
"""An input that makes a decoder allocate more than this fails with MemoryError (a crash)
instead of pushing a shared machine into swap."""


def save_findings(tally: Tally, out: Path) -> None:
    """Each finding's (minimised) input as a .bin file, its traceback beside it as .txt."""
    out.mkdir(parents=True, exist_ok=True)
    for index, finding in enumerate(tally.findings.values()):
        stem = out / f"{tally.target}-{tally.engine}-{finding.kind}-{index}"
        stem.with_suffix(".bin").write_bytes(finding.data)
        stem.with_suffix(".txt").write_text(
            f"{finding.kind} in {finding.target} ({finding.engine}), seen {finding.count}x\n"
            f"{finding.error}\nat {finding.location}\n"
            f"replay: python benchmarks/fuzz.py --replay {finding.target} {stem}.bin\n\n"
            f"{finding.traceback}"
        )
        finding.saved = str(stem.with_suffix(".bin"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--engine", choices=ENGINES, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deadline", type=float, default=DEADLINE_S)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--inflight", type=Path)
    args = parser.parse_args(argv)

    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard == resource.RLIM_INFINITY or hard > MEMORY_LIMIT_BYTES:
        resource.setrlimit(resource.RLIMIT_DATA, (MEMORY_LIMIT_BYTES, hard))

    if args.engine == "network":
        from fuzz_network import run_network

        tally = run_network(args.seconds, args.seed, args.deadline, scratch_dir())
    else:
        runner = Runner(TARGETS[args.target], args.engine, args.deadline, args.inflight)

        def write() -> None:
            save_findings(runner.tally, args.out)
            args.result.write_text(tally_json(runner.tally))

        if args.engine == "atheris":
            write()  # a result exists even if libFuzzer dies before its first report
            # its corpus grows as it runs: one per worker, beside the result
            run_atheris(runner, args.seconds, args.seed, args.result.parent, write)
        engine = run_hypothesis if args.engine == "hypothesis" else run_mutation
        tally = engine(runner, args.seconds, args.seed)
    save_findings(tally, args.out)
    args.result.write_text(tally_json(tally))
    return 0


if __name__ == "__main__":
    sys.exit(main())
