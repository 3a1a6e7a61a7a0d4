"""A finished job's lesson for the swarm's Q-table.

The job ran as `federated` on its trainers, or data/pipeline/model parallel on its members;
the state is what the planner would have seen when it started (model size, samples,
trainers, their measured RTTs), the reward is
`planner.rewards.reward` of its outcome against the job's target accuracy and time budget.
The node records it in its own cells and gossips them (`agent/qtable_gossip.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

from hivenode.agent.node import Node
from hivenode.aggregator.job_spec import JobSpec
from hivenode.planner.rewards import JobOutcome, reward
from hivenode.planner.state import Action, JobShape, NodeView, State, encode
from hivenode.protocol.advert import Advert


def job_lesson(
    node: Node,
    job: JobSpec,
    trainers: Sequence[str],
    params: int,
    accuracy: float | None,
    wall_s: float,
    succeeded: bool,
) -> tuple[State, Action, float]:
    """(state, action, reward) of a job that ended."""
    views = [node_view(node, peer) for peer in trainers]
    samples = sum(view.datasets.get(job.dataset, 0) for view in views)
    shape = JobShape(params=params, samples=samples, private=True, dataset=job.dataset)
    outcome = JobOutcome(
        succeeded=succeeded,
        metric=accuracy,
        target=job.target_accuracy,
        wall_s=wall_s,
        node_hours=len(trainers) * wall_s / 3600,
        reference_wall_s=job.rounds * job.deadline_s,
    )
    return encode(shape, views).state, action_of(job), reward(outcome)


def action_of(job: JobSpec) -> Action:
    """How the job ran: federated, or the parallel mode its `[parallel]` section names."""
    if job.parallel is None:
        return Action.FEDERATED
    return Action(f"{job.parallel.mode}_parallel")


def node_view(node: Node, peer: str) -> NodeView:
    if peer == node.peer_id:
        hardware = node.hardware
        infos = node.trainer.datasets() if node.trainer else ()
        return NodeView(
            peer,
            cores=max(1, hardware.cpu.logical_cores) if hardware else 1,
            memory_bytes=hardware.memory.total_bytes if hardware else 0,
            local=True,
            datasets={info.name: info.samples for info in infos},
        )
    entry = node.peer_table.get(peer)
    if entry is None:  # gone since: it still took part
        return NodeView(peer)
    return _advert_view(entry.advert, entry.rtt_s)


def _advert_view(advert: Advert, rtt_s: float | None) -> NodeView:
    hardware = advert.hardware
    return NodeView(
        advert.origin,
        cores=max(1, hardware.cpu.logical_cores),
        memory_bytes=hardware.memory.total_bytes,
        gpu_memory_bytes=max((g.memory_total_bytes for g in hardware.gpus), default=0),
        rtt_ms=rtt_s * 1000 if rtt_s is not None else None,
        datasets={info.name: info.samples for info in advert.datasets},
    )
