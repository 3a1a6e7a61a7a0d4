"""Part sizing and the update codecs, against plain references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivenode.parallel.allreduce import theoretical_bytes_per_peer
from hivenode.parallel.errors import ParallelError
from hivenode.parallel.parts import bandwidth_shares, part_bounds
from hivenode.protocol.compression import (
    INT8_BLOCK,
    Compression,
    CompressionError,
    decode,
    encode,
)
from hivenode.protocol.errors import ProtocolError

GROUP = ("a", "b", "c", "d")


def test_equal_parts_cover_the_vector_in_order() -> None:
    assert part_bounds(10, GROUP) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert part_bounds(2, GROUP) == [(0, 1), (1, 2), (2, 2), (2, 2)]


def test_bandwidth_shares_equalise_the_peers_sending_time() -> None:
    shares = bandwidth_shares([2.0, 1.0, 1.0, 1.0])
    assert shares == pytest.approx([0.7, 0.1, 0.1, 0.1])
    n = 4
    times = [(1 + (n - 2) * p) / b for p, b in zip(shares, [2.0, 1.0, 1.0, 1.0], strict=True)]
    assert max(times) == pytest.approx(min(times))
    # a peer too slow to reduce anything reduces nothing; the rest stay balanced
    assert bandwidth_shares([6.0, 1.0, 1.0]) == pytest.approx([1.0, 0.0, 0.0])
    assert bandwidth_shares([3.0, 1.0]) == pytest.approx([0.75, 0.25])
    with pytest.raises(ParallelError):
        bandwidth_shares([0.0, 0.0])


def test_bandwidth_parts_follow_the_shares_and_missing_peers_count_as_slowest() -> None:
    bounds = part_bounds(1000, GROUP, {"a": 2.0, "b": 1.0, "c": 1.0})
    assert [end - start for start, end in bounds] == [700, 100, 100, 100]


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=3 * INT8_BLOCK),
    st.sampled_from(list(Compression)),
)
def test_codecs_round_trip_within_their_precision(values: list[float], codec: Compression) -> None:
    vector = np.array(values, dtype=np.float32)
    decoded = decode(encode(vector, codec), codec, len(vector))
    assert decoded.dtype == np.float32 and decoded.shape == vector.shape
    error = np.abs(decoded.astype(np.float64) - vector)
    if codec is Compression.NONE:
        assert error.max() == 0
    elif codec is Compression.FP16:
        assert (error <= np.abs(vector) * 2**-10 + 2**-24).all()
    else:  # half a step of its block: (max − min)/255/2, plus float32 rounding
        for start in range(0, len(vector), INT8_BLOCK):
            block = vector[start : start + INT8_BLOCK].astype(np.float64)
            step = (block.max() - block.min()) / 255
            bound = step / 2 + 1e-6 * max(1.0, np.abs(block).max())
            assert error[start : start + INT8_BLOCK].max() <= bound


def test_decoders_refuse_tensors_that_do_not_fit() -> None:
    vector = np.ones(10, dtype=np.float32)
    with pytest.raises(ProtocolError):
        decode(encode(vector, Compression.FP16), Compression.NONE, 10)
    with pytest.raises(ProtocolError):
        decode(encode(vector, Compression.INT8), Compression.INT8, 11)
    with pytest.raises(CompressionError, match="unknown compression 'zip'"):
        Compression.parse("zip")


def test_the_minimum_traffic_is_two_n_minus_one_over_n_of_the_vector() -> None:
    assert theoretical_bytes_per_peer(1000, 4) == 1500
    assert theoretical_bytes_per_peer(1000, 1) == 0
