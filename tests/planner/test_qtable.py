"""Q-table: ε-greedy choice, the Q-learning update, JSON persistence, the legacy pickle import."""

from __future__ import annotations

import datetime
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from hivenode.planner.qtable import (
    LOCAL_ORIGIN,
    QTABLE_FILE,
    Hyper,
    QTable,
    read_legacy_pickle,
)
from hivenode.planner.state import ACTIONS, TABLE_SHAPE, Action, PlannerError, State

S = State(1, 2, 0, 1)
NEXT = State(0, 0, 0, 0)
ALL = list(ACTIONS)


def legacy_table() -> np.ndarray:
    values = np.zeros(TABLE_SHAPE)
    values[1, 2, 0, 1, 3] = 0.75
    values[3, 0, 2, 2, 0] = -0.25
    return values


def test_greedy_takes_the_best_allowed_action() -> None:
    table = QTable()
    table.update(S, Action.SINGLE_NODE, 0.2)
    table.update(S, Action.PIPELINE_PARALLEL, 0.9)
    table.update(S, Action.FEDERATED, 0.5)
    assert table.greedy(S, ALL) is Action.PIPELINE_PARALLEL
    assert table.greedy(S, [Action.FEDERATED, Action.SINGLE_NODE]) is Action.FEDERATED


def test_unvisited_ties_go_to_the_least_coordinated_action() -> None:
    table = QTable()
    assert table.greedy(S, ALL) is Action.SINGLE_NODE
    assert table.greedy(S, [Action.MODEL_PARALLEL, Action.DATA_PARALLEL]) is Action.DATA_PARALLEL
    with pytest.raises(PlannerError, match="masked"):
        table.greedy(S, [])


def test_an_untried_action_counts_as_the_prior() -> None:
    table = QTable(hyper=Hyper(untried_value=0.1))
    table.update(S, Action.SINGLE_NODE, 0.05)  # tried, below the prior: try the next one
    assert table.greedy(S, ALL) is Action.DATA_PARALLEL
    table.update(S, Action.DATA_PARALLEL, 0.3)  # above it: keep it
    assert table.greedy(S, ALL) is Action.DATA_PARALLEL
    assert table.effective_value(S, Action.FEDERATED) == 0.1
    assert table.effective_value(S, Action.DATA_PARALLEL) == 0.3


def test_a_tried_action_equal_to_the_prior_beats_an_untried_one() -> None:
    table = QTable()  # the default prior: 0, a job that just meets its reference
    table.update(S, Action.SINGLE_NODE, -0.5)
    table.update(S, Action.FEDERATED, 0.0)
    assert table.greedy(S, ALL) is Action.FEDERATED
    table.update(S, Action.FEDERATED, -0.2)  # mean −0.1: below the reference
    assert table.greedy(S, ALL) is Action.DATA_PARALLEL


def test_the_lowest_prior_prefers_every_tried_action() -> None:
    table = QTable(hyper=Hyper(untried_value=-1.0))
    table.update(S, Action.SINGLE_NODE, -1.0)
    table.update(S, Action.MODEL_PARALLEL, -1.0)  # a failure still beats the unknown
    assert table.greedy(S, [Action.DATA_PARALLEL, Action.SINGLE_NODE]) is Action.SINGLE_NODE
    assert table.greedy(S, [Action.FEDERATED, Action.SINGLE_NODE]) is Action.SINGLE_NODE


def test_the_least_coordinated_action_is_tried_before_a_state_settles() -> None:
    table = QTable()
    table.update(S, Action.PIPELINE_PARALLEL, 0.9)  # a job on which single node was masked
    assert table.greedy(S, ALL) is Action.SINGLE_NODE  # untried: its one try comes first
    table.update(S, Action.SINGLE_NODE, 0.4)
    assert table.greedy(S, ALL) is Action.PIPELINE_PARALLEL  # tried, and beaten
    allowed = [Action.FEDERATED, Action.PIPELINE_PARALLEL]  # federated leads this one
    assert table.greedy(S, allowed) is Action.FEDERATED


