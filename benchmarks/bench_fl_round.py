"""What a federated round costs beyond the trainers' own work.

    python benchmarks/bench_fl_round.py [--json] [--nodes 10] [--rounds 30]

A trivial model (logistic regression on iris: 4 features, 3 classes, a few dozen examples a
node) trained by N real in-process nodes on 127.0.0.1, every node sampled every round, with
and without the per-round evaluation on every node. A round's overhead is its wall time minus
the slowest trainer's time inside the ClientApp (train plus evaluate): the Grid, the wire, the
Flower strategy's own work, aggregation and the checkpoint. The first round (framework
imports) is left out. Target (issue 3): ≤ 50 ms per round with 10 trainers.
"""

from __future__ import annotations

import logging

import trio
from _common import emit, machine, make_parser, median, percentile, progress, rounded

from hivenode.sim.fl import FlSimConfig, StrategyRun, run_fl_sim

TARGET_MS = 50.0


def measure(nodes: int, rounds: int, evaluate_fraction: float) -> dict[str, float | None]:
    config = FlSimConfig(
        nodes=nodes,
        dataset="iris",
        partition="iid",
        strategies=[StrategyRun.parse("fedavg", 0.0, "partial")],
        model="logreg",
        rounds=rounds + 1,
        clients_per_round=nodes,
        local_epochs=1,
        batch_size=32,
        lr=0.1,
        evaluate_fraction=evaluate_fraction,
    )
    (outcome,) = trio.run(lambda: run_fl_sim(config))
    history = outcome.result.history[1:]
    round_ms = [r.duration_s * 1000 for r in history]
    compute_ms = [r.compute_s * 1000 for r in history]
    overhead_ms = [max(0.0, d - c) for d, c in zip(round_ms, compute_ms, strict=True)]
    return {
        "round_ms_p50": rounded(median(round_ms)),
        "compute_ms_p50": rounded(median(compute_ms)),
        "overhead_ms_p50": rounded(median(overhead_ms)),
        "overhead_ms_p90": rounded(percentile(overhead_ms, 0.9)),
    }


def main() -> None:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    progress(f"{args.nodes} trainers, {args.rounds} rounds with evaluation on every node")
    with_eval = measure(args.nodes, args.rounds, 1.0)
    progress("the same without evaluation")
    train_only = measure(args.nodes, args.rounds, 0.0)
    result = {
        "machine": machine(),
        "nodes": args.nodes,
        "rounds": args.rounds,
        "with_evaluation": with_eval,
        "train_only": train_only,
        "target_ms": TARGET_MS,
        "meets_target": (with_eval["overhead_ms_p50"] or 1e9) <= TARGET_MS,
    }
    rows = [
        ("round, p50 (ms)", with_eval["round_ms_p50"]),
        ("trainers' work, p50 (ms)", with_eval["compute_ms_p50"]),
        ("overhead, p50 (ms)", with_eval["overhead_ms_p50"]),
        ("overhead, p90 (ms)", with_eval["overhead_ms_p90"]),
        ("overhead without evaluation, p50 (ms)", train_only["overhead_ms_p50"]),
        (f"≤ {TARGET_MS:g} ms", result["meets_target"]),
    ]
    emit(result, args.json, rows, f"federated round overhead, {args.nodes} trainers")


if __name__ == "__main__":
    main()
