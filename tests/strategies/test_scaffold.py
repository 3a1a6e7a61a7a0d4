"""SCAFFOLD: the server update against a plain float64 reference, and a tiny drift problem."""

from __future__ import annotations

import random
from typing import Any, cast

import numpy as np
import pytest
from flower_messages import as_grid, task_identity  # noqa: F401 (autouse fixture)
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from hivenode.models.flower_arrays import arrayrecord_to_numpy, numpy_to_array
from hivenode.models.training.scaffold_client import GradientFn, local_train, zeros_like
from hivenode.strategies.scaffold import Scaffold

NDArray = np.ndarray[Any, Any]


def record(arrays: dict[str, NDArray]) -> ArrayRecord:
    return ArrayRecord({k: numpy_to_array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def scaffold_reply(
    msg: Message,
    delta_y: dict[str, NDArray],
    delta_c: dict[str, NDArray],
    examples: int,
    steps: int,
) -> Message:
    content = RecordDict(
        {
            "delta_y": record(delta_y),
            "delta_c": record(delta_c),
            "metrics": MetricRecord({"num-examples": examples, "local-steps": steps}),
        }
    )
    return Message(content, reply_to=msg)


# --- (1) the server update against the paper's, in plain numpy ------------------------------


@pytest.mark.parametrize("weighted", [False, True])
def test_aggregate_train_matches_the_papers_server_update(weighted: bool) -> None:
    rng = np.random.default_rng(0)
    shapes = {"w": (3, 4), "b": (4,)}
    num_trainers, global_lr = 10, 0.7
    sampled = [3, 5, 8, 9]
    strategy = Scaffold(num_trainers, global_lr=global_lr, weighted=weighted)
    x = {k: rng.normal(size=s) for k, s in shapes.items()}
    c = {k: np.zeros(s) for k, s in shapes.items()}
    for server_round in (1, 2, 3):
        messages = list(
            strategy.configure_train(server_round, record(x), ConfigRecord(), as_grid(sampled))
        )
        assert sorted(m.metadata.dst_node_id for m in messages) == sampled
        sent_c = arrayrecord_to_numpy(cast(ArrayRecord, messages[0].content["control"]))
        for k in shapes:
            np.testing.assert_allclose(sent_c[k], c[k], rtol=1e-12, atol=1e-12)
        dys = [{k: rng.normal(size=s) for k, s in shapes.items()} for _ in messages]
        dcs = [{k: rng.normal(size=s) for k, s in shapes.items()} for _ in messages]
        examples = [int(n) for n in rng.integers(1, 100, size=len(messages))]
        replies = [
            scaffold_reply(m, dy, dc, n, 5)
            for m, dy, dc, n in zip(messages, dys, dcs, examples, strict=True)
        ]
        new_arrays, metrics = strategy.aggregate_train(server_round, replies)
        assert new_arrays is not None and metrics is not None
        got = arrayrecord_to_numpy(new_arrays)
        for k in shapes:
            stacked_dy = np.stack([dy[k] for dy in dys])
            mean_dy = np.average(stacked_dy, axis=0, weights=examples if weighted else None)
            x[k] = x[k] + global_lr * mean_dy
            c[k] = c[k] + np.sum([dc[k] for dc in dcs], axis=0) / num_trainers
            np.testing.assert_allclose(got[k], x[k], rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(strategy.control[k], c[k], rtol=1e-12, atol=1e-12)
        assert metrics["local-steps"] == pytest.approx(5.0)


def test_replies_must_carry_both_deltas() -> None:
    strategy = Scaffold(4)
    x = {"w": np.zeros(3)}
    (msg, *_) = strategy.configure_train(1, record(x), ConfigRecord(), as_grid([1, 2]))
    bad = Message(
        RecordDict({"delta_y": record(x), "metrics": MetricRecord({"num-examples": 1})}),
        reply_to=msg,
    )
    with pytest.raises(Exception, match="delta_c"):
        strategy.aggregate_train(1, [bad])


# --- (2) a tiny problem with client drift ----------------------------------------------------


class Quadratics:
    """Trainer i's loss f_i(w) = ½·Σ_j a_ij·(w_j − b_ij)²: different curvatures and optima
    per trainer, so several local steps drift each trainer towards its own optimum."""

    def __init__(self, num_trainers: int, dim: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.a = rng.uniform(0.1, 2.0, size=(num_trainers, dim))
        self.b = rng.normal(scale=2.0, size=(num_trainers, dim))
        self.optimum = (self.a * self.b).sum(axis=0) / self.a.sum(axis=0)

    def gradient(self, i: int, w: NDArray) -> NDArray:
        return cast(NDArray, self.a[i] * (w - self.b[i]))

    def loss(self, w: NDArray) -> float:
        return float(np.mean(0.5 * np.sum(self.a * (w - self.b) ** 2, axis=1)))

    def suboptimality(self, w: NDArray) -> float:
        return self.loss(w) - self.loss(self.optimum)


def gradient_of(problem: Quadratics, i: int) -> GradientFn:
    return lambda y: [problem.gradient(i, y[0])]


NUM_TRAINERS, DIM, LOCAL_STEPS, LOCAL_LR, ROUNDS = 10, 8, 10, 0.1, 30


def run(
    strategy: FedAvg, problem: Quadratics, fraction_train: float = 1.0
) -> tuple[list[float], list[tuple[NDArray, NDArray]]]:
    """Drives configure_train/aggregate_train by hand for ROUNDS rounds; node id i+1 is
    trainer i. Returns the suboptimality per round and, per round, (server c, mean of c_i)."""
    random.seed(0)  # Flower samples nodes with `random`
    strategy.fraction_train = fraction_train
    grid = as_grid([i + 1 for i in range(NUM_TRAINERS)])
    scaffold = isinstance(strategy, Scaffold)
    arrays = record({"w": np.zeros(DIM)})
    client_controls = [[np.zeros(DIM)] for _ in range(NUM_TRAINERS)]
    losses, controls = [], []
    for server_round in range(1, ROUNDS + 1):
        replies = []
        for msg in strategy.configure_train(server_round, arrays, ConfigRecord(), grid):
            i = msg.metadata.dst_node_id - 1
            x = [arrayrecord_to_numpy(cast(ArrayRecord, msg.content["arrays"]))["w"]]
            control = (
                [arrayrecord_to_numpy(cast(ArrayRecord, msg.content["control"]))["w"]]
                if scaffold
                else zeros_like(x)
            )
            result = local_train(
                x,
                control,
                client_controls[i] if scaffold else zeros_like(x),
                gradient_of(problem, i),
                LOCAL_STEPS,
                LOCAL_LR,
            )
            if scaffold:
                client_controls[i] = result.new_control
                replies.append(
                    scaffold_reply(
                        msg, {"w": result.delta_y[0]}, {"w": result.delta_c[0]}, 1, LOCAL_STEPS
                    )
                )
            else:
                y = x[0] + result.delta_y[0]
                content = RecordDict(
                    {"arrays": record({"w": y}), "metrics": MetricRecord({"num-examples": 1})}
                )
                replies.append(Message(content, reply_to=msg))
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        assert new_arrays is not None
        arrays = new_arrays
        w = arrayrecord_to_numpy(arrays)["w"]
        losses.append(problem.suboptimality(w))
        if isinstance(strategy, Scaffold):
            mean_ci = np.mean([ci[0] for ci in client_controls], axis=0)
            controls.append((strategy.control["w"], mean_ci))
    return losses, controls


def test_scaffold_beats_fedavg_under_client_drift() -> None:
    problem = Quadratics(NUM_TRAINERS, DIM, seed=1)
    fedavg_losses, _ = run(FedAvg(), problem)
    scaffold_losses, controls = run(Scaffold(NUM_TRAINERS), problem)
    print(
        f"final suboptimality: FedAvg {fedavg_losses[-1]:.3e}, SCAFFOLD {scaffold_losses[-1]:.3e}"
    )
    # measured (seed 1): FedAvg stalls at 4.1e-2 (its drifted fixed point), SCAFFOLD reaches
    # 6.8e-8 by round 10 and 0.0 (float64 rounding) by round 30
    assert fedavg_losses[-1] > 1e-2
    assert scaffold_losses[-1] < 1e-3 * fedavg_losses[-1]
    # with every c_i starting at zero, c is the mean of all c_i after every round
    for c, mean_ci in controls:
        np.testing.assert_allclose(c, mean_ci, rtol=1e-10, atol=1e-12)


def test_control_stays_the_mean_of_all_client_controls_with_partial_participation() -> None:
    problem = Quadratics(NUM_TRAINERS, DIM, seed=2)
    losses, controls = run(Scaffold(NUM_TRAINERS, min_train_nodes=2), problem, fraction_train=0.3)
    for c, mean_ci in controls:
        np.testing.assert_allclose(c, mean_ci, rtol=1e-10, atol=1e-12)
    assert losses[-1] < 1e-2 * losses[0]  # measured (seed 2): 0.79 → 1.1e-4


# --- (3) zero control variates and one local step: FedAvg ------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
def test_zero_controls_and_one_local_step_give_fedavgs_update(weighted: bool) -> None:
    problem = Quadratics(4, DIM, seed=3)
    nodes = [1, 2, 3, 4]
    examples = [1, 1, 1, 1] if not weighted else [5, 17, 2, 40]
    x0 = {"w": np.random.default_rng(4).normal(size=DIM)}
    updates = {}
    for name, strategy in (("fedavg", FedAvg()), ("scaffold", Scaffold(4, weighted=weighted))):
        replies = []
        for msg in strategy.configure_train(1, record(x0), ConfigRecord(), as_grid(nodes)):
            i = msg.metadata.dst_node_id - 1
            x = [x0["w"]]
            res = local_train(x, zeros_like(x), zeros_like(x), gradient_of(problem, i), 1, 0.1)
            if name == "scaffold":
                replies.append(
                    scaffold_reply(
                        msg, {"w": res.delta_y[0]}, {"w": res.delta_c[0]}, examples[i], 1
                    )
                )
            else:
                content = RecordDict(
                    {
                        "arrays": record({"w": x0["w"] + res.delta_y[0]}),
                        "metrics": MetricRecord({"num-examples": examples[i]}),
                    }
                )
                replies.append(Message(content, reply_to=msg))
        new_arrays, _ = strategy.aggregate_train(1, replies)
        assert new_arrays is not None
        updates[name] = arrayrecord_to_numpy(new_arrays)["w"]
    np.testing.assert_allclose(updates["scaffold"], updates["fedavg"], rtol=1e-12, atol=1e-12)
