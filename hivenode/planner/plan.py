"""`make_plan`: a job's state on the swarm, the Q-values, the masked actions and why, the
choice, and how the chosen action runs on each node."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from hivenode.models.analysis import format_bytes
from hivenode.planner.breakdown import Breakdown, breakdown
from hivenode.planner.qtable import QTable
from hivenode.planner.state import (
    ACTIONS,
    Action,
    JobShape,
    NodeView,
    PlannerError,
    Reading,
    capacity_bytes,
    encode,
    masked_actions,
    memory_need_bytes,
    throughput_of,
)


@dataclass(frozen=True)
class Plan:
    job: JobShape
    nodes: tuple[NodeView, ...]
    reading: Reading
    q_values: dict[Action, float]
    visits: dict[Action, int]
    masked: dict[Action, str]
    """Actions ruled out, with the reason (the state's masks, then breakdowns that failed)."""
    chosen: Action
    explored: bool
    """True when ε-greedy drew the action at random."""
    breakdown: Breakdown
    untried_value: float = 0.0
    """The value greedy gave actions with no visits (`Hyper.untried_value`)."""

    def per_node(self) -> list[dict[str, Any]]:
        """One row per candidate: what it does under the chosen action."""
        work: dict[str, str] = {}
        b = self.breakdown
        for shard in b.shards:
            work[shard.peer_id] = (
                f"samples [{shard.start}, {shard.end}) ({shard.end - shard.start}), "
                f"batch {shard.batch_size}"
            )
        for stage in b.stages:
            work[stage.peer_id] = (
                f"stage {stage.index}: layers {stage.first}-{stage.end - 1} "
                f"{list(stage.input_shape)}→{list(stage.output_shape)}, "
                f"{stage.seconds_per_sample * 1e3:.3g} ms/sample, "
                f"{format_bytes(stage.memory_bytes)} of {format_bytes(stage.capacity_bytes)}"
            )
        if b.federated is not None:
            for peer_id in b.federated.peer_ids:
                work[peer_id] = "federated participant"
        return [
            {
                "peer_id": node.peer_id,
                "local": node.local,
                "throughput": round(throughput_of(node), 3),
                "throughput_measured": bool(node.throughput),
                "rtt_ms": node.rtt_ms,
                "capacity_bytes": capacity_bytes(node),
                "work": work.get(node.peer_id, "idle"),
            }
            for node in self.nodes
        ]

    def as_json(self) -> dict[str, Any]:
        state = self.reading.state
        b = asdict(self.breakdown)
        return {
            "state": {**asdict(state), "index": list(state.index), "key": state.key()},
            "latency_ms": self.reading.latency_ms,
            "notes": [*self.reading.notes, *self.breakdown.notes],
            "job": {
                **{k: v for k, v in asdict(self.job).items() if k != "layers"},
                "layers": len(self.job.layers),
                "memory_need_bytes": memory_need_bytes(self.job),
            },
            "q_values": {a.value: self.q_values[a] for a in ACTIONS},
            "visits": {a.value: self.visits[a] for a in ACTIONS},
            "untried_value": self.untried_value,
            "masked": {a.value: reason for a, reason in self.masked.items()},
            "chosen": self.chosen.value,
            "explored": self.explored,
            "breakdown": {k: v for k, v in b.items() if k != "notes"},
            "nodes": self.per_node(),
        }

    def explain(self, nodes: bool = True) -> str:
        """The decision in words, for people; `nodes=False` leaves out the per-node rows."""
        state = self.reading.state
        lines = [
            f"state {state.key()}: complexity {state.complexity}, dataset {state.dataset}, "
            f"nodes {state.nodes}, latency {state.latency}",
            *(f"  {note}" for note in self.reading.notes),
            "Q-values:",
        ]
        for action in ACTIONS:
            mark = "→" if action is self.chosen else " "
            why = f"  masked: {self.masked[action]}" if action in self.masked else ""
            visits = self.visits[action]
            seen = f"{visits} visits" if visits else f"untried: counts as {self.untried_value:+.4f}"
            lines.append(f" {mark} {action.value:<18} {self.q_values[action]:+.4f}  ({seen}){why}")
        how = "explored at random (ε-greedy)" if self.explored else "greedy"
        if not self.explored and self.visits[self.chosen] == 0 and any(self.visits.values()):
            how = "greedy: an untried action gets its try before the state settles"
        lines.append(f"chosen: {self.chosen.value} ({how})")
        for row in self.per_node() if nodes else []:
            lines.append(f"  {row['peer_id']}: {row['work']}")
        c = self.breakdown.coordination
        if self.breakdown.micro_batches:
            lines.append(f"micro-batches: {self.breakdown.micro_batches}")
        if self.breakdown.federated is not None:
            f = self.breakdown.federated
            lines.append(f"clients per round: {f.clients_per_round}, deadline {f.deadline_s:.0f} s")
        lines += [f"barrier: {barrier}" for barrier in c.barriers]
        lines += [f"all-reduce group: {', '.join(group)}" for group in c.allreduce_groups]
        if c.stage_order:
            lines.append(f"stage order: {' → '.join(c.stage_order)}")
        lines.append(f"checkpoint every {c.checkpoint_every} {c.checkpoint_unit}")
        lines += [f"note: {note}" for note in self.breakdown.notes]
        return "\n".join(lines)


def make_plan(
    job: JobShape,
    nodes: Sequence[NodeView],
    table: QTable,
    *,
    explore: bool = False,
    bandwidth_bytes_per_s: float | None = None,
) -> Plan:
    """Choose an action for `job` on `nodes` with `table` and break it down.

    `explore=False` (the default, what `hivenode plan` shows) takes the greedy action and
    leaves the table untouched; a job that will actually run passes True for ε-greedy. An
    action whose breakdown turns out impossible (no contiguous split fits the memory, ...)
    is masked with that reason and the choice is made again.
    """
    reading = encode(job, nodes)
    masked = masked_actions(job, nodes)
    while True:
        allowed = [a for a in ACTIONS if a not in masked]
        if not allowed:
            reasons = "; ".join(f"{a.value}: {why}" for a, why in masked.items())
            raise PlannerError(f"no action can run this job ({reasons})")
        if explore:
            chosen, explored = table.choose(reading.state, allowed)
        else:
            chosen, explored = table.greedy(reading.state, allowed), False
        try:
            work = breakdown(chosen, job, nodes, bandwidth_bytes_per_s=bandwidth_bytes_per_s)
        except PlannerError as exc:
            masked[chosen] = str(exc)
            continue
        return Plan(
            job=job,
            nodes=tuple(nodes),
            reading=reading,
            q_values=table.q_values(reading.state),
            visits=table.visit_counts(reading.state),
            masked={a: masked[a] for a in ACTIONS if a in masked},
            chosen=chosen,
            explored=explored,
            breakdown=work,
            untried_value=table.hyper.untried_value,
        )
