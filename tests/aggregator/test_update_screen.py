"""The update screen: non-finite, mismatched and outsized train updates never reach a strategy."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from hivenode.aggregator.update_screen import (
    Records,
    screen_train_replies,
    screen_updates,
    update_norm,
)
from hivenode.models.flower_arrays import numpy_to_array

NDArray = np.ndarray[Any, Any]
FACTOR = 10.0
"""The job spec's default `update_norm_factor`."""
SHAPES = {"w": (4, 3), "b": (3,)}


def model(seed: int = 0, dtype: Any = np.float32) -> dict[str, NDArray]:
    rng = np.random.default_rng(seed)
    return {key: rng.normal(size=shape).astype(dtype) for key, shape in SHAPES.items()}


def honest(global_model: dict[str, NDArray], seed: int, step: float = 0.01) -> Records:
    rng = np.random.default_rng(1000 + seed)
    moved = {
        k: (v + step * rng.normal(size=v.shape)).astype(v.dtype) for k, v in global_model.items()
    }
    return {"arrays": moved}


def reference_norm(update: dict[str, NDArray], base: dict[str, NDArray]) -> float:
    """Plain float64: concatenate every difference, take its 2-norm."""
    flat = np.concatenate(
        [(update[k].astype(np.float64) - base[k].astype(np.float64)).ravel() for k in base]
    )
    return float(np.linalg.norm(flat))


def round_of(count: int, seed: int = 0) -> tuple[list[Records], list[Records]]:
    base = model(seed)
    updates = [honest(base, seed * 100 + i) for i in range(count)]
    return updates, [{"arrays": base}] * count


def test_the_norm_matches_a_float64_reference() -> None:
    base = model(1)
    update = honest(base, 7, step=0.3)
    assert update_norm(update, {"arrays": base}) == pytest.approx(
        reference_norm(dict(update["arrays"]), base), rel=1e-5
    )


def test_a_record_without_a_namesake_in_the_request_is_an_update_itself() -> None:
    base = model(1)
    delta_y = {k: np.full(v.shape, 0.5, np.float32) for k, v in base.items()}
    delta_c = {k: np.zeros(v.shape, np.float32) for k, v in base.items()}
    norm = update_norm({"delta_y": delta_y, "delta_c": delta_c}, {"arrays": base})
    assert norm == pytest.approx(0.5 * math.sqrt(12 + 3))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_update_is_rejected_even_alone(bad: float) -> None:
    base = model()
    poisoned = {k: v.copy() for k, v in base.items()}
    poisoned["b"][1] = bad
    verdict = screen_updates([{"arrays": poisoned}], [{"arrays": base}], FACTOR)
    assert verdict.keep == ()
    assert "NaN or Inf" in verdict.rejected[0]
    assert verdict.median_norm is None


def test_an_update_scaled_100_times_is_rejected_among_honest_ones() -> None:
    updates, references = round_of(9)
    base = dict(references[0]["arrays"])
    scaled = {k: base[k] + 100 * (v - base[k]) for k, v in updates[4]["arrays"].items()}
    updates[4] = {"arrays": scaled}
    verdict = screen_updates(updates, references, FACTOR)
    assert verdict.keep == tuple(i for i in range(9) if i != 4)
    assert "exceeds 10 × the round's median" in verdict.rejected[4]
    assert verdict.median_norm is not None and verdict.median_norm > 0


def test_with_fewer_than_three_replies_only_the_finiteness_check_applies() -> None:
    updates, references = round_of(2)
    base = dict(references[0]["arrays"])
    updates[1] = {
        "arrays": {k: base[k] + 1000 * (v - base[k]) for k, v in updates[1]["arrays"].items()}
    }
    verdict = screen_updates(updates, references, FACTOR)
    assert verdict.keep == (0, 1)
    assert verdict.median_norm is None


def test_a_zero_median_bounds_nothing() -> None:
    base = model()
    still = {"arrays": base}
    moved = honest(base, 1)
    verdict = screen_updates([still, still, still, moved], [{"arrays": base}] * 4, FACTOR)
    assert verdict.median_norm == 0.0
    assert verdict.keep == (0, 1, 2, 3)


def test_a_factor_of_zero_turns_the_norm_bound_off() -> None:
    updates, references = round_of(5)
    base = dict(references[0]["arrays"])
    updates[0] = {
        "arrays": {k: base[k] + 1e4 * (v - base[k]) for k, v in updates[0]["arrays"].items()}
    }
    assert screen_updates(updates, references, factor=0).keep == (0, 1, 2, 3, 4)


def test_arrays_that_do_not_match_the_model_are_rejected() -> None:
    base = model()
    missing = {"arrays": {"w": base["w"]}}
    reshaped = {"arrays": {"w": base["w"].reshape(3, 4), "b": base["b"]}}
    verdict = screen_updates([missing, reshaped], [{"arrays": base}] * 2, FACTOR)
    assert verdict.keep == ()
    assert "the model has" in verdict.rejected[0]
    assert "shape" in verdict.rejected[1]


