"""Jobs that let the swarm's Q-table choose how they run: `[parallel] mode = "auto"`.

Before the job starts, the coordinator reads the planner's state from what the swarm shows
(the model's real parameter count, the samples its trainers hold, their hardware and RTTs),
lets the Q-table choose ε-greedily among the actions the state allows, and runs the job as
that action: federated, data/pipeline/model parallel, or single node (federated on the one
trainer holding the most samples). The finished job then teaches the table the action it
actually took (`job_reward.action_of` of the resolved spec).

Zoo jobs carry no per-layer costs for the planner, so model and pipeline parallel are masked
("no layers") and `auto` chooses among federated, data parallel and single node. A job whose
`[plan] private = true` keeps its data where it is: only federated and single node remain.
"""

from __future__ import annotations

import logging

import trio

from hivenode.agent.node import Node
from hivenode.aggregator.job_reward import node_view
from hivenode.aggregator.job_spec import JobSpec
from hivenode.aggregator.runner import (
    TRAINER_WAIT_S,
    JobError,
    fitting_trainers,
    initial_arrays,
    wait_for_trainers,
)
from hivenode.planner.plan import Plan, make_plan
from hivenode.planner.state import Action, JobShape, PlannerError

log = logging.getLogger(__name__)


def is_auto(job: JobSpec) -> bool:
    return job.parallel is not None and job.parallel.mode == "auto"


async def resolve_auto(
    node: Node, job: JobSpec, trainer_wait_s: float = TRAINER_WAIT_S
) -> tuple[JobSpec, Plan]:
    """The job as the Q-table chooses to run it, and the plan that chose."""
    if node.qtable is None:
        raise JobError('mode = "auto" needs the swarm\'s Q-table; this node takes no part')
    trainers, info = await wait_for_trainers(node, job, trainer_wait_s)
    arrays = await trio.to_thread.run_sync(initial_arrays, job, info)
    trainers = fitting_trainers(node, job, trainers, arrays)
    views = [node_view(node, peer) for peer in trainers]
    shape = JobShape(
        params=sum(int(a.size) for a in arrays.values()),
        samples=sum(view.datasets.get(job.dataset, 0) for view in views),
        private=bool(job.plan.get("private", False)),
        dataset=job.dataset,
        batch_size=job.train.batch_size,
        epochs=job.train.local_epochs,
        clients_per_round=job.clients_per_round,
        deadline_s=job.deadline_s,
        input_shape=tuple(info.feature_shape),
    )
    try:
        plan = make_plan(shape, views, node.qtable.table, explore=True)
    except PlannerError as exc:
        raise JobError(f"the planner cannot place this job: {exc}") from exc
    log.info("job %s: the Q-table chose %s", job.name, plan.chosen.value)
    return spec_for(job, plan.chosen, plan), plan


def spec_for(job: JobSpec, action: Action, plan: Plan) -> JobSpec:
    """`job` rewritten to run as `action`."""
    assert job.parallel is not None
    if action is Action.FEDERATED:
        return job.model_copy(update={"parallel": None})
    if action is Action.SINGLE_NODE:
        holder = max(plan.nodes, key=lambda view: view.datasets.get(job.dataset, 0)).peer_id
        return job.model_copy(
            update={
                "parallel": None,
                "trainers": [holder],
                "clients_per_round": 1,
                "min_clients": 1,
            }
        )
    mode = action.value.removesuffix("_parallel")
    return job.model_copy(update={"parallel": job.parallel.model_copy(update={"mode": mode})})
