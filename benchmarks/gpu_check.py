"""Federated rounds on CUDA, where this machine has a GPU; says so plainly where it has none.

    python benchmarks/gpu_check.py [--json] [--rounds 3]

Three in-process trainers train a torch MLP on digits for a few rounds; with a GPU the torch
adapter places the model and batches on CUDA, and this checks that memory was really used on
the device and that the loss fell.
"""

from __future__ import annotations

import logging

import trio
from _common import emit, machine, make_parser, progress

from hivenode.sim.fl import FlSimConfig, StrategyRun, run_fl_sim


def main() -> None:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    import torch

    result: dict[str, object] = {"machine": machine(), "cuda": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        result["message"] = "no CUDA GPU on this machine: nothing to check"
        emit(result, args.json, [("CUDA GPU", "none: nothing to check")], "GPU check")
        return
    result["device"] = torch.cuda.get_device_name(0)
    progress(f"training on {result['device']}")
    torch.cuda.reset_peak_memory_stats()
    config = FlSimConfig(
        nodes=3,
        dataset="digits",
        strategies=[StrategyRun.parse("fedavg", 0.0, "partial")],
        model="mlp",
        rounds=args.rounds,
        clients_per_round=3,
        batch_size=32,
        lr=0.1,
    )
    (outcome,) = trio.run(lambda: run_fl_sim(config))
    history = outcome.result.history
    first, last = history[0].global_train_loss, history[-1].global_train_loss
    result |= {
        "rounds": len(history),
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 1e6, 2),
        "loss_first": first,
        "loss_last": last,
        "loss_fell": first is not None and last is not None and last < first,
        "accuracy_last": history[-1].eval_accuracy,
    }
    result["ok"] = bool(result["loss_fell"]) and float(str(result["peak_cuda_mb"])) > 0
    rows = [
        ("device", result["device"]),
        ("peak CUDA memory (MB)", result["peak_cuda_mb"]),
        ("loss fell", result["loss_fell"]),
        ("ok", result["ok"]),
    ]
    emit(result, args.json, rows, "GPU check")
    if not result["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
