"""Which worker gets a request: the lowest expected latency of two picked at random.

Pure functions of plain data (what the router knows of each worker), tested without a
network; `router.py` feeds them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

UNMEASURED_SERVICE_S = 0.0
"""Service time assumed for a worker not measured (lately): none, optimism under
uncertainty. It wins the next pair it is drawn in unless it has requests in flight, so a new
worker, or one that was slow once, is measured again instead of starved by a stale figure."""


@dataclass(frozen=True)
class Candidate:
    """What the router knows of one worker for one model."""

    peer_id: str
    in_flight: int = 0
    """Requests this router has sent it and not had answered."""
    latency_ewma_s: float | None = None
    """Exponentially weighted mean of its end-to-end latency here, None until measured."""
    queue: int = 0
    """Requests waiting at the worker, as it last said (in a reply or its advert)."""
    rtt_s: float | None = None


def expected_latency(candidate: Candidate) -> float:
    """Seconds a request sent now should take: one service time (its latency EWMA, else the
    ping RTT plus UNMEASURED_SERVICE_S) for itself and for each request ahead of it, ours in
    flight and those queued at the worker. It minimises E[latency] under the M/M/1-style
    assumption that a worker drains its queue at the rate it has served us."""
    service = candidate.latency_ewma_s
    if service is None:
        service = (candidate.rtt_s or 0.0) + UNMEASURED_SERVICE_S
    return service * (1 + candidate.in_flight + candidate.queue)


def choose(candidates: Sequence[Candidate], rng: random.Random) -> Candidate:
    """Power of two choices: two distinct candidates at random, the lower expected latency
    of the pair (ties to the first drawn). Sampling keeps every router from herding onto the
    one worker that looked best a moment ago, while still avoiding the loaded ones."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    if len(candidates) == 1:
        return candidates[0]
    first, second = rng.sample(list(candidates), 2)
    return second if expected_latency(second) < expected_latency(first) else first


def ewma(previous: float | None, sample: float, alpha: float) -> float:
    """An exponentially weighted mean; the first sample is taken as it is."""
    return sample if previous is None else alpha * sample + (1 - alpha) * previous
