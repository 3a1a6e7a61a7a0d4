"""Compressed federated updates: the bytes they save and the accuracy they cost.

    python benchmarks/bench_compression.py [--json] [--rounds 25] [--nodes 10] [--seeds 3]

One federated run per scheme on the same data, partition, model and selection seed: digits
over 10 real nodes on 127.0.0.1 with Dirichlet label skew (α = 0.5), the torch MLP, FedAvg,
every trainer every round. The schemes: none, fp16, int8 (blockwise), topk:0.1 with error
feedback and topk:0.1 without it. Update bytes are what the trainers' train replies put on
the wire per round (the aggregator's `bytes_in`: evaluate replies carry no tensors); the
aggregator → trainer direction is not compressed and is the same for every scheme.
Accuracy is Flower's weighted evaluate accuracy over every trainer's test split; the cost of
a scheme is none's minus its own, in points, at the last round and as the mean of the last
five rounds (one round's figure moves by a point or two from noise alone), beside the final
training loss and the rounds it takes to reach 90 % accuracy ("-": not in every seed).
Every figure is the mean over seeds 0..N-1 (--seeds, default 3; a seed changes the
partition, the initial model and the batches, the same for every scheme).
"""

from __future__ import annotations

import logging
import statistics
from typing import Any

import trio
from _common import emit, machine, make_parser, progress

from hivenode.sim.fl import FlSimConfig, StrategyRun, run_fl_sim

SCHEMES = ("none", "fp16", "int8", "topk:0.1", "topk:0.1:no-feedback")
TAIL_ROUNDS = 5
TARGET_ACCURACY = 0.9
"""Rounds to reach it show a slower start that the last round's accuracy can hide."""


def run_scheme(scheme: str, nodes: int, rounds: int, seed: int) -> dict[str, Any]:
    config = FlSimConfig(
        nodes=nodes,
        dataset="digits",
        partition="dirichlet:0.5",
        strategies=[StrategyRun.parse("fedavg", 0.0, "partial")],
        model="mlp",
        rounds=rounds,
        clients_per_round=nodes,
        local_epochs=1,
        batch_size=10,
        lr=0.1,
        seed=seed,
        compression=scheme,
    )
    (outcome,) = trio.run(lambda: run_fl_sim(config))
    history = outcome.result.history
    accuracies = [r.eval_accuracy for r in history if r.eval_accuracy is not None]
    updates = [r.bytes_in for r in history]
    participants = sum(r.participants for r in history)
    return {
        "final_accuracy": accuracies[-1] if accuracies else None,
        "tail_accuracy": statistics.fmean(accuracies[-TAIL_ROUNDS:]) if accuracies else None,
        "final_loss": history[-1].global_train_loss if history else None,
        "rounds_to_target": next(
            (r.round for r in history if (r.eval_accuracy or 0) >= TARGET_ACCURACY), None
        ),
        "update_bytes_per_round": statistics.median(updates) if updates else None,
        "bytes_per_update": sum(updates) / participants if participants else None,
        "failures": sum(r.failures for r in history),
        "wall_s": outcome.result.wall_s,
        "params": outcome.result.params,
    }


def mean_over_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's mean; None where a seed has none (e.g. never reached the target)."""
    merged: dict[str, Any] = {}
    for key in runs[0]:
        values = [run[key] for run in runs]
        merged[key] = None if None in values else statistics.fmean(values)
    return merged


def compare(results: dict[str, dict[str, Any]]) -> None:
    """Adds each scheme's cost and saving against none, in place."""
    base = results["none"]
    for row in results.values():
        row["accuracy_cost_points"] = _points(base["final_accuracy"], row["final_accuracy"])
        row["tail_accuracy_cost_points"] = _points(base["tail_accuracy"], row["tail_accuracy"])
        sent, full = row["update_bytes_per_round"], base["update_bytes_per_round"]
        row["bytes_saved"] = 1 - sent / full if sent is not None and full else None
        row["compression_factor"] = full / sent if sent and full else None


def _points(base: float | None, value: float | None) -> float | None:
    return None if base is None or value is None else round((base - value) * 100, 2) + 0.0


def main() -> None:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--seeds", type=int, default=3, help="mean over seeds 0..N-1")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    schemes = ["none", *(s for s in args.schemes.split(",") if s and s != "none")]
    results: dict[str, dict[str, Any]] = {}
    for scheme in schemes:
        runs = []
        for seed in range(args.seeds):
            progress(f"{scheme}: seed {seed}, {args.nodes} trainers, {args.rounds} rounds")
            runs.append(run_scheme(scheme, args.nodes, args.rounds, seed))
        results[scheme] = mean_over_seeds(runs)
    compare(results)
    result = {
        "machine": machine(),
        "setup": {
            "dataset": "digits",
            "partition": "dirichlet:0.5",
            "model": "mlp",
            "strategy": "fedavg",
            "nodes": args.nodes,
            "rounds": args.rounds,
            "seeds": args.seeds,
            "target_accuracy": TARGET_ACCURACY,
        },
        "schemes": results,
    }
    rows: list[tuple[str, Any]] = []
    for scheme, row in results.items():
        saved = row["bytes_saved"]
        rows += [
            (f"{scheme}: final accuracy", _rounded(row["final_accuracy"], 4)),
            (f"{scheme}: accuracy cost, last round (points)", row["accuracy_cost_points"]),
            (f"{scheme}: accuracy cost, last 5 rounds (points)", row["tail_accuracy_cost_points"]),
            (f"{scheme}: final training loss", _rounded(row["final_loss"], 4)),
            (f"{scheme}: rounds to {TARGET_ACCURACY:.0%} accuracy", row["rounds_to_target"]),
            (f"{scheme}: update bytes per round", _rounded(row["update_bytes_per_round"], 0)),
            (f"{scheme}: bytes saved", f"{saved:.1%}" if saved is not None else None),
        ]
    emit(result, args.json, rows, f"compressed updates, {args.nodes} trainers, digits")


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


if __name__ == "__main__":
    main()
