"""The reward a finished job earns for the action that ran it, in [-1, 1].

    q = min(1, metric / target)            (higher is better: accuracy, F1)
        min(1, target / metric)            (lower is better: loss, perplexity)
    s = T_ref / (T_ref + T)                T: wall seconds to reach the target (the whole run
                                           when it never did); T_ref: the job's time budget
    h = H_ref / (H_ref + H)                H: node-hours spent; H_ref: one node for T_ref
    r = q · (s + h) − 1                    a failed job (no result): r = −1

Why this shape:
- q, s, h each lie in [0, 1], so r lies in [-1, 1] whatever the job's size: one table serves
  jobs of seconds and of days, and a single huge job cannot swamp a cell's mean.
- Quality multiplies: reaching 60 % of the target fast and cheaply must not beat reaching
  it. Speed (the job owner's concern) and node-hours (the swarm's shared resource) add, so
  neither alone wins: 8 nodes finishing 4× faster than one node spend 2× its node-hours.
- s and h are 1/2 at the reference, so "target reached, in budget, on one node's time" is
  r = 0; twice as fast with half the node-hours gives r = +1/3; a crash gives −1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hivenode.planner.state import PlannerError


@dataclass(frozen=True)
class JobOutcome:
    """What the aggregator reports when a job ends."""

    succeeded: bool
    metric: float | None
    """The final metric (e.g. accuracy, or loss with `higher_is_better=False`)."""
    target: float
    wall_s: float
    """Seconds to reach the target, or of the whole run when it never did."""
    node_hours: float
    """Σ over nodes of the hours each spent on the job."""
    reference_wall_s: float
    """The job's time budget (e.g. rounds × round deadline)."""
    reference_node_hours: float | None = None
    """None: one node for `reference_wall_s`."""
    higher_is_better: bool = True


def quality(outcome: JobOutcome) -> float:
    """q in [0, 1]: the share of the target reached."""
    metric = outcome.metric
    if metric is None or not math.isfinite(metric):
        return 0.0
    if outcome.higher_is_better:
        return min(1.0, max(0.0, metric / outcome.target))
    return 1.0 if metric <= outcome.target else min(1.0, outcome.target / metric)


def reward(outcome: JobOutcome) -> float:
    """r = q · (s + h) − 1, see the module docstring."""
    if outcome.target <= 0 or outcome.reference_wall_s <= 0:
        raise PlannerError("target and reference_wall_s must be > 0")
    if outcome.wall_s < 0 or outcome.node_hours < 0:
        raise PlannerError("wall_s and node_hours must be ≥ 0")
    if not outcome.succeeded:
        return -1.0
    reference_hours = outcome.reference_node_hours
    if reference_hours is None:
        reference_hours = outcome.reference_wall_s / 3600
    if reference_hours <= 0:
        raise PlannerError("reference_node_hours must be > 0")
    speed = outcome.reference_wall_s / (outcome.reference_wall_s + outcome.wall_s)
    thrift = reference_hours / (reference_hours + outcome.node_hours)
    return max(-1.0, min(1.0, quality(outcome) * (speed + thrift) - 1.0))
