"""Fast aggregation against a plain float64 reference, and Flower's own ArrayRecord averaging."""

from __future__ import annotations

import itertools
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords as flower_aggregate
from hypothesis import given, settings
from hypothesis import strategies as st

from hivenode.models.flower_arrays import ArrayFormatError, array_to_numpy, numpy_to_array
from hivenode.protocol.message import Message, decode_message, encode_message
from hivenode.strategies.aggregate import AggregationError, WeightedMean, weighted_mean
from hivenode.strategies.flower_arrays import aggregate_arrayrecords

NDArray = np.ndarray[Any, Any]
FLOAT_DTYPES = [np.float16, np.float32, np.float64]
# rounding the float64 mean to the result dtype is the only error: ≤ 1 ulp of the result
RTOL = {np.dtype(np.float16): 2e-3, np.dtype(np.float32): 2e-7, np.dtype(np.float64): 1e-12}


def reference(updates: list[list[NDArray]], weights: list[float]) -> list[NDArray]:
    """np.average over float64 copies, tensor by tensor."""
    return [
        np.average(np.stack([u[i].astype(np.float64) for u in updates]), axis=0, weights=weights)
        for i in range(len(updates[0]))
    ]


def assert_close(got: list[NDArray], want: list[NDArray], dtype: np.dtype[Any]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert g.dtype == dtype
        scale = max(1.0, float(np.abs(w).max(initial=0.0)))
        np.testing.assert_allclose(g.astype(np.float64), w, rtol=0, atol=RTOL[dtype] * scale)


@st.composite
def update_sets(draw: st.DrawFn) -> tuple[list[list[NDArray]], list[float], np.dtype[Any]]:
    dtype = np.dtype(draw(st.sampled_from(FLOAT_DTYPES)))
    shapes = draw(st.lists(hnp.array_shapes(min_dims=0, max_dims=3, max_side=7), max_size=4))
    count = draw(st.integers(1, 6))
    elements = st.floats(-1e3, 1e3, width=dtype.itemsize * 8)
    updates = [
        [draw(hnp.arrays(dtype, shape, elements=elements)) for shape in shapes]
        for _ in range(count)
    ]
    weights = draw(
        st.lists(st.floats(1e-3, 1e4), min_size=count, max_size=count)
        | st.lists(st.integers(1, 10_000).map(float), min_size=count, max_size=count)
    )
    return updates, weights, dtype


@settings(max_examples=150, deadline=None)
@given(data=update_sets(), chunk=st.sampled_from([1, 3, 64, 1 << 18]), workers=st.integers(1, 3))
def test_streaming_mean_matches_float64_reference(
    data: tuple[list[list[NDArray]], list[float], np.dtype[Any]], chunk: int, workers: int
) -> None:
    updates, weights, dtype = data
    mean = WeightedMean(updates[0], chunk_elements=chunk, workers=workers)
    for update, weight in zip(updates, weights, strict=True):
        mean.add(update, weight)
    assert mean.count == len(updates)
    assert_close(mean.result(), reference(updates, weights), dtype)


@settings(max_examples=150, deadline=None)
@given(data=update_sets(), chunk=st.sampled_from([1, 5, 1 << 18]), workers=st.integers(1, 3))
def test_batch_mean_matches_float64_reference(
    data: tuple[list[list[NDArray]], list[float], np.dtype[Any]], chunk: int, workers: int
) -> None:
    updates, weights, dtype = data
    got = weighted_mean(updates, weights, chunk_elements=chunk, workers=workers)
    assert_close(got, reference(updates, weights), dtype)


def random_updates(count: int, shapes: list[tuple[int, ...]], seed: int = 0) -> list[list[NDArray]]:
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s, dtype=np.float32) for s in shapes] for _ in range(count)]