def test_the_same_seed_makes_the_same_choices() -> None:
    def run(seed: int) -> list[tuple[Action, bool]]:
        table = QTable(hyper=Hyper(epsilon=0.5), seed=seed)
        return [table.choose(S, ALL) for _ in range(50)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_exploration_draws_only_allowed_actions_and_epsilon_decays_to_its_floor() -> None:
    table = QTable(hyper=Hyper(epsilon=1.0, epsilon_decay=0.5, epsilon_min=0.2), seed=1)
    allowed = [Action.FEDERATED, Action.SINGLE_NODE]
    first, explored = table.choose(S, allowed)
    assert explored and first in allowed
    assert table.epsilon == 0.5
    drawn = {table.choose(S, allowed)[0] for _ in range(200)}
    assert drawn == set(allowed)
    assert table.epsilon == 0.2


def test_epsilon_zero_is_always_greedy() -> None:
    table = QTable(hyper=Hyper(epsilon=0.0), seed=0)
    table.update(S, Action.SINGLE_NODE, 0.0)
    table.update(S, Action.DATA_PARALLEL, 1.0)
    assert all(table.choose(S, ALL) == (Action.DATA_PARALLEL, False) for _ in range(20))


def test_update_is_the_q_learning_rule_with_a_running_mean_start() -> None:
    table = QTable(hyper=Hyper(alpha=0.1, gamma=0.9))
    assert table.update(S, Action.FEDERATED, 0.4, now=1.0).mean == 0.4  # α_1 = 1
    assert table.update(S, Action.FEDERATED, 0.8, now=2.0).mean == pytest.approx(0.6)  # α_2 = 1/2
    for _ in range(8):
        table.update(S, Action.FEDERATED, 0.6, now=3.0)
    cell = table.update(S, Action.FEDERATED, 1.0, now=4.0)  # n = 11: α = max(0.1, 1/11)
    assert cell.visits == 11
    assert cell.mean == pytest.approx(0.6 + 0.1 * (1.0 - 0.6))


def test_a_next_state_adds_its_discounted_best_value() -> None:
    table = QTable(hyper=Hyper(gamma=0.9))
    table.update(NEXT, Action.SINGLE_NODE, 0.5)
    table.update(NEXT, Action.FEDERATED, -0.5)
    cell = table.update(S, Action.DATA_PARALLEL, 0.1, next_state=NEXT)
    assert cell.mean == pytest.approx(0.1 + 0.9 * 0.5)
    assert table.q_values(S)[Action.DATA_PARALLEL] == pytest.approx(0.55)


def test_bad_hyperparameters_and_rewards_are_refused() -> None:
    with pytest.raises(PlannerError):
        Hyper(gamma=1.0)
    for prior in (1.5, -1.5, float("nan")):
        with pytest.raises(PlannerError, match="untried_value"):
            Hyper(untried_value=prior)
    for bad in (float("nan"), 1.5, -2.0):
        with pytest.raises(PlannerError, match="outside"):
            QTable().update(S, Action.FEDERATED, bad)


def test_the_table_survives_a_save_and_load_as_json(tmp_path: Path) -> None:
    table = QTable("peerA", hyper=Hyper(alpha=0.3), seed=0)
    table.update(S, Action.FEDERATED, 0.7, now=10.0)
    table.choose(S, ALL)
    path = table.save(tmp_path)
    assert path == tmp_path / QTABLE_FILE
    assert json.loads(path.read_text())["format"] == "hivenode-qtable"
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [QTABLE_FILE]  # no temp file left
    again = QTable.load(tmp_path)
    assert again.origin == "peerA"
    assert again.hyper.alpha == 0.3
    assert again.epsilon == table.epsilon
    assert np.array_equal(again.values, table.values)
    assert np.array_equal(again.visits, table.visits)


def test_settings_unknown_to_this_version_are_ignored_and_missing_ones_default() -> None:
    doc = QTable(hyper=Hyper(untried_value=0.2)).to_json()
    assert QTable.from_json(doc).hyper.untried_value == 0.2
    doc["hyper"]["from_a_newer_node"] = 1
    del doc["hyper"]["untried_value"]  # as an older node wrote it
    assert QTable.from_json(doc).hyper == Hyper()
    doc["hyper"] = [1, 2]
    with pytest.raises(PlannerError, match="bad Q-table settings"):
        QTable.from_json(doc)


def test_a_missing_file_is_an_empty_table_and_garbage_is_refused(tmp_path: Path) -> None:
    assert QTable.load(tmp_path).visits.sum() == 0
    (tmp_path / QTABLE_FILE).write_text('{"format": "something else"}')
    with pytest.raises(PlannerError, match="not a hivenode-qtable"):
        QTable.load(tmp_path)
    (tmp_path / QTABLE_FILE).write_text("{nope")
    with pytest.raises(PlannerError, match="not JSON"):
        QTable.load(tmp_path)


def test_the_daemon_adopts_a_table_imported_before_it_had_a_peer_id(tmp_path: Path) -> None:
    table = QTable()
    assert table.import_values(legacy_table(), now=5.0) == 2
    table.save(tmp_path)
    adopted = QTable.load(tmp_path, origin="12D3KooWpeer")
    assert adopted.origin == "12D3KooWpeer"
    assert adopted.swarm.origins() == ["12D3KooWpeer"]
    assert adopted.q_values(S)[Action.FEDERATED] == 0.75


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("order", ["C", "F"])
def test_a_real_legacy_pickle_is_imported(protocol: int, order: str) -> None:
    values = np.asarray(legacy_table(), order=order)  # type: ignore[call-overload]
    restored = read_legacy_pickle(pickle.dumps(values, protocol=protocol))
    assert np.array_equal(restored, legacy_table())
    table = QTable()
    assert table.import_values(restored) == 2
    assert table.q_values(State(3, 0, 2, 2))[Action.DATA_PARALLEL] == -0.25
    assert table.visit_counts(S)[Action.FEDERATED] == 1


def test_imported_cells_do_not_overwrite_own_experience() -> None:
    table = QTable()
    table.update(S, Action.FEDERATED, 0.1)
    assert table.import_values(legacy_table()) == 1
    assert table.q_values(S)[Action.FEDERATED] == 0.1


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(PlannerError, match="system"):
        read_legacy_pickle(pickle.dumps(_Exploit(marker)))
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps({"q": [1.0, 2.0]}),
        pickle.dumps(datetime.date(2024, 1, 1)),
        pickle.dumps(np.zeros((4, 3, 4, 3, 5), dtype=object)),
        pickle.dumps(np.zeros((2, 2))),
        pickle.dumps(np.full((4, 3, 4, 3, 5), np.nan)),
        b"not a pickle at all",
    ],
    ids=["dict", "date", "object-array", "wrong-shape", "nan", "garbage"],
)
def test_anything_but_the_legacy_array_is_refused(payload: bytes) -> None:
    with pytest.raises(PlannerError):
        read_legacy_pickle(payload)


def test_a_placeholder_origin_stays_local_until_a_peer_id_is_known(tmp_path: Path) -> None:
    table = QTable.load(tmp_path)
    assert table.origin == LOCAL_ORIGIN
