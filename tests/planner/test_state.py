"""State encoding (the original bins, latency measured from RTTs) and action masking."""

from __future__ import annotations

import pytest

from hivenode.models.analysis import CUDA_CONTEXT_BYTES, analyze
from hivenode.models.info import Framework, ModelInfo
from hivenode.planner.state import (
    Action,
    JobShape,
    Layer,
    NodeView,
    capacity_bytes,
    encode,
    masked_actions,
    memory_need_bytes,
)

GIB = 1024**3
LAYERS = (Layer("a", 1e6, 1000, 100, (10,)), Layer("b", 1e6, 1000, 100, (2,)))


def node(name: str, rtt_ms: float | None = 5.0, memory: int = 16 * GIB, **kw: object) -> NodeView:
    return NodeView(name, memory_bytes=memory, rtt_ms=rtt_ms, **kw)  # type: ignore[arg-type]


def swarm(count: int, rtt_ms: float | None = 5.0) -> list[NodeView]:
    return [node(f"n{i}", rtt_ms) for i in range(count)]


@pytest.mark.parametrize(
    ("params", "expected"),
    [(0, 0), (999_999, 0), (1_000_000, 1), (99_999_999, 1), (10**8, 2), (10**9 - 1, 2), (10**9, 3)],
)
def test_model_complexity_uses_the_original_parameter_bins(params: int, expected: int) -> None:
    assert encode(JobShape(params=params, samples=1), swarm(1)).state.complexity == expected


@pytest.mark.parametrize(
    ("samples", "expected"), [(0, 0), (9_999, 0), (10_000, 1), (99_999, 1), (100_000, 2)]
)
def test_dataset_size_uses_the_original_sample_bins(samples: int, expected: int) -> None:
    assert encode(JobShape(params=1, samples=samples), swarm(1)).state.dataset == expected


@pytest.mark.parametrize(
    ("count", "expected"), [(1, 0), (2, 0), (3, 1), (5, 1), (6, 2), (10, 2), (11, 3)]
)
def test_available_nodes_use_the_original_bins(count: int, expected: int) -> None:
    assert encode(JobShape(params=1, samples=1), swarm(count)).state.nodes == expected


@pytest.mark.parametrize(
    ("rtts", "expected"), [([5.0, 19.9], 0), ([5.0, 20.0], 1), ([99.0, 3.0], 1), ([100.0], 2)]
)
def test_latency_bins_come_from_the_measured_rtts(rtts: list[float], expected: int) -> None:
    nodes = [node(f"n{i}", rtt) for i, rtt in enumerate(rtts)]
    reading = encode(JobShape(params=1, samples=1), nodes)
    assert reading.state.latency == expected
    assert reading.latency_ms == max(rtts)


def test_latency_p90_ignores_a_few_outliers_in_a_large_swarm() -> None:
    nodes = [node(f"n{i}", 10.0) for i in range(18)] + [node("x", 500.0), node("y", 900.0)]
    reading = encode(JobShape(params=1, samples=1), nodes)
    assert reading.latency_ms == 10.0
    assert reading.state.latency == 0


def test_unknown_rtt_is_the_worst_bin_and_the_explanation_says_so() -> None:
    reading = encode(JobShape(params=1, samples=1), [node("a", 3.0), node("b", None)])
    assert reading.state.latency == 2
    assert reading.latency_ms is None
    assert any("no RTT measured" in note for note in reading.notes)


def test_a_lone_local_node_has_no_network_latency() -> None:
    reading = encode(JobShape(params=1, samples=1), [node("me", None, local=True)])
    assert reading.state.latency == 0
    assert "no remote candidate" in reading.notes[0]


def test_memory_need_defaults_to_the_model_analysis_estimate() -> None:
    job = JobShape(params=2_000_000, samples=1, batch_size=16)
    info = ModelInfo(
        format="planner", framework=Framework.UNKNOWN, parameters=2_000_000, dtypes=("float32",)
    )
    assert memory_need_bytes(job) == analyze(info, batch_size=16).training.total_bytes
    assert memory_need_bytes(JobShape(params=2_000_000, samples=1, memory_bytes=123)) == 123


def test_gpu_capacity_leaves_room_for_the_cuda_context() -> None:
    gpu = NodeView("g", memory_bytes=GIB, gpu_memory_bytes=8 * GIB)
    assert capacity_bytes(gpu) == 8 * GIB - CUDA_CONTEXT_BYTES
    assert capacity_bytes(NodeView("c", memory_bytes=4 * GIB)) == 4 * GIB


