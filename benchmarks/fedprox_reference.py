"""An independent FedProx in numpy, replayed on a `hivenode sim fl` run to check ours.

    python benchmarks/fedprox_reference.py --metrics docs/results/.../metrics.csv \\
        --strategy "fedprox μ=1" --mu 1 --stragglers 0.9 [--drop] [--json]

FedProx is Algorithm 2 of Li et al., "Federated Optimization in Heterogeneous Networks"
(MLSys 2020), here for multinomial logistic regression (W 60×10 and b, float64): each
selected device k starts from the global model w_t and runs plain minibatch SGD on its
cross-entropy plus μ/2·‖w − w_t‖² (bias included); the server takes the average of the
returned models weighted by n_k, the device's training-set size (as Flower's FedAvg and
FedProx weight by "num-examples"). μ = 0 is FedAvg keeping stragglers' partial work; with
--drop, stragglers are left out of the average (the paper's FedAvg), and a round where every
selected device straggles keeps w_t.

What is taken from the run rather than re-derived, so both see the same inputs:
- the devices' data: `federated_dataset(--dataset, --nodes, seed=--seed)`;
- the initial model: the torch zoo's logreg initialised with the job seed;
- the selection: the `selected` partition ids of each round in the run's metrics.csv;
- the systems model: `straggler_epochs` decides who straggles and for how many epochs;
- the batches: `shuffle_seed` gives each (round, device) its shuffling seed, and `batches`
  below reproduces the order the torch backend trains in (checked against hivenode's
  `minibatches` at start).
The training step, the proximal term, the aggregation and the evaluation are written here
from the paper, not taken from hivenode.

Evaluation after each round is as the run's: test accuracy over all devices' test sets
(pooled, i.e. weighted by test size), and the global model's training loss, each device's
mean loss on its own train set weighted as Flower weights evaluate replies, by the device's
test-set size (with the 80/20 split, nearly the pooled loss over all train examples).
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from _common import emit, machine, make_parser, progress

from hivenode.models.training.backend import LocalData, ModelSpec, backend_for
from hivenode.models.training.clientapp import shuffle_seed, straggler_epochs
from hivenode.sim.fl_datasets import federated_dataset

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]

LAST_ROUNDS = 20
"""The acceptance compares accuracies averaged over the last 20 rounds."""
WIDTHS = (5, 8, 7, 7, 9, 8)


@dataclass(frozen=True)
class Model:
    """Multinomial logistic regression: logits = x·W + b."""

    weights: Floats  # features × classes
    bias: Floats  # classes

    def logits(self, x: Floats) -> Floats:
        return x @ self.weights + self.bias


@dataclass(frozen=True)
class Device:
    x_train: Floats
    y_train: Ints
    x_test: Floats
    y_test: Ints

    @classmethod
    def of(cls, data: LocalData) -> Device:
        return cls(
            data.x_train.astype(np.float64),
            data.y_train.astype(np.int64),
            data.x_test.astype(np.float64),
            data.y_test.astype(np.int64),
        )


@dataclass(frozen=True)
class OurRound:
    """One round of the run, from its metrics.csv."""

    round: int
    accuracy: float
    loss: float
    participants: int
    stragglers: int
    selected: tuple[int, ...]


@dataclass(frozen=True)
class Hyperparameters:
    lr: float
    local_epochs: int
    batch_size: int
    mu: float
    straggler_fraction: float
    drop_stragglers: bool
    seed: int


# --- the algorithm -------------------------------------------------------------------------


def log_softmax(logits: Floats) -> Floats:
    shifted = logits - logits.max(axis=1, keepdims=True)
    out: Floats = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return out


def batches(n: int, batch_size: int, epochs: int, seed: int) -> Iterator[Ints]:
    """Minibatch indices: every epoch a fresh permutation of 0..n−1 from one generator
    seeded with `seed`, cut into consecutive batches (the last one may be short)."""
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]


def local_solve(
    model: Model, device: Device, epochs: int, seed: int, params: Hyperparameters
) -> Model:
    """Algorithm 2, line 7: SGD from w_t on h_k(w; w_t) = F_k(w) + μ/2·‖w − w_t‖²."""
    anchor = model
    weights, bias = model.weights.copy(), model.bias.copy()
    for index in batches(len(device.y_train), params.batch_size, epochs, seed):
        x, y = device.x_train[index], device.y_train[index]
        probabilities = np.exp(log_softmax(x @ weights + bias))
        probabilities[np.arange(len(y)), y] -= 1.0  # ∂ mean CE / ∂ logits, times the batch size
        gradient = probabilities / len(y)
        grad_weights = x.T @ gradient + params.mu * (weights - anchor.weights)
        grad_bias = gradient.sum(axis=0) + params.mu * (bias - anchor.bias)
        weights -= params.lr * grad_weights
        bias -= params.lr * grad_bias
    return Model(weights, bias)


def fedprox_round(
    model: Model,
    devices: Sequence[Device],
    server_round: int,
    selected: Sequence[int],
    params: Hyperparameters,
) -> tuple[Model, int, int]:
    """One round: the selected devices solve locally, the server averages by n_k.

    Returns the new global model, how many devices' models were averaged, and how many
    of the selected devices straggled.
    """
    updates: list[tuple[Model, int]] = []
    stragglers = 0
    for k in selected:
        cut_short = straggler_epochs(
            params.straggler_fraction, params.seed, server_round, k, params.local_epochs
        )
        if cut_short is not None:
            stragglers += 1
            if params.drop_stragglers:
                continue
        epochs = params.local_epochs if cut_short is None else cut_short
        seed = shuffle_seed(params.seed, server_round, k)
        local = local_solve(model, devices[k], epochs, seed, params)
        updates.append((local, len(devices[k].y_train)))
    if not updates:
        return model, 0, stragglers
    weights = np.array([n for _, n in updates], dtype=np.float64)
    weights /= weights.sum()
    pairs = list(zip((m for m, _ in updates), weights, strict=True))
    average = Model(
        np.sum([w * m.weights for m, w in pairs], axis=0),
        np.sum([w * m.bias for m, w in pairs], axis=0),
    )
    return average, len(updates), stragglers


def evaluate(model: Model, devices: Sequence[Device]) -> tuple[float, float]:
    """(test accuracy over all devices' test sets, training loss of the global model)."""
    correct = tested = 0
    loss_sum = loss_weight = 0.0
    for device in devices:
        predictions = model.logits(device.x_test).argmax(axis=1)
        correct += int((predictions == device.y_test).sum())
        tested += len(device.y_test)
        log_p = log_softmax(model.logits(device.x_train))
        mean_loss = float(-log_p[np.arange(len(device.y_train)), device.y_train].mean())
        loss_sum += len(device.y_test) * mean_loss
        loss_weight += len(device.y_test)
    return correct / tested, loss_sum / loss_weight


# --- the run's side ------------------------------------------------------------------------


def read_rounds(path: Path, strategy: str) -> list[OurRound]:
    """The strategy's rounds from a `hivenode sim fl --out` metrics.csv, in round order."""
    with path.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["strategy"] == strategy]
    if not rows:
        raise SystemExit(f"{path} has no rounds for strategy {strategy!r}")
    rounds = [
        OurRound(
            round=int(row["round"]),
            accuracy=float(row["eval_accuracy"]),
            loss=float(row["global_train_loss"]),
            participants=int(row["participants"]),
            stragglers=int(row["stragglers"]),
            selected=parse_ids(row["selected"]),
        )
        for row in rows
    ]
    return sorted(rounds, key=lambda r: r.round)


