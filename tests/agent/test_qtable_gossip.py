"""The swarm's Q-table over real libp2p nodes: gossip, snapshots on join, forged deltas."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from swarm_helpers import local_swarm, wait_until

from hivenode.agent.node import Node
from hivenode.planner.crdt import QDelta
from hivenode.planner.qtable import QTable
from hivenode.planner.state import Action, State
from hivenode.protocol.ids import QTABLE_TOPIC

STATE = State(complexity=1, dataset=0, nodes=1, latency=0)


def same_tables(nodes: list[Node]) -> bool:
    tables = [node.qtable.table.values for node in nodes if node.qtable]
    return all(np.max(np.abs(tables[0] - t)) <= 1e-9 for t in tables[1:])


async def test_a_lesson_reaches_every_node_and_joiners_pull_it(tmp_path: Path) -> None:
    async with local_swarm(tmp_path) as start:
        a = await start("a", qtable=True)
        b = await start("b", bootstrap=[a], qtable=True)
        c = await start("c", bootstrap=[a], qtable=True)
        await wait_until(lambda: len(a.peer_table) == 2, 15, "a knows b and c")
        assert a.qtable is not None
        a.qtable.record(STATE, Action.FEDERATED, 0.5)
        b.qtable is not None and b.qtable.record(STATE, Action.SINGLE_NODE, -0.25)
        await wait_until(lambda: same_tables([a, b, c]), 15, "three tables agree")
        row = c.qtable.table.q_values(STATE) if c.qtable else {}
        assert row[Action.FEDERATED] == 0.5 and row[Action.SINGLE_NODE] == -0.25
        # a node that joins now has missed the gossip: it pulls a snapshot when it joins
        late = await start("late", bootstrap=[b], qtable=True)
        await wait_until(lambda: same_tables([a, b, c, late]), 15, "the joiner's table agrees")
    saved = QTable.load(tmp_path / "c" / "state")
    assert saved.q_values(STATE)[Action.FEDERATED] == 0.5  # merged cells were written


async def test_a_delta_signed_by_someone_else_is_rejected(tmp_path: Path) -> None:
    async with local_swarm(tmp_path) as start:
        victim = await start("victim", qtable=True)
        forger = await start("forger", bootstrap=[victim], qtable=True)
        listener = await start("listener", bootstrap=[victim], qtable=True)
        await wait_until(lambda: len(listener.peer_table) == 2, 15, "listener knows both")
        assert listener.qtable is not None
        forged = QDelta(
            origin=victim.peer_id,
            seq=int(time.time() * 1000),
            timestamp=time.time(),
            ttl=600,
            entries=((*STATE.index, 0, 1000, 1.0, int(time.time() * 1000)),),
        )
        await forger.swarm.pubsub.publish(QTABLE_TOPIC, forged.to_wire())
        await wait_until(lambda: listener.qtable.rejected >= 1, 15, "the forged delta is seen")
        assert listener.qtable.table.visits.sum() == 0