def test_streaming_order_does_not_change_the_mean() -> None:
    updates = random_updates(5, [(33, 7), (100,)])
    weights = [1.0, 20.0, 3.5, 7.0, 0.25]
    results = []
    for order in itertools.islice(itertools.permutations(range(5)), 0, 120, 17):
        mean = WeightedMean([(33, 7), (100,)], chunk_elements=16)
        for i in order:
            mean.add(updates[i], weights[i])
        results.append(mean.result(np.float64))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-14)


def test_float32_accumulator_stays_close_to_reference() -> None:
    updates = random_updates(50, [(10_000,)])
    weights = [float(w) for w in np.random.default_rng(1).uniform(1, 100, 50)]
    mean = WeightedMean(updates[0], accumulator_dtype=np.float32)
    for update, weight in zip(updates, weights, strict=True):
        mean.add(update, weight)
    (got,) = mean.result()
    (want,) = reference(updates, weights)
    assert np.abs(got.astype(np.float64) - want).max() < 1e-5


def test_aggregates_views_over_a_received_buffer_without_copying_them() -> None:
    shapes = [(64, 32), (32,)]
    updates = random_updates(3, shapes)
    mean = WeightedMean(shapes)
    for i, update in enumerate(updates):
        wire = b"".join(
            bytes(frame) for frame in encode_message(Message("update", 1, "p", {}, tuple(update)))
        )
        received = decode_message(wire)
        assert all(not a.flags.owndata for a in received.tensors)
        mean.add(list(received.tensors), float(i + 1))
    assert_close(mean.result(), reference(updates, [1.0, 2.0, 3.0]), np.dtype(np.float32))


def test_result_can_widen_beyond_the_accumulator() -> None:
    updates = random_updates(3, [(10,)])
    mean = WeightedMean(updates[0], accumulator_dtype=np.float32)
    for update in updates:
        mean.add(update, 1.0)
    (got,) = mean.result(np.float64)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, reference(updates, [1.0] * 3)[0], atol=1e-6)


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf"), "heavy"])
def test_weights_must_be_finite_and_positive(weight: Any) -> None:
    mean = WeightedMean([(2,)])
    with pytest.raises(AggregationError, match="weight"):
        mean.add([np.ones(2, np.float32)], weight)
    with pytest.raises(AggregationError, match="weight"):
        weighted_mean([[np.ones(2)], [np.ones(2)]], [1.0, weight])


def test_updates_must_match_the_template() -> None:
    mean = WeightedMean([(2, 3), (4,)])
    with pytest.raises(AggregationError, match="has 1 tensors, expected 2"):
        mean.add([np.ones((2, 3))], 1.0)
    with pytest.raises(AggregationError, match=r"shape \(3, 2\), expected \(2, 3\)"):
        mean.add([np.ones((3, 2)), np.ones(4)], 1.0)
    with pytest.raises(AggregationError, match="not floating point"):
        mean.add([np.ones((2, 3), np.int64), np.ones(4)], 1.0)
    with pytest.raises(AggregationError, match=r"update 1, tensor 0: shape \(2,\)"):
        weighted_mean([[np.ones(1)], [np.ones(2)]], [1.0, 1.0])
    with pytest.raises(AggregationError, match="2 updates but 1 weights"):
        weighted_mean([[np.ones(1)], [np.ones(1)]], [1.0])


def test_result_needs_an_update_and_is_taken_once() -> None:
    mean = WeightedMean([(2,)])
    with pytest.raises(AggregationError, match="no update"):
        mean.result()
    mean.add([np.ones(2)], 1.0)
    mean.result()
    with pytest.raises(AggregationError, match="once"):
        mean.result()
    with pytest.raises(AggregationError, match="already taken"):
        mean.add([np.ones(2)], 1.0)
    with pytest.raises(AggregationError, match="no update"):
        weighted_mean([], [])


# --- Flower adapters ---------------------------------------------------------------------------