def parse_ids(text: str) -> tuple[int, ...]:
    """The ids of a `selected` cell: "(2, 3, 14)" gives (2, 3, 14), "()" gives ()."""
    inner = text.strip().strip("()[]")
    return tuple(int(part) for part in inner.split(",") if part.strip())


def initial_model(dataset: Sequence[LocalData], seed: int) -> Model:
    """The run's initial global model: the torch zoo logreg built with the job seed."""
    first = dataset[0]
    arrays = backend_for("torch").init_arrays(
        ModelSpec("torch", "logreg"), first.feature_shape, first.num_classes, seed
    )
    # nn.Linear stores weight as classes × features
    weights = np.asarray(arrays["head.weight"], dtype=np.float64).T.copy()
    return Model(weights, np.asarray(arrays["head.bias"], dtype=np.float64).copy())


def check_batches_match_hivenode() -> None:
    """Our `batches` must give the order hivenode's training loop (the torch backend's)
    steps through, or "same batches" is false."""
    from hivenode.models.training.backend import TrainSettings
    from hivenode.models.training.loop import LocalWork, minibatches

    for n, size, epochs, seed in ((43, 10, 3, 7), (711, 10, 2, shuffle_seed(0, 5, 21))):
        settings = TrainSettings(lr=0.01, local_epochs=epochs, batch_size=size, seed=seed)
        theirs = list(minibatches(n, settings, LocalWork()))
        ours = list(batches(n, size, epochs, seed))
        if len(theirs) != len(ours) or any(
            not np.array_equal(a, b) for a, b in zip(theirs, ours, strict=True)
        ):
            raise SystemExit("batches() no longer matches hivenode's minibatches: update it")


# --- the comparison ------------------------------------------------------------------------


