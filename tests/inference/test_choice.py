"""Worker choice as pure functions: expected latency and the power of two choices."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from hivenode.inference.choice import (
    UNMEASURED_SERVICE_S,
    Candidate,
    choose,
    ewma,
    expected_latency,
)


def test_expected_latency_counts_every_request_ahead() -> None:
    idle = Candidate("a", latency_ewma_s=0.010)
    assert expected_latency(idle) == pytest.approx(0.010)
    assert expected_latency(Candidate("a", 2, 0.010, queue=3)) == pytest.approx(0.060)


def test_an_unmeasured_worker_is_priced_optimistically_and_gets_tried() -> None:
    fresh = Candidate("new", rtt_s=0.002)
    assert expected_latency(fresh) == pytest.approx(0.002 + UNMEASURED_SERVICE_S)
    measured = Candidate("old", latency_ewma_s=0.004)
    assert choose([measured, fresh], random.Random(0)) is fresh
    assert (
        choose([measured, Candidate("new", in_flight=3, rtt_s=0.002)], random.Random(0)) is measured
    )


def test_two_choices_never_pick_the_slowest_of_three() -> None:
    workers = [
        Candidate("fast", latency_ewma_s=0.002),
        Candidate("mid", latency_ewma_s=0.004),
        Candidate("slow", latency_ewma_s=0.004, in_flight=5),
    ]
    rng = random.Random(1)
    picks = Counter(choose(workers, rng).peer_id for _ in range(3000))
    assert picks["slow"] == 0
    # fast wins every pair it is drawn in (2 of 3 pairs), mid only the pair with slow
    assert picks["fast"] / 3000 == pytest.approx(2 / 3, abs=0.05)


def test_a_single_worker_is_chosen_and_none_is_an_error() -> None:
    only = Candidate("a")
    assert choose([only], random.Random(0)) is only
    with pytest.raises(ValueError):
        choose([], random.Random(0))


def test_ewma_starts_at_the_first_sample() -> None:
    assert ewma(None, 0.5, 0.2) == 0.5
    assert ewma(1.0, 0.0, 0.25) == pytest.approx(0.75)