def flower_replies(updates: list[list[NDArray]], weights: list[float]) -> list[RecordDict]:
    return [
        RecordDict(
            {
                "arrays": ArrayRecord({f"layer{i}": Array(a) for i, a in enumerate(update)}),
                "metrics": MetricRecord({"num-examples": int(weight), "loss": 0.5}),
            }
        )
        for update, weight in zip(updates, weights, strict=True)
    ]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_arrayrecord_adapter_matches_flower(dtype: type[np.floating[Any]]) -> None:
    shapes = [(17, 5), (3, 4, 2), (), (1000,)]
    updates = [[u.astype(dtype) for u in update] for update in random_updates(4, shapes)]
    weights = [10.0, 3.0, 250.0, 1.0]
    replies = flower_replies(updates, weights)
    ours = aggregate_arrayrecords(replies, "num-examples")
    theirs = flower_aggregate(replies, "num-examples")
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype
        assert ours[key].shape == theirs[key].shape
        atol = 2e-3 if dtype == np.float16 else 1e-6
        np.testing.assert_allclose(ours[key].numpy(), theirs[key].numpy(), atol=atol)
    precise = aggregate_arrayrecords(replies, "num-examples", accumulator_dtype=np.float64)
    assert_close(
        [precise[f"layer{i}"].numpy() for i in range(len(shapes))],
        reference(updates, weights),
        np.dtype(dtype),
    )


def test_model_precision_accumulation_rounds_no_worse_than_flower() -> None:
    """The default float32 accumulator (BLAS saxpy) over many updates: Flower's error, not more."""
    shapes = [(4096,), (64, 65)]
    updates = random_updates(100, shapes)
    weights = [float(w) for w in np.random.default_rng(7).integers(1, 1000, 100)]
    replies = flower_replies(updates, weights)
    ours = aggregate_arrayrecords(replies, "num-examples")
    theirs = flower_aggregate(replies, "num-examples")
    want = reference(updates, weights)
    for i, w in enumerate(want):
        key = f"layer{i}"
        assert ours[key].numpy().dtype == np.float32
        our_err = np.abs(ours[key].numpy() - w).max()
        their_err = np.abs(theirs[key].numpy() - w).max()
        assert our_err <= 1.5 * their_err + 1e-9, (our_err, their_err)
        assert our_err < 100 * 2.0**-24 * max(1.0, float(np.abs(w).max()))


def test_array_decodes_as_a_view_over_its_bytes() -> None:
    original = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    array = Array(original)
    view = array_to_numpy(array)
    assert np.array_equal(view, original)
    assert view.base is not None
    assert not view.flags.owndata
    assert np.shares_memory(view, np.frombuffer(array.data, np.uint8))


@pytest.mark.parametrize(
    "original",
    [
        np.array(2.5, np.float32),
        np.zeros((0, 3)),
        np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        np.arange(4, dtype=">f4"),
    ],
)
def test_arrays_round_trip_through_flower(original: NDArray) -> None:
    ours = numpy_to_array(original)
    assert np.array_equal(ours.numpy(), original)
    assert np.array_equal(array_to_numpy(Array(original)), original)
    assert (ours.dtype, ours.shape, ours.stype) == (
        Array(original).dtype,
        Array(original).shape,
        Array(original).stype,
    )


def test_bad_arrays_and_replies_raise_their_errors() -> None:
    with pytest.raises(ArrayFormatError, match="serialisation type"):
        array_to_numpy(Array(dtype="float32", shape=(1,), stype="torch", data=b"\0" * 4))
    with pytest.raises(ArrayFormatError, match=r"not a valid \.npy"):
        array_to_numpy(Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=b"junk"))
    truncated = Array(np.ones(8, np.float32))
    truncated.data = truncated.data[:-4]
    with pytest.raises(ArrayFormatError, match="expected 32"):
        array_to_numpy(truncated)
    replies = flower_replies(random_updates(2, [(3,)]), [1.0, 2.0])
    with pytest.raises(AggregationError, match="has no 'samples'"):
        aggregate_arrayrecords(replies, "samples")
    other = flower_replies(random_updates(1, [(3,), (2,)]), [1.0])
    with pytest.raises(AggregationError, match="reply 1 has arrays"):
        aggregate_arrayrecords([replies[0], other[0]], "num-examples")