def replay(
    ours: Sequence[OurRound], devices: Sequence[Device], start: Model, params: Hyperparameters
) -> list[dict[str, Any]]:
    model = start
    rows: list[dict[str, Any]] = []
    for record in ours:
        model, averaged, stragglers = fedprox_round(
            model, devices, record.round, record.selected, params
        )
        accuracy, loss = evaluate(model, devices)
        rows.append(
            {
                "round": record.round,
                "accuracy_ours": record.accuracy,
                "accuracy_ref": accuracy,
                "loss_ours": record.loss,
                "loss_ref": loss,
                "participants_ours": record.participants,
                "participants_ref": averaged,
                "stragglers_ours": record.stragglers,
                "stragglers_ref": stragglers,
            }
        )
        if record.round % 20 == 0:
            progress(
                f"round {record.round}: accuracy ours {record.accuracy:.4f}, ref {accuracy:.4f}"
            )
    return rows


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    last = rows[-LAST_ROUNDS:]
    mean_ours = sum(r["accuracy_ours"] for r in last) / len(last)
    mean_ref = sum(r["accuracy_ref"] for r in last) / len(last)
    return {
        "rounds": len(rows),
        "max_abs_accuracy_diff": max(abs(r["accuracy_ours"] - r["accuracy_ref"]) for r in rows),
        "mean_last20_ours": mean_ours,
        "mean_last20_ref": mean_ref,
        "mean_last20_diff": mean_ours - mean_ref,
        "final_loss_ours": rows[-1]["loss_ours"],
        "final_loss_ref": rows[-1]["loss_ref"],
        "max_abs_loss_diff": max(
            (abs(r["loss_ours"] - r["loss_ref"]) for r in rows if math.isfinite(r["loss_ref"])),
            default=math.nan,
        ),
        # same selection and systems model: the counts must agree in every round
        "rounds_with_other_participants": sum(
            r["participants_ours"] != r["participants_ref"] for r in rows
        ),
        "rounds_with_other_stragglers": sum(
            r["stragglers_ours"] != r["stragglers_ref"] for r in rows
        ),
    }


def print_rounds(rows: Sequence[dict[str, Any]]) -> None:
    header = ("round", "acc ours", "acc ref", "diff", "loss ours", "loss ref")
    print("  ".join(f"{name:>{width}}" for name, width in zip(header, WIDTHS, strict=True)))
    for r in rows:
        diff = r["accuracy_ours"] - r["accuracy_ref"]
        print(
            f"{r['round']:>5}  {r['accuracy_ours']:>8.4f}  {r['accuracy_ref']:>7.4f}  "
            f"{diff:>+7.4f}  {r['loss_ours']:>9.4f}  {r['loss_ref']:>8.4f}"
        )
    print()


def main() -> None:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--metrics", type=Path, required=True, help="the run's metrics.csv")
    parser.add_argument("--strategy", required=True, help='its label there, e.g. "fedprox μ=1"')
    parser.add_argument("--mu", type=float, required=True, help="the proximal μ")
    parser.add_argument("--stragglers", type=float, required=True, help="the run's fraction")
    parser.add_argument("--drop", action="store_true", help="leave stragglers out (FedAvg)")
    parser.add_argument("--dataset", default="synthetic:1,1")
    parser.add_argument("--nodes", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--local-epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=10)
    args = parser.parse_args()

    check_batches_match_hivenode()
    params = Hyperparameters(
        lr=args.lr,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        mu=args.mu,
        straggler_fraction=args.stragglers,
        drop_stragglers=args.drop,
        seed=args.seed,
    )
    ours = read_rounds(args.metrics, args.strategy)
    dataset = federated_dataset(args.dataset, args.nodes, seed=args.seed)
    devices = [Device.of(data) for data in dataset]
    progress(f"replaying {len(ours)} rounds of {args.strategy!r} from {args.metrics}")
    started = time.perf_counter()
    rows = replay(ours, devices, initial_model(dataset, args.seed), params)
    summary = summarise(rows)
    result = {
        "metrics": str(args.metrics),
        "strategy": args.strategy,
        "mu": args.mu,
        "stragglers": args.stragglers,
        "drop": args.drop,
        "hyperparameters": {
            "dataset": args.dataset,
            "nodes": args.nodes,
            "seed": args.seed,
            "lr": args.lr,
            "local_epochs": args.local_epochs,
            "batch_size": args.batch_size,
        },
        **summary,
        "wall_s": round(time.perf_counter() - started, 2),
        "machine": machine(),
        "per_round": rows,
    }
    if not args.json:
        print_rounds(rows)
    emit(
        result,
        args.json,
        [(key, summary[key]) for key in summary] + [("wall_s", result["wall_s"])],
        f"{args.strategy} (μ={args.mu:g}, stragglers {args.stragglers:g}"
        f"{', dropped' if args.drop else ''}) against the reference",
    )


if __name__ == "__main__":
    main()
