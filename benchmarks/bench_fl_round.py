"""What a federated round costs beyond the trainers' own work.

    python benchmarks/bench_fl_round.py [--json] [--nodes 10] [--rounds 30] [--processes]

A trivial model (logistic regression on iris: 4 features, 3 classes, a few dozen examples a
node) trained by N real nodes on 127.0.0.1, every node sampled every round, with and without
the per-round evaluation on every node. In-process (the simulator: one trio loop for all
nodes, training threads sharing the GIL with it) or, with --processes, one `hivenode run`
daemon per node (a deployment: the job is submitted to one of them). A round's overhead is
its wall time minus the slowest trainer's time inside the ClientApp (train plus evaluate):
the Grid, the wire, the Flower strategy's own work, aggregation and the checkpoint. The first
round (framework imports) is left out. Target (issue 3): ≤ 50 ms per round with 10 trainers.
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


def measure_processes(nodes: int, rounds: int, evaluate_fraction: float) -> dict[str, float | None]:
    import tempfile
    import time
    from pathlib import Path

    from hivenode.agent.control_client import call
    from hivenode.sim.fl_datasets import federated_dataset, save_partition
    from hivenode.sim.swarm_processes import START_TIMEOUT, Daemon

    parts = federated_dataset("iris", nodes, partition="iid", seed=0)
    with tempfile.TemporaryDirectory(prefix="hn-round-") as tmp:
        base = Path(tmp)
        daemons: list[Daemon] = []
        try:
            for index, part in enumerate(parts):
                node_dir = base / f"node{index}"
                node_dir.mkdir(parents=True)
                save_partition(part, node_dir / "iris.npz")
                from hivenode.models.datasets import DatasetCatalog

                DatasetCatalog(node_dir / "state").add("iris", f"npz:{node_dir / 'iris.npz'}")
            hub = Daemon(base, 0, [])
            daemons.append(hub)
            addr = hub.wait_ready(time.monotonic() + START_TIMEOUT)["addrs"][0]
            daemons += [Daemon(base, i, [addr]) for i in range(1, nodes)]
            for daemon in daemons:
                daemon.wait_ready(time.monotonic() + START_TIMEOUT)
            spec = {
                "name": "overhead",
                "dataset": "iris",
                "rounds": rounds + 1,
                "clients_per_round": nodes,
                "min_clients": nodes,
                "evaluate_fraction": evaluate_fraction,
                "deadline_s": 60,
                "model": {"framework": "torch", "name": "logreg"},
                "train": {"lr": 0.1, "batch_size": 32},
            }
            call(hub.socket, "POST", "/v1/jobs", 10.0, spec)
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                job = hub.ask("/v1/jobs/overhead")
                if job["state"] in ("finished", "failed"):
                    break
                time.sleep(1)
            if job["state"] != "finished":
                raise SystemExit(f"the job did not finish: {job['state']} {job['error']}")
            history = job["history"][1:]
        finally:
            for daemon in daemons:
                daemon.terminate()
            for daemon in daemons:
                daemon.reap(timeout=15.0)
    round_ms = [r["duration_s"] * 1000 for r in history]
    compute_ms = [r["compute_s"] * 1000 for r in history]
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
    parser.add_argument("--processes", action="store_true", help="one daemon per node")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    progress(f"{args.nodes} trainers, {args.rounds} rounds with evaluation on every node")
    run = measure_processes if args.processes else measure
    with_eval = run(args.nodes, args.rounds, 1.0)
    progress("the same without evaluation")
    train_only = run(args.nodes, args.rounds, 0.0)
    result = {
        "machine": machine(),
        "nodes": args.nodes,
        "rounds": args.rounds,
        "mode": "processes" if args.processes else "in-process",
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
