"""Task breakdown: shards ∝ throughput, pipeline stages against a brute-force optimum,
federated participants, coordination plans."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hivenode.planner import breakdown as bd
from hivenode.planner.breakdown import (
    BYTES_PER_PARAM_TRAINING,
    breakdown,
    data_parallel,
    largest_remainder,
    partition_layers,
)
from hivenode.planner.state import Action, JobShape, Layer, NodeView, PlannerError

GIB = 1024**3


def acceptance_swarm() -> list[NodeView]:
    """Two nodes with 4× the throughput of three others."""
    fast = [NodeView(f"fast{i}", memory_bytes=16 * GIB, throughput=400.0) for i in range(2)]
    slow = [NodeView(f"slow{i}", memory_bytes=16 * GIB, throughput=100.0) for i in range(3)]
    return [slow[0], fast[0], slow[1], fast[1], slow[2]]


def brute_force(layers: list[Layer], nodes: list[NodeView], batch: int) -> float:
    """The optimum bottleneck: every order of the nodes, every cut of the layers into
    contiguous (possibly empty) stages, straight from the definitions."""
    total = sum(layer.flops for layer in layers)
    m, best = len(layers), math.inf
    for order in itertools.permutations(nodes):
        for cuts in itertools.combinations_with_replacement(range(m + 1), len(nodes) - 1):
            bounds = [0, *cuts, m]
            worst = 0.0
            for node, p, j in zip(order, bounds, bounds[1:], strict=False):
                group = layers[p:j]
                memory = sum(
                    BYTES_PER_PARAM_TRAINING * la.params + batch * la.activation_bytes
                    for la in group
                )
                if memory > node.memory_bytes:
                    worst = math.inf
                    break
                worst = max(worst, sum(la.flops for la in group) / total / node.throughput)  # type: ignore[operator]
            best = min(best, worst)
    return best


def random_case(rng: random.Random) -> tuple[list[Layer], list[NodeView]]:
    layers = [
        Layer(f"l{i}", rng.uniform(1e5, 1e7), rng.randint(1_000, 200_000), 256, (64,))
        for i in range(rng.randint(3, 7))
    ]
    nodes = [
        NodeView(
            f"n{i}",
            memory_bytes=rng.choice([1, 2, 4, 8]) * 2**20,
            throughput=rng.choice([100.0, 100.0, 400.0, 250.0]),
        )
        for i in range(rng.randint(2, 4))
    ]
    return layers, nodes


@given(st.integers(0, 10**6), st.lists(st.floats(0, 1e6), min_size=1, max_size=12))
def test_largest_remainder_sums_exactly_and_stays_within_one_of_the_quota(
    total: int, weights: list[float]
) -> None:
    if sum(weights) <= 0:
        return
    counts = largest_remainder(total, weights)
    assert sum(counts) == total
    for count, weight in zip(counts, weights, strict=True):
        assert abs(count - total * weight / sum(weights)) < 1 + 1e-6


def test_fast_nodes_get_four_times_the_shard() -> None:
    nodes = acceptance_swarm()
    job = JobShape(params=10**6, samples=110_000, batch_size=32)
    shards = {s.peer_id: s for s in data_parallel(job, nodes)}
    sizes = {peer: s.end - s.start for peer, s in shards.items()}
    assert sizes["fast0"] == sizes["fast1"] == 40_000
    assert sizes["slow0"] == sizes["slow1"] == sizes["slow2"] == 10_000
    ordered = sorted(shards.values(), key=lambda s: s.start)
    assert ordered[0].start == 0 and ordered[-1].end == 110_000
    assert all(a.end == b.start for a, b in itertools.pairwise(ordered))
    global_batch = 32 * len(nodes)  # each step's batch splits the same way, to within one
    assert abs(shards["fast0"].batch_size - global_batch * 400 / 1100) < 1
    assert abs(shards["slow0"].batch_size - global_batch * 100 / 1100) < 1


def test_pipeline_matches_the_brute_force_optimum_on_small_cases() -> None:
    rng = random.Random(0)
    checked = 0
    for _ in range(40):
        layers, nodes = random_case(rng)
        optimum = brute_force(layers, nodes, batch=8)
        if math.isinf(optimum):
            with pytest.raises(PlannerError):
                partition_layers(layers, nodes, batch_size=8)
            continue
        stages = partition_layers(layers, nodes, batch_size=8)
        slowest = max(s.seconds_per_sample for s in stages)
        assert slowest == pytest.approx(optimum, rel=1e-9)
        checked += 1
    assert checked >= 20


def test_the_pipeline_on_the_acceptance_swarm_is_optimal() -> None:
    rng = random.Random(1)
    layers = [Layer(f"l{i}", rng.uniform(1e6, 5e6), 10_000, 1024, (128,)) for i in range(8)]
    stages = partition_layers(layers, acceptance_swarm(), batch_size=8)
    optimum = brute_force(layers, acceptance_swarm(), batch=8)
    assert max(s.seconds_per_sample for s in stages) == pytest.approx(optimum, rel=1e-9)


def test_without_exhaustive_search_the_pipeline_stays_within_15_percent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bd, "EXHAUSTIVE_MAX_NODES", 0)  # seed orders + swaps only
    rng = random.Random(2)
    checked = 0
    for _ in range(40):
        layers, nodes = random_case(rng)
        optimum = brute_force(layers, nodes, batch=8)
        if math.isinf(optimum):
            continue
        stages = partition_layers(layers, nodes, batch_size=8)
        assert max(s.seconds_per_sample for s in stages) <= 1.15 * optimum
        checked += 1
    assert checked >= 20


def test_stages_chain_their_shapes_and_respect_memory() -> None:
    layers = [
        Layer("embed", 1e6, 50_000, 4096, (16, 64)),
        Layer("block1", 4e6, 200_000, 4096, (16, 64)),
        Layer("block2", 4e6, 200_000, 4096, (16, 64)),
        Layer("pool", 1e4, 0, 256, (64,)),
        Layer("head", 1e4, 650, 40, (10,)),
    ]
    nodes = [
        NodeView("a", memory_bytes=5 * 2**20, throughput=100.0),
        NodeView("b", memory_bytes=5 * 2**20, throughput=100.0),
        NodeView("c", memory_bytes=1 * 2**20, throughput=400.0),
    ]
    stages = partition_layers(layers, nodes, batch_size=16, input_shape=(16,))
    assert stages[0].input_shape == (16,) and stages[-1].output_shape == (10,)
    assert all(a.output_shape == b.input_shape for a, b in itertools.pairwise(stages))
    assert [s.first for s in stages] == [0, *(s.end for s in stages[:-1])]
    assert stages[-1].end == len(layers)
    assert all(s.memory_bytes <= s.capacity_bytes for s in stages)


def test_no_contiguous_split_that_fits_is_an_error() -> None:
    layers = [Layer("huge", 1e6, 10**9, 0, (1,))]
    nodes = [NodeView("a", memory_bytes=GIB), NodeView("b", memory_bytes=GIB)]
    with pytest.raises(PlannerError, match="fit"):
        partition_layers(layers, nodes, batch_size=1)


def test_pipeline_micro_batches_and_stage_order() -> None:
    layers = tuple(Layer(f"l{i}", 1e6, 1000, 100, (8,)) for i in range(6))
    job = JobShape(params=6000, samples=1000, batch_size=64, layers=layers, input_shape=(8,))
    piped = breakdown(Action.PIPELINE_PARALLEL, job, acceptance_swarm())
    stages = piped.stages
    assert piped.micro_batches >= 4 * len(stages) and 64 % piped.micro_batches == 0
    assert piped.coordination.stage_order == tuple(s.peer_id for s in stages)
    assert breakdown(Action.MODEL_PARALLEL, job, acceptance_swarm()).micro_batches == 1
    priced = breakdown(Action.PIPELINE_PARALLEL, job, acceptance_swarm(), bandwidth_bytes_per_s=1e3)
    assert max(s.seconds_per_sample for s in priced.stages) > max(
        s.seconds_per_sample for s in stages
    )


def test_data_parallel_all_reduces_over_every_replica() -> None:
    job = JobShape(params=10**6, samples=10_000)
    plan = breakdown(Action.DATA_PARALLEL, job, acceptance_swarm())
    assert plan.coordination.allreduce_groups == (tuple(n.peer_id for n in acceptance_swarm()),)
    assert plan.coordination.checkpoint_every >= 1
    single = breakdown(Action.SINGLE_NODE, job, acceptance_swarm())
    assert [(s.peer_id, s.start, s.end) for s in single.shards] == [("fast0", 0, 10_000)]
    assert single.coordination.allreduce_groups == ()


def test_private_single_node_runs_on_the_holder() -> None:
    nodes = [*acceptance_swarm(), NodeView("holder", memory_bytes=GIB, datasets={"d": 5})]
    job = JobShape(params=1000, samples=5, private=True, dataset="d")
    assert breakdown(Action.SINGLE_NODE, job, nodes).shards[0].peer_id == "holder"


def test_private_single_node_skips_a_faster_node_holding_only_part() -> None:
    nodes = [
        NodeView("fast-part", memory_bytes=GIB, throughput=900.0, datasets={"d": 60}),
        NodeView("slow-whole", memory_bytes=GIB, throughput=10.0, datasets={"d": 100}),
    ]
    job = JobShape(params=1000, samples=100, private=True, dataset="d")
    shards = breakdown(Action.SINGLE_NODE, job, nodes).shards
    assert [(s.peer_id, s.start, s.end) for s in shards] == [("slow-whole", 0, 100)]
    with pytest.raises(PlannerError, match="may run it"):
        breakdown(Action.SINGLE_NODE, job, nodes[:1])


def test_federated_takes_the_holders_that_fit() -> None:
    nodes = [
        NodeView("a", memory_bytes=GIB, throughput=10.0, datasets={"d": 100}),
        NodeView("b", memory_bytes=GIB, throughput=10.0, datasets={"d": 300}),
        NodeView("tiny", memory_bytes=1, datasets={"d": 100}),
        NodeView("other", memory_bytes=GIB, datasets={"x": 100}),
    ]
    job = JobShape(params=1000, samples=500, dataset="d", clients_per_round=5, epochs=2)
    plan = breakdown(Action.FEDERATED, job, nodes)
    assert plan.federated is not None
    assert plan.federated.peer_ids == ("a", "b")
    assert plan.federated.clients_per_round == 2
    assert plan.federated.deadline_s == pytest.approx(2.0 * 300 * 2 / 10.0)  # slack × median
    assert plan.coordination.checkpoint_unit == "rounds"
    fixed = breakdown(Action.FEDERATED, JobShape(1000, 500, dataset="d", deadline_s=30), nodes)
    assert fixed.federated is not None and fixed.federated.deadline_s == 30