def test_one_node_masks_every_split() -> None:
    masked = masked_actions(JobShape(params=1, samples=1, layers=LAYERS), swarm(1))
    assert set(masked) == {Action.DATA_PARALLEL, Action.MODEL_PARALLEL, Action.PIPELINE_PARALLEL}
    assert "one node" in masked[Action.MODEL_PARALLEL]


def test_private_data_keeps_only_federated_and_single_node_on_a_holder() -> None:
    job = JobShape(params=1, samples=1, private=True, dataset="clinic", layers=LAYERS)
    nodes = [node("a", datasets={"clinic": 500}), node("b", datasets={"other": 9})]
    masked = masked_actions(job, nodes)
    assert set(masked) == {Action.DATA_PARALLEL, Action.MODEL_PARALLEL, Action.PIPELINE_PARALLEL}
    assert all("private data" in reason for reason in masked.values())


def test_private_data_masks_single_node_when_no_holder_can_fit_the_model() -> None:
    job = JobShape(params=1, samples=1, private=True, dataset="d", memory_bytes=8 * GIB)
    nodes = [node("small", memory=GIB, datasets={"d": 10}), node("big", datasets={"x": 1})]
    masked = masked_actions(job, nodes)
    assert "holding it" in masked[Action.SINGLE_NODE]
    assert Action.FEDERATED in masked


def test_private_data_spread_over_nodes_masks_single_node() -> None:
    # each holder has half the samples: training on one would need the other half sent to it
    job = JobShape(params=1, samples=1000, private=True, dataset="d", layers=LAYERS)
    nodes = [node("a", datasets={"d": 500}), node("b", datasets={"d": 500})]
    masked = masked_actions(job, nodes)
    assert "spread over 2 holders" in masked[Action.SINGLE_NODE]
    assert [a for a in Action if a not in masked] == [Action.FEDERATED]


def test_private_single_node_needs_one_node_that_holds_every_sample_and_fits() -> None:
    job = JobShape(params=1, samples=1000, private=True, dataset="d", memory_bytes=8 * GIB)
    partial = node("partial", datasets={"d": 400})
    whole = node("whole", datasets={"d": 1000})
    assert Action.SINGLE_NODE not in masked_actions(job, [partial, whole])
    small_whole = node("small-whole", memory=GIB, datasets={"d": 1000})
    masked = masked_actions(job, [partial, small_whole])
    assert "fits on no node holding it all" in masked[Action.SINGLE_NODE]


def test_public_data_may_run_on_one_node_that_holds_part_of_it() -> None:
    job = JobShape(params=1, samples=1000, dataset="d")
    nodes = [node("a", datasets={"d": 500}), node("b", datasets={"d": 500})]
    assert Action.SINGLE_NODE not in masked_actions(job, nodes)


def test_private_data_with_unknown_holders_allows_only_federated() -> None:
    job = JobShape(params=1, samples=1, private=True, layers=LAYERS)
    assert [a for a in Action if a not in masked_actions(job, swarm(3))] == [Action.FEDERATED]


def test_federated_is_masked_when_no_candidate_holds_the_dataset() -> None:
    nodes = [node("a", datasets={"mnist": 10}), node("b")]
    masked = masked_actions(JobShape(params=1, samples=1, dataset="cifar"), nodes)
    assert "cifar" in masked[Action.FEDERATED]


def test_a_model_that_fits_nowhere_masks_every_full_replica() -> None:
    job = JobShape(params=1, samples=1, memory_bytes=20 * GIB, layers=LAYERS)
    masked = masked_actions(job, swarm(2))  # 2 × 16 GiB hold it split, not whole
    assert set(masked) == {Action.DATA_PARALLEL, Action.FEDERATED, Action.SINGLE_NODE}
    too_big = JobShape(params=1, samples=1, memory_bytes=40 * GIB, layers=LAYERS)
    assert len(masked_actions(too_big, swarm(2))) == len(Action)


def test_splitting_into_stages_needs_the_layers() -> None:
    masked = masked_actions(JobShape(params=1, samples=1), swarm(3))
    assert set(masked) == {Action.MODEL_PARALLEL, Action.PIPELINE_PARALLEL}
