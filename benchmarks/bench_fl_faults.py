"""What losing trainers mid-job costs a federated job.

    python benchmarks/bench_fl_faults.py [--json] [--nodes 10] [--kill 3] [--rounds 30]

Digits split over N real in-process trainers (label skew, dirichlet 0.5), an MLP trained with
FedAvg, every trainer sampled each round. The same job runs twice: undisturbed, and with
`--kill` trainers stopped for good right after round `--at` (their nodes shut down: no
goodbye, their data is gone from the federation). Reports whether the job finished, the
accuracy of each run's final model on the test sets of all N devices (the same examples for
both, so the figures compare), and the rounds that saw failures.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import trio
from _common import emit, machine, make_parser, progress

from hivenode.agent.node import Node
from hivenode.aggregator.runner import RoundRecord
from hivenode.models.training.backend import ModelSpec
from hivenode.sim.chaos import accuracy_on_all
from hivenode.sim.fl import FlSimConfig, StrategyRun, run_fl_sim
from hivenode.sim.fl_datasets import federated_dataset


def config(nodes: int, rounds: int) -> FlSimConfig:
    return FlSimConfig(
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
        deadline_s=20,
    )


def run(nodes: int, rounds: int, kill: int, at: int) -> tuple[list[RoundRecord], float]:
    def faults(record: RoundRecord, trainers: Sequence[Node]) -> None:
        if record.round == at:
            for node in trainers[-kill:]:
                node.stop()

    cfg = config(nodes, rounds)
    with tempfile.TemporaryDirectory(prefix="hn-faults-") as tmp:
        (outcome,) = trio.run(
            lambda: run_fl_sim(cfg, faults=faults if kill else None, keep_jobs=Path(tmp))
        )
        devices = federated_dataset(cfg.dataset, cfg.nodes, partition=cfg.partition, seed=cfg.seed)
        spec = ModelSpec(cfg.framework, cfg.model, cfg.model_options)
        return outcome.result.history, accuracy_on_all(devices, spec, outcome.result.model_path)


def main() -> None:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--kill", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--at", type=int, default=10, help="stop them after this round")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    progress(f"undisturbed: {args.nodes} trainers, {args.rounds} rounds")
    _, base_acc = run(args.nodes, args.rounds, 0, args.at)
    progress(f"again, stopping {args.kill} trainers after round {args.at}")
    faulty, acc = run(args.nodes, args.rounds, args.kill, args.at)
    result = {
        "machine": machine(),
        "nodes": args.nodes,
        "killed": args.kill,
        "after_round": args.at,
        "completed": len(faulty) == args.rounds,
        "rounds_completed": len(faulty),
        "baseline_accuracy": base_acc,
        "final_accuracy": acc,
        "accuracy_cost_points": round((base_acc - acc) * 100, 2),
        "rounds_with_failures": [r.round for r in faulty if r.failures],
        "participants_after": faulty[-1].participants if faulty else 0,
        "slowest_round_s": round(max(r.duration_s for r in faulty), 2) if faulty else None,
    }
    rows = [
        ("job finished", result["completed"]),
        ("baseline accuracy", base_acc),
        ("accuracy with trainers lost", acc),
        ("cost (points)", result["accuracy_cost_points"]),
        ("rounds with failures", result["rounds_with_failures"]),
        ("slowest round (s)", result["slowest_round_s"]),
    ]
    emit(result, args.json, rows, f"losing {args.kill} of {args.nodes} trainers mid-job")


if __name__ == "__main__":
    main()