def test_finite_values_whose_difference_overflows_are_rejected_not_raised() -> None:
    base = {"w": np.full(3, -1.7e308)}
    update = {"w": np.full(3, 1.7e308)}
    verdict = screen_updates([{"arrays": update}], [{"arrays": base}], FACTOR)
    assert verdict.keep == ()
    assert "overflows" in verdict.rejected[0]


def test_large_but_representable_norms_do_not_overflow() -> None:
    base = {"w": np.zeros(4)}
    update = {"w": np.full(4, 1e200)}
    assert update_norm({"arrays": update}, {"arrays": base}) == pytest.approx(2e200)


def content(arrays: dict[str, NDArray] | ArrayRecord, examples: int = 10) -> RecordDict:
    record = (
        arrays
        if isinstance(arrays, ArrayRecord)
        else ArrayRecord({k: numpy_to_array(v) for k, v in arrays.items()})
    )
    return RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": examples})})


def test_flower_replies_are_screened_by_their_own_request() -> None:
    base = model()
    requests = [content(base)] * 5
    replies = [content(dict(honest(base, i)["arrays"])) for i in range(5)]
    nan = {k: np.full_like(v, np.nan) for k, v in base.items()}
    replies[2] = content(nan)
    broken = ArrayRecord(
        {
            "w": Array(dtype="float32", shape=(4, 3), stype="numpy.ndarray", data=b"junk"),
            "b": numpy_to_array(base["b"]),
        }
    )
    replies[3] = content(broken)
    verdict = screen_train_replies(requests, replies, FACTOR)
    assert verdict.keep == (0, 1, 4)
    assert set(verdict.rejected) == {2, 3}
    assert "unreadable" in verdict.rejected[3]
    assert verdict.norms[3] is None and verdict.norms[0] is not None


# --- properties -------------------------------------------------------------------------------

scales = st.lists(
    st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False),
    min_size=0,
    max_size=12,
)


def scaled_round(factors: list[float], seed: int) -> tuple[list[Records], list[Records]]:
    base = model(seed, np.float64)
    direction = honest(base, seed)["arrays"]
    updates: list[Records] = [
        {"arrays": {k: base[k] + f * (direction[k] - base[k]) for k in base}} for f in factors
    ]
    return updates, [{"arrays": base}] * len(factors)


@settings(max_examples=80, deadline=None)
@given(scales, st.integers(0, 50), st.floats(min_value=1.0, max_value=100.0))
def test_at_least_half_of_a_finite_round_is_kept_and_kept_norms_are_within_the_bound(
    factors: list[float], seed: int, factor: float
) -> None:
    updates, references = scaled_round(factors, seed)
    verdict = screen_updates(updates, references, factor)
    assert 2 * len(verdict.keep) >= len(factors)
    if verdict.median_norm is not None:
        bound = factor * verdict.median_norm
        for index in verdict.keep:
            norm = verdict.norms[index]
            assert norm is not None and norm <= bound
        for index in verdict.rejected:
            norm = verdict.norms[index]
            assert norm is not None and norm > bound
    else:
        assert len(factors) < 3 and len(verdict.keep) == len(factors)


@settings(max_examples=60, deadline=None)
@given(scales, st.integers(0, 50), st.randoms(use_true_random=False))
def test_the_verdict_does_not_depend_on_the_order_of_the_replies(
    factors: list[float], seed: int, rng: Any
) -> None:
    updates, references = scaled_round(factors, seed)
    order = list(range(len(factors)))
    rng.shuffle(order)
    verdict = screen_updates(updates, references, FACTOR)
    shuffled = screen_updates([updates[i] for i in order], references, FACTOR)
    assert {order[i] for i in shuffled.keep} == set(verdict.keep)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(3, 10),
    st.integers(0, 50),
    st.data(),
)
def test_a_reply_with_any_non_finite_value_is_always_rejected(
    count: int, seed: int, data: st.DataObject
) -> None:
    updates, references = round_of(count, seed)
    victim = data.draw(st.integers(0, count - 1))
    key = data.draw(st.sampled_from(sorted(SHAPES)))
    position = data.draw(st.integers(0, math.prod(SHAPES[key]) - 1))
    bad = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    poisoned = {k: np.array(v, copy=True) for k, v in updates[victim]["arrays"].items()}
    poisoned[key].reshape(-1)[position] = bad
    updates[victim] = {"arrays": poisoned}
    verdict = screen_updates(updates, references, FACTOR)
    assert victim in verdict.rejected and victim not in verdict.keep
    assert len(verdict.keep) == count - 1
