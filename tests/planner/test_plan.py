"""make_plan: the state, Q-values, masks, choice and per-node breakdown, explained."""

from __future__ import annotations

import json

import pytest

from hivenode.planner.plan import make_plan
from hivenode.planner.qtable import Hyper, QTable
from hivenode.planner.rewards import JobOutcome, reward
from hivenode.planner.state import Action, JobShape, Layer, NodeView, PlannerError, State, encode

GIB = 1024**3
LAYERS = tuple(Layer(f"l{i}", 1e6, 10_000, 512, (32,)) for i in range(6))


def swarm() -> list[NodeView]:
    return [
        NodeView("me", cores=4, memory_bytes=8 * GIB, local=True),
        NodeView("fast", memory_bytes=8 * GIB, throughput=400.0, rtt_ms=12.0),
        NodeView("slow", memory_bytes=8 * GIB, throughput=100.0, rtt_ms=40.0),
    ]


JOB = JobShape(params=60_000, samples=20_000, layers=LAYERS, input_shape=(32,))


def test_a_fresh_table_explains_its_greedy_choice() -> None:
    plan = make_plan(JOB, swarm(), QTable())
    assert plan.reading.state.index == (0, 1, 1, 1)
    assert plan.chosen is Action.SINGLE_NODE and not plan.explored
    text = plan.explain()
    assert "state 0-1-1-1" in text and "latency p90 40.0 ms" in text
    assert "→ single_node" in text and "fast: samples [0, 20000)" in text
    assert "untried: counts as +0.0000" in text and plan.as_json()["untried_value"] == 0.0


def test_learning_moves_the_choice_and_the_json_says_everything() -> None:
    table = QTable()
    table.update(plan_state(), Action.PIPELINE_PARALLEL, 0.6)
    table.update(plan_state(), Action.SINGLE_NODE, -0.2)
    plan = make_plan(JOB, swarm(), table)
    assert plan.chosen is Action.PIPELINE_PARALLEL
    doc = json.loads(json.dumps(plan.as_json()))
    assert doc["chosen"] == "pipeline_parallel"
    assert doc["q_values"]["pipeline_parallel"] == 0.6
    assert doc["visits"]["single_node"] == 1
    assert doc["state"]["key"] == "0-1-1-1"
    stages = doc["breakdown"]["stages"]
    assert [s["peer_id"] for s in stages] == doc["breakdown"]["coordination"]["stage_order"]
    working = {row["peer_id"] for row in doc["nodes"] if row["work"] != "idle"}
    assert working == {s["peer_id"] for s in stages}


def plan_state() -> State:
    return encode(JOB, swarm()).state


def test_exploration_never_picks_a_masked_action() -> None:
    job = JobShape(params=60_000, samples=20_000, private=True, dataset="d")
    holder = NodeView("holder", memory_bytes=GIB, rtt_ms=5.0, datasets={"d": 20_000})
    nodes = [*swarm(), holder]
    table = QTable(hyper=Hyper(epsilon=1.0, epsilon_min=1.0), seed=3)
    chosen = {make_plan(job, nodes, table, explore=True).chosen for _ in range(60)}
    assert chosen == {Action.FEDERATED, Action.SINGLE_NODE}
    plan = make_plan(job, nodes, QTable())
    assert set(plan.masked) == {
        Action.DATA_PARALLEL,
        Action.MODEL_PARALLEL,
        Action.PIPELINE_PARALLEL,
    }
    assert "private data" in plan.explain()


def test_an_impossible_breakdown_is_masked_and_the_choice_made_again() -> None:
    # The job's own memory figure fits a node, but its layer list has one layer of 7.5 GiB
    # of training state: no contiguous split fits, which only the breakdown finds out.
    huge = (Layer("embed", 1e6, 500_000_000, 0, (8,)), *LAYERS)
    job = JobShape(params=500_060_000, samples=100, layers=huge, memory_bytes=GIB)
    nodes = [NodeView("a", memory_bytes=7 * GIB), NodeView("b", memory_bytes=7 * GIB)]
    table = QTable()
    state = encode(job, nodes).state
    table.update(state, Action.SINGLE_NODE, 0.1)
    table.update(state, Action.MODEL_PARALLEL, 0.9)
    table.update(state, Action.PIPELINE_PARALLEL, 0.8)
    plan = make_plan(job, nodes, table)
    assert plan.chosen is Action.SINGLE_NODE
    assert set(plan.masked) == {Action.MODEL_PARALLEL, Action.PIPELINE_PARALLEL}
    assert "no contiguous split" in plan.masked[Action.PIPELINE_PARALLEL]


def test_no_possible_action_is_one_error_with_every_reason() -> None:
    job = JobShape(params=1, samples=1, memory_bytes=100 * GIB)
    with pytest.raises(PlannerError, match="single_node: the model"):
        make_plan(job, swarm(), QTable())


def test_the_reward_of_a_finished_job_updates_the_choice() -> None:
    table = QTable()
    plan = make_plan(JOB, swarm(), table)
    slow = JobOutcome(True, 0.9, 0.9, wall_s=3000, node_hours=3.0, reference_wall_s=1000)
    table.update(plan.reading.state, plan.chosen, reward(slow))
    assert make_plan(JOB, swarm(), table).chosen is not plan.chosen


def outcome(**changes: object) -> JobOutcome:
    base: dict[str, object] = {
        "succeeded": True,
        "metric": 0.9,
        "target": 0.9,
        "wall_s": 3600.0,
        "node_hours": 1.0,
        "reference_wall_s": 3600.0,
    }
    return JobOutcome(**{**base, **changes})  # type: ignore[arg-type]


def test_reward_is_zero_at_the_reference_and_a_third_when_twice_as_good() -> None:
    assert reward(outcome()) == pytest.approx(0.0)
    assert reward(outcome(wall_s=1800.0, node_hours=0.5)) == pytest.approx(1 / 3)
    assert reward(outcome(succeeded=False)) == -1.0
    assert reward(outcome(metric=0.45)) == pytest.approx(-0.5)
    assert reward(outcome(metric=2.0, target=1.0, higher_is_better=False)) == pytest.approx(-0.5)


@pytest.mark.parametrize(
    "changes",
    [{"wall_s": 0.0, "node_hours": 0.0, "metric": 5.0}, {"wall_s": 1e12, "node_hours": 1e9}],
)
def test_reward_stays_in_minus_one_to_one(changes: dict[str, object]) -> None:
    assert -1.0 <= reward(outcome(**changes)) <= 1.0


def test_reward_refuses_nonsense_references() -> None:
    with pytest.raises(PlannerError):
        reward(outcome(reference_wall_s=0.0))
