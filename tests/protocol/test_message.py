"""The stream message codec: round trips, zero copies, and only ProtocolError for bad input."""

from __future__ import annotations

import contextlib
import random
import struct
import tracemalloc
from collections.abc import Mapping
from typing import Any

import hypothesis.extra.numpy as hnp
import msgpack
import numpy as np
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from hivenode.protocol.errors import ProtocolError
from hivenode.protocol.ids import WIRE_VERSION
from hivenode.protocol.limits import DEFAULT_LIMITS, Limits
from hivenode.protocol.message import Message, decode_message, encode_message
from hivenode.protocol.streams import read_exactly, read_message, write_message

MiB = 1024 * 1024
FUZZ = settings(max_examples=150, deadline=None)
ROUND_TRIP = settings(max_examples=120, deadline=None)

# Written out here rather than taken from the module, so the test is an independent reference.
WIRE_DTYPE_NAMES = ["?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8"]
DTYPES = [np.dtype(f"{order}{name}") for name in WIRE_DTYPE_NAMES for order in "<>"]


class MemoryStream:
    """An in-memory ByteStream that answers reads with a random number of bytes."""

    def __init__(self, data: bytes = b"", rng: random.Random | None = None) -> None:
        self.data = bytearray(data)
        self.position = 0
        self.rng = rng or random.Random(0)
        self.read_sizes: list[int] = []
        self.writes: list[bytes] = []

    async def read(self, n: int) -> bytes:
        await trio.lowlevel.checkpoint()
        self.read_sizes.append(n)
        count = self.rng.randint(1, n) if n > 0 else 0
        chunk = bytes(self.data[self.position : self.position + count])
        self.position += len(chunk)
        return chunk

    async def write(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        assert type(data) is bytes, "libp2p streams take bytes"
        self.writes.append(data)
        self.data += data


class GreedyStream(MemoryStream):
    """A broken stream that returns more bytes than it was asked for."""

    async def read(self, n: int) -> bytes:
        return b"x" * (n + 1)


def frame(header: Mapping[Any, Any] | Any, payload: bytes = b"") -> bytes:
    """A message built by hand: the reference for the wire layout."""
    packed = msgpack.packb(header, use_bin_type=True)
    return struct.pack(">I", len(packed)) + packed + payload


def header(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"v": 1, "t": "ping", "id": 7, "from": "peer-a", "body": {}}
    base["tensors"] = []
    base.update(fields)
    return base


def tensor_entry(dtype: str = "<f4", shape: list[Any] | None = None, nbytes: Any = 8) -> Any:
    return {"dtype": dtype, "shape": [2] if shape is None else shape, "nbytes": nbytes}


def sample_message() -> Message:
    return Message(
        type="train",
        request_id=42,
        sender="12D3KooWpeer",
        body={"round": 3, "lr": 0.01, "tags": ["a", "b"], "blob": b"\x00\x01"},
        tensors=(np.arange(6, dtype=np.float32).reshape(2, 3), np.array(7, dtype=np.int64)),
    )


def encoded(msg: Message) -> bytes:
    return b"".join(encode_message(msg))


def wire_form(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return array.astype(array.dtype.newbyteorder("<"))


def assert_same_message(got: Message, sent: Message) -> None:
    assert (got.version, got.type, got.request_id, got.sender) == (
        sent.version,
        sent.type,
        sent.request_id,
        sent.sender,
    )
    assert got.body == sent.body
    assert len(got.tensors) == len(sent.tensors)
    for received, original in zip(got.tensors, sent.tensors, strict=True):
        expected = wire_form(original)
        assert received.dtype == expected.dtype
        assert received.shape == expected.shape
        # Bytes, not values, so that NaN payloads and -0.0 must survive too.
        assert received.tobytes() == expected.tobytes()
        assert np.array_equal(received, expected, equal_nan=expected.dtype.kind == "f")


def root_buffer(array: np.ndarray[Any, Any]) -> Any:
    """The object that owns the memory behind `array`."""
    base: Any = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


@st.composite
def any_arrays(draw: st.DrawFn) -> np.ndarray[Any, Any]:
    """Arrays of every allowed dtype in either byte order, 0-d and empty included, and not
    always C-contiguous."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)
    array = draw(hnp.arrays(dtype, shape))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    if layout == "transposed":
        return array.T
    if layout == "strided" and array.ndim > 0:
        return array[..., ::2]
    return array


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)

messages = st.builds(
    Message,
    type=st.text(max_size=20),
    request_id=st.integers(min_value=0, max_value=2**64 - 1),
    sender=st.text(max_size=60),
    body=st.dictionaries(st.text(max_size=10), msgpack_values, max_size=5),
    tensors=st.lists(any_arrays(), max_size=4).map(tuple),
)


# --- round trips -------------------------------------------------------------------------


@ROUND_TRIP
@given(messages)
def test_message_round_trips_through_decode_message(msg: Message) -> None:
    assert_same_message(decode_message(encoded(msg)), msg)


@ROUND_TRIP
@given(messages, st.randoms(use_true_random=False))
async def test_message_round_trips_through_a_stream_with_short_reads(
    msg: Message, rng: random.Random
) -> None:
    stream = MemoryStream(rng=rng)
    with trio.fail_after(5):
        await write_message(stream, msg)
        got = await read_message(stream)
    assert_same_message(got, msg)
    assert stream.position == len(stream.data)


def test_wire_layout_is_prefix_then_msgpack_header_then_little_endian_tensor_bytes() -> None:
    big_endian = np.array([[1, 2], [3, 4]], dtype=">i2")
    msg = Message("infer", 9, "peer-b", {"k": [1, "two"]}, (big_endian,))
    expected_header = {
        "v": WIRE_VERSION,
        "t": "infer",
        "id": 9,
        "from": "peer-b",
        "body": {"k": [1, "two"]},
        "tensors": [{"dtype": "<i2", "shape": [2, 2], "nbytes": 8}],
    }
    payload = struct.pack("<4h", 1, 2, 3, 4)
    assert encoded(msg) == frame(expected_header, payload)


async def test_read_message_leaves_the_next_message_on_the_stream() -> None:
    first, second = sample_message(), Message("pong", 2, "peer-c", {})
    stream = MemoryStream(encoded(first) + encoded(second))
    with trio.fail_after(5):
        assert_same_message(await read_message(stream), first)
        assert_same_message(await read_message(stream), second)


def test_unknown_header_fields_are_ignored() -> None:
    data = frame(header(extra="from a newer agent", tensors=[tensor_entry()]), bytes(8))
    msg = decode_message(data)
    assert msg.type == "ping"
    assert msg.tensors[0].tolist() == [0.0, 0.0]


# --- no copies ---------------------------------------------------------------------------


def test_encode_gives_views_over_contiguous_little_endian_arrays() -> None:
    array = np.arange(12, dtype="<f8").reshape(3, 4)
    view = encode_message(Message("t", 1, "p", {}, (array,)))[1]
    assert np.shares_memory(np.frombuffer(view, dtype=np.uint8), array)


def test_encode_copies_non_contiguous_arrays_into_c_order() -> None:
    array = np.arange(12, dtype="<i4").reshape(3, 4).T
    view = encode_message(Message("t", 1, "p", {}, (array,)))[1]
    assert bytes(view) == np.ascontiguousarray(array).tobytes()


def test_decoded_arrays_share_memory_with_the_input_buffer() -> None:
    data = bytearray(encoded(sample_message()))
    msg = decode_message(data)
    whole = np.frombuffer(data, dtype=np.uint8)
    assert all(np.shares_memory(array, whole) for array in msg.tensors)
    msg.tensors[0][0, 0] = 99.0  # a bytearray gives writable views
    first_tensor_starts = len(data) - 24 - 8
    assert np.frombuffer(data, np.float32, count=1, offset=first_tensor_starts)[0] == 99.0


async def test_read_message_builds_writable_arrays_over_one_buffer() -> None:
    stream = MemoryStream(encoded(sample_message()))
    with trio.fail_after(5):
        msg = await read_message(stream)
    owners = {id(root_buffer(array)) for array in msg.tensors}
    assert len(owners) == 1
    assert all(array.flags.writeable for array in msg.tensors)


async def test_a_declared_size_costs_no_memory_until_its_bytes_arrive() -> None:
    """87 bytes that declare 1 GiB of tensors, then silence: while the reader waits for the
    rest, the declaration has not made it commit 1 GiB (a bytearray of the declared size
    did, zero-filled: a remote DoS), and the stream's end is refused."""
    import msgpack
    import psutil

    from hivenode.protocol.message import HEADER_PREFIX

    parts = encode_message(Message("m", 1, "peer", {}, (np.zeros(4, np.float32),)))
    header = msgpack.unpackb(bytes(parts[0])[HEADER_PREFIX.size :])
    header["tensors"][0].update(shape=[2**28], nbytes=2**30)  # float32: 1 GiB
    packed = msgpack.packb(header)
    stream = StallingStream(HEADER_PREFIX.pack(len(packed)) + packed + b"\0" * 16)
    rss = psutil.Process().memory_info().rss
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                with pytest.raises(ProtocolError, match="stream ended"):
                    await read_message(stream)

            nursery.start_soon(read)
            await stream.drained.wait()  # the reader holds its buffer and waits for bytes
            grown = psutil.Process().memory_info().rss - rss
            stream.release.set()
    assert grown < 256 * 2**20


class StallingStream(MemoryStream):
    """Gives its bytes, then waits for `release` before it ends."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.drained = trio.Event()
        self.release = trio.Event()

    async def read(self, n: int) -> bytes:
        if self.position >= len(self.data):
            self.drained.set()
            await self.release.wait()
        return await super().read(n)


# --- refused dtypes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.array([object()], dtype=object),
        np.array(["text"]),
        np.zeros(2, dtype="V4"),
        np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")]),
        np.zeros(2, dtype="datetime64[s]"),
        np.zeros(2, dtype=np.complex64),
    ],
    ids=["object", "unicode", "void", "structured", "datetime", "complex"],
)
def test_encode_refuses_dtypes_outside_the_allow_list(array: np.ndarray[Any, Any]) -> None:
    with pytest.raises(ProtocolError, match="wire does not carry"):
        encode_message(Message("t", 1, "p", {}, (array,)))


@pytest.mark.parametrize("dtype", ["|O8", "<U4", "|V4", "|S4", ">f4", "<c8", "<M8[s]", "f4"])
def test_decode_refuses_dtypes_outside_the_allow_list(dtype: str) -> None:
    data = frame(header(tensors=[tensor_entry(dtype=dtype, shape=[2], nbytes=8)]), bytes(8))
    with pytest.raises(ProtocolError, match="not allowed"):
        decode_message(data)


# --- malformed headers -------------------------------------------------------------------


def test_wrong_version_names_both_versions() -> None:
    data = encoded(Message("t", 1, "p", {}, version=7))
    with pytest.raises(ProtocolError) as caught:
        decode_message(data)
    assert str(caught.value) == f"unsupported wire version 7 (this node speaks {WIRE_VERSION})"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("v", "1"),
        ("v", True),
        ("t", 5),
        ("id", "7"),
        ("id", 1.0),
        ("id", False),
        ("from", None),
        ("body", [1, 2]),
        ("tensors", {"dtype": "<f4"}),
    ],
)
def test_wrong_typed_header_field_raises_protocol_error(field: str, value: Any) -> None:
    with pytest.raises(ProtocolError, match=f"field '{field}' must be"):
        decode_message(frame(header(**{field: value})))


@pytest.mark.parametrize("field", ["v", "t", "id", "from", "body", "tensors"])
def test_missing_header_field_raises_protocol_error(field: str) -> None:
    fields = header()
    del fields[field]
    with pytest.raises(ProtocolError, match=f"no '{field}' field"):
        decode_message(frame(fields))


@pytest.mark.parametrize("value", [[1, 2], "header", 3, None])
def test_header_that_is_not_a_map_raises_protocol_error(value: Any) -> None:
    with pytest.raises(ProtocolError, match="header must be a map"):
        decode_message(frame(value))


@pytest.mark.parametrize(
    "packed",
    [b"", b"\xc1", b"\x92\x01", b"\x81\x01\x02", b"\xa2\xff\xfe", b"\x91" * 5000, b"\x80\x80"],
    ids=["empty", "reserved-byte", "short-array", "int-key", "bad-utf8", "deep", "extra-data"],
)
def test_undecodable_header_raises_protocol_error(packed: bytes) -> None:
    data = struct.pack(">I", len(packed)) + packed
    with pytest.raises(ProtocolError, match="undecodable message header"):
        decode_message(data)


def test_body_keys_must_be_strings() -> None:
    with pytest.raises(ProtocolError, match="body keys must be strings"):
        decode_message(frame(header(body={b"raw": 1})))


def test_unencodable_body_raises_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="cannot be encoded"):
        encode_message(Message("t", 1, "p", {"when": object()}))


# --- malformed tensors and limits --------------------------------------------------------


def test_too_many_tensors_raise_protocol_error() -> None:
    msg = Message("t", 1, "p", {}, tuple(np.zeros(1, np.uint8) for _ in range(3)))
    with pytest.raises(ProtocolError, match="3 tensors, over the limit of 2"):
        decode_message(encoded(msg), Limits(max_tensors=2))


def test_too_many_tensors_are_refused_before_any_is_parsed() -> None:
    garbage = ["not a tensor"] * (DEFAULT_LIMITS.max_tensors + 1)
    with pytest.raises(ProtocolError, match="over the limit"):
        decode_message(frame(header(tensors=garbage)))


@pytest.mark.parametrize(
    ("shape", "nbytes"), [([2], 4), ([2], 12), ([2, 3], 8), ([], 0), ([0], 4), ([2], -8)]
)
def test_nbytes_not_matching_shape_raises_protocol_error(shape: list[int], nbytes: int) -> None:
    data = frame(header(tensors=[tensor_entry(shape=shape, nbytes=nbytes)]), bytes(max(nbytes, 0)))
    with pytest.raises(ProtocolError, match=r"declares .* bytes but shape"):
        decode_message(data)


@pytest.mark.parametrize("shape", [[-1], [2, -3], [1.5], [True], ["2"], [None], [1] * 33], ids=str)
def test_negative_or_malformed_shape_raises_protocol_error(shape: list[Any]) -> None:
    data = frame(header(tensors=[tensor_entry(shape=shape, nbytes=4)]), bytes(4))
    with pytest.raises(ProtocolError, match=r"shape must be|dimensions"):
        decode_message(data)


def test_empty_tensor_with_absurd_dimensions_is_refused() -> None:
    data = frame(header(tensors=[tensor_entry(shape=[0, 2**40, 2**40], nbytes=0)]))
    with pytest.raises(ProtocolError, match="over the limit"):
        decode_message(data)


def test_tensor_entry_that_is_not_a_map_raises_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="tensor 0 must be a map"):
        decode_message(frame(header(tensors=[[1, 2]])))


def test_total_over_limits_raises_protocol_error() -> None:
    msg = Message("t", 1, "p", {}, (np.zeros(60, np.uint8), np.zeros(41, np.uint8)))
    with pytest.raises(ProtocolError, match="tensors total 101 bytes, over the limit of 100"):
        decode_message(encoded(msg), Limits(max_total_bytes=100))


def test_oversized_declared_total_is_refused_without_allocating() -> None:
    data = frame(header(tensors=[tensor_entry("|u1", shape=[10**15], nbytes=10**15)]))
    with pytest.raises(ProtocolError, match=f"limit of {DEFAULT_LIMITS.max_total_bytes}"):
        decode_message(data + bytes(64))


async def test_read_message_refuses_an_oversized_total_before_allocating_it() -> None:
    declared = 100 * MiB
    stream = MemoryStream(frame(header(tensors=[tensor_entry("|u1", [declared], declared)])))
    tracemalloc.start()
    try:
        with trio.fail_after(5), pytest.raises(ProtocolError, match="over the limit of 1000"):
            await read_message(stream, Limits(max_total_bytes=1000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < declared // 10


@pytest.mark.parametrize("length", [DEFAULT_LIMITS.max_header_bytes + 1, 2**32 - 1])
async def test_header_length_over_the_limit_is_refused_before_reading_the_header(
    length: int,
) -> None:
    stream = MemoryStream(struct.pack(">I", length) + bytes(64))
    with trio.fail_after(5), pytest.raises(ProtocolError, match=f"header of {length} bytes"):
        await read_message(stream)
    assert stream.position == 4
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode_message(bytes(stream.data))


# --- truncated, trailing, corrupted and random input -------------------------------------


def test_truncated_message_raises_protocol_error() -> None:
    data = encoded(sample_message())
    for end in range(len(data)):
        with pytest.raises(ProtocolError):
            decode_message(data[:end])


async def test_truncated_message_on_a_stream_raises_protocol_error() -> None:
    data = encoded(sample_message())
    for end in range(len(data)):
        with trio.fail_after(5), pytest.raises(ProtocolError, match="stream ended after"):
            await read_message(MemoryStream(data[:end], random.Random(end)))


def test_trailing_bytes_raise_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="header declares"):
        decode_message(encoded(sample_message()) + b"\x00")


@FUZZ
@given(st.data())
def test_message_with_a_flipped_byte_decodes_or_raises_protocol_error(data: st.DataObject) -> None:
    wire = bytearray(encoded(sample_message()))
    position = data.draw(st.integers(0, len(wire) - 1))
    wire[position] ^= data.draw(st.integers(1, 255))
    with contextlib.suppress(ProtocolError):
        decode_message(wire)


@FUZZ
@given(st.data(), st.randoms(use_true_random=False))
async def test_message_with_a_flipped_byte_on_a_stream_reads_or_raises_protocol_error(
    data: st.DataObject, rng: random.Random
) -> None:
    wire = bytearray(encoded(sample_message()))
    position = data.draw(st.integers(0, len(wire) - 1))
    wire[position] ^= data.draw(st.integers(1, 255))
    with trio.fail_after(5):
        with contextlib.suppress(ProtocolError):
            await read_message(MemoryStream(bytes(wire), rng))


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_message(data)


@FUZZ
@given(st.binary(max_size=300), st.randoms(use_true_random=False))
async def test_random_bytes_on_a_stream_read_or_raise_protocol_error(
    data: bytes, rng: random.Random
) -> None:
    with trio.fail_after(5):
        with contextlib.suppress(ProtocolError):
            await read_message(MemoryStream(data, rng))


field_names = st.sampled_from(["v", "t", "id", "from", "body", "tensors", "x"])
tensor_entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["<f4", "|u1", "|b1", "<i8", "|O", "<U1"]) | msgpack_values,
        "shape": st.lists(st.integers(-2, 4) | msgpack_values, max_size=4) | msgpack_values,
        "nbytes": st.integers(-1, 40) | msgpack_values,
    },
)
# Mostly well-formed headers with a few fields replaced by anything, so that fuzzing reaches
# the checks that come after the first fields.
random_headers = st.fixed_dictionaries(
    {
        "v": st.just(WIRE_VERSION),
        "t": st.text(max_size=5),
        "id": st.integers(0, 9),
        "from": st.text(max_size=5),
        "body": st.dictionaries(st.text(max_size=3), msgpack_values, max_size=3),
        "tensors": st.lists(tensor_entries | msgpack_values, max_size=3),
    }
).flatmap(
    lambda fields: st.dictionaries(field_names, msgpack_values, max_size=2).map(fields.__or__)
)


@FUZZ
@given(random_headers | msgpack_values, st.binary(max_size=64))
def test_random_headers_decode_or_raise_protocol_error(fields: Any, payload: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_message(frame(fields, payload))


# --- reading and writing the stream ------------------------------------------------------


async def test_read_exactly_reports_how_many_bytes_arrived() -> None:
    with trio.fail_after(5), pytest.raises(ProtocolError, match="stream ended after 3 of 10"):
        await read_exactly(MemoryStream(b"abc"), 10)


async def test_read_exactly_returns_the_bytes_across_short_reads() -> None:
    data = bytes(range(256)) * 40
    stream = MemoryStream(data + b"rest", random.Random(1))
    with trio.fail_after(5):
        assert await read_exactly(stream, len(data)) == data
    assert len(stream.read_sizes) > 1


async def test_read_exactly_asks_for_at_most_one_mib_per_read() -> None:
    stream = MemoryStream(bytes(3 * MiB + 5))
    stream.rng = random.Random(2)
    with trio.fail_after(5):
        await read_exactly(stream, 3 * MiB + 5)
    assert max(stream.read_sizes) == MiB


async def test_read_exactly_refuses_a_stream_returning_more_than_asked() -> None:
    with trio.fail_after(5), pytest.raises(ProtocolError, match="when asked for 4"):
        await read_exactly(GreedyStream(), 4)


async def test_write_message_joins_small_parts_into_one_write() -> None:
    stream = MemoryStream()
    msg = sample_message()
    await write_message(stream, msg)
    assert stream.writes == [encoded(msg)]


async def test_write_message_cuts_large_tensors_into_writes_of_at_most_4_mib() -> None:
    big = np.arange(9 * MiB // 4, dtype=np.float32)
    msg = Message("weights", 1, "p", {}, (np.ones(3, np.int8), big, np.ones(2, np.int8)))
    stream = MemoryStream()
    await write_message(stream, msg)
    assert max(len(chunk) for chunk in stream.writes) <= 4 * MiB
    assert len(stream.writes) == 4  # header+small, two full pieces, the rest+small tensor
    assert b"".join(stream.writes) == encoded(msg)
