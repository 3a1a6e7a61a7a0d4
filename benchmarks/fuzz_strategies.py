"""Input generators for the fuzzer: random msgpack structures, valid encodings with bytes
mutated, valid documents with one field altered, and the shapes of model files (pickle opcode
programs, zip archives, protobuf fields).

Every strategy ends in bytes, so the same input can be replayed, minimised and saved whatever
engine found it. `mutate` is shared by the hypothesis strategies and the mutation engine.
"""

from __future__ import annotations

import copy
import io
import json
import math
import pickle
import random
import struct
import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import msgpack
from hypothesis import strategies as st

Strategy = st.SearchStrategy

INTERESTING_INTS = (
    0,
    1,
    -1,
    2,
    127,
    128,
    255,
    256,
    2**15,
    2**16 - 1,
    2**16,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**53 + 1,
    2**62,
    2**63 - 1,
    2**63,
    2**64 - 1,
    -(2**31),
    -(2**63),
)
"""Boundaries where length fields, int64 products and float conversions go wrong."""
INTERESTING_FLOATS = (0.0, -0.0, 0.5, 1e308, -1e308, math.inf, -math.inf, math.nan, 5e-324)


def ints() -> Strategy[int]:
    return st.one_of(st.sampled_from(INTERESTING_INTS), st.integers(-(2**63), 2**64 - 1))


def floats() -> Strategy[float]:
    return st.one_of(st.sampled_from(INTERESTING_FLOATS), st.floats())


def scalars(names: Sequence[str] = ()) -> Strategy[Any]:
    texts = st.text(max_size=16)
    if names:
        texts = st.one_of(st.sampled_from(list(names)), texts)
    return st.one_of(
        st.none(),
        st.booleans(),
        ints(),
        floats(),
        texts,
        st.binary(max_size=40),
        st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12)),
    )


def keys(names: Sequence[str] = ()) -> Strategy[Any]:
    """Mostly the field names a decoder looks for, so random maps reach past its first check."""
    text = st.text(max_size=10)
    named = st.one_of(st.sampled_from(list(names)), text) if names else text
    # strict_map_key refuses other key types: a few of them check that path too
    return st.one_of(named, named, named, st.integers(-5, 5), st.binary(max_size=4))


def values(names: Sequence[str] = (), max_leaves: int = 24) -> Strategy[Any]:
    """Random nested msgpack-able structures."""
    return st.recursive(
        scalars(names),
        lambda children: st.one_of(
            st.lists(children, max_size=6),
            st.dictionaries(keys(names), children, max_size=6),
        ),
        max_leaves=max_leaves,
    )


def _clamped(value: Any, json_keys: bool = False) -> Any:
    """`value` with what its encoder refuses made encodable: ints beyond 64 bits clamped,
    and (for JSON) keys turned into text."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return min(max(value, -(2**63)), 2**64 - 1)
    if isinstance(value, dict):
        return {
            (
                repr(k)
                if json_keys and not isinstance(k, str | int | float | bool)
                else _clamped(k)
            ): _clamped(v, json_keys)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_clamped(v, json_keys) for v in value]
    return value


def pack(value: Any) -> bytes:
    """msgpack as a peer would send it; a generated int too big for msgpack is clamped."""
    try:
        data: bytes = msgpack.packb(value, use_bin_type=True)
    except (OverflowError, ValueError):
        data = msgpack.packb(_clamped(value), use_bin_type=True)
    return data


def dump_json(value: Any) -> bytes:
    """JSON as Python writes it (NaN and Infinity included: json.loads reads them back)."""
    return json.dumps(_clamped(value, json_keys=True), default=repr).encode()


def packed(names: Sequence[str] = ()) -> Strategy[bytes]:
    """msgpack of random nested structures whose map keys are mostly `names`."""
    return values(names).map(pack)


# --- valid documents with one field altered -------------------------------------------------


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield (*prefix, index)
            yield from _paths(value, (*prefix, index))


def _alter(doc: Any, path: tuple[Any, ...], action: str, value: Any) -> Any:
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if action == "delete":
        del parent[last]
    else:
        parent[last] = value
    return doc


def altered(docs: Strategy[Any], names: Sequence[str] = ()) -> Strategy[Any]:
    """A valid document with one field (at any depth) replaced by a random value, deleted,
    or with an unknown field added: what a buggy or hostile peer sends."""

    @st.composite
    def build(draw: Callable[..., Any]) -> Any:
        doc = copy.deepcopy(draw(docs))
        paths = list(_paths(doc))
        if not paths or draw(st.integers(0, 9)) == 0:
            if isinstance(doc, dict):
                doc[draw(st.text(max_size=8))] = draw(values(names, max_leaves=4))
            return doc
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(("replace", "replace", "replace", "delete")))
        return _alter(doc, path, action, draw(values(names, max_leaves=6)))

    return build()


# --- byte mutations -------------------------------------------------------------------------

MUTATIONS = ("flip", "byte", "insert", "delete", "duplicate", "truncate", "u32be", "u64le")


def mutate(seed: bytes, ops: Sequence[tuple[str, int, int, bytes]]) -> bytes:
    """Apply `ops` (name, position, length, bytes) to `seed`; positions wrap around."""
    data = bytearray(seed)
    for name, position, length, blob in ops:
        size = len(data)
        at = position % (size + 1)
        if name == "flip" and size:
            data[at % size] ^= blob[0] or 1
        elif name == "byte" and size:
            data[at % size] = (0x00, 0xFF, 0x7F, 0x80, 0xC1, 0x01)[blob[0] % 6]
        elif name == "insert":
            data[at:at] = blob * (1 + length % 4)
        elif name == "delete":
            del data[at : at + 1 + length % 64]
        elif name == "duplicate":
            data[at:at] = data[at : at + 1 + length % 64]
        elif name == "truncate":
            del data[at:]
        elif name in ("u32be", "u64le"):
            number = INTERESTING_INTS[length % len(INTERESTING_INTS)]
            layout, modulus = (">I", 2**32) if name == "u32be" else ("<Q", 2**64)
            data[at : at + struct.calcsize(layout)] = struct.pack(layout, number % modulus)
    return bytes(data)


def random_ops(rng: random.Random, count: int) -> list[tuple[str, int, int, bytes]]:
    """Mutations drawn from `rng`, for the engine that has no hypothesis behind it."""
    return [
        (rng.choice(MUTATIONS), rng.randrange(1 << 16), rng.randrange(1 << 16), rng.randbytes(4))
        for _ in range(count)
    ]


def mutated(seeds: Sequence[bytes]) -> Strategy[bytes]:
    """Valid encodings with one to six mutations applied."""
    op = st.tuples(
        st.sampled_from(MUTATIONS),
        st.integers(0, 1 << 16),
        st.integers(0, 1 << 16),
        st.binary(min_size=1, max_size=8),
    )
    return st.builds(mutate, st.sampled_from(list(seeds)), st.lists(op, min_size=1, max_size=6))


# --- model file shapes ----------------------------------------------------------------------


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative numbers are ten-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire_type: int, value: int | bytes) -> bytes:
    key = varint(number << 3 | wire_type)
    if isinstance(value, bytes):
        return key + varint(len(value)) + value
    if wire_type == 1:
        return key + struct.pack("<Q", value % 2**64)
    if wire_type == 5:
        return key + struct.pack("<I", value % 2**32)
    return key + varint(value)


def protobuf(max_number: int = 30) -> Strategy[bytes]:
    """Nested protobuf messages of random fields (the shapes ONNX and SavedModel files have)."""
    numbers = st.integers(1, max_number)
    leaf = st.one_of(
        st.builds(_field, numbers, st.just(0), ints()),
        st.builds(_field, numbers, st.sampled_from((1, 5)), ints()),
        st.builds(_field, numbers, st.just(2), st.binary(max_size=24)),
        st.builds(_field, numbers, st.just(2), st.sampled_from((b"Conv", b"Gemm", b"ai.onnx"))),
    )
    return st.recursive(
        st.lists(leaf, max_size=6).map(b"".join),
        lambda inner: st.lists(
            st.one_of(leaf, st.builds(_field, numbers, st.just(2), inner)), max_size=6
        ).map(b"".join),
        max_leaves=40,
    )


PICKLE_GLOBALS = (
    "collections\nOrderedDict\n",
    "torch._utils\n_rebuild_tensor_v2\n",
    "torch\nFloatStorage\n",
    "numpy.core.multiarray\n_reconstruct\n",
    "numpy\ndtype\n",
    "joblib.numpy_pickle\nNumpyArrayWrapper\n",
    "builtins\nset\n",
    "_codecs\nencode\n",
    "sklearn.linear_model._logistic\nLogisticRegression\n",
    "os\nsystem\n",
)


def _pickle_op(kind: str, number: int, text: str) -> bytes:
    """One opcode of a pickle program, with an argument the scanner will parse."""
    small = number % 256
    table: dict[str, bytes] = {
        "MARK": b"(",
        "STOP": b".",
        "POP": b"0",
        "DUP": b"2",
        "NONE": b"N",
        "EMPTY_DICT": b"}",
        "EMPTY_LIST": b"]",
        "EMPTY_TUPLE": b")",
        "TUPLE": b"t",
        "TUPLE1": b"\x85",
        "TUPLE2": b"\x86",
        "TUPLE3": b"\x87",
        "LIST": b"l",
        "DICT": b"d",
        "APPEND": b"a",
        "APPENDS": b"e",
        "SETITEM": b"s",
        "SETITEMS": b"u",
        "REDUCE": b"R",
        "BUILD": b"b",
        "NEWOBJ": b"\x81",
        "NEWOBJ_EX": b"\x92",
        "STACK_GLOBAL": b"\x93",
        "MEMOIZE": b"\x94",
        "BINPERSID": b"Q",
        "EMPTY_SET": b"\x8f",
        "ADDITEMS": b"\x90",
        "FROZENSET": b"\x91",
        "OBJ": b"o",
        "POP_MARK": b"1",
        "NEXT_BUFFER": b"\x97",
        "BININT1": b"K" + bytes([small]),
        "BININT": b"J" + struct.pack("<i", number % 2**31),
        "BINPUT": b"q" + bytes([small]),
        "BINGET": b"h" + bytes([small % 8]),
        "PROTO": b"\x80" + bytes([small % 6]),
        "FRAME": b"\x95" + struct.pack("<Q", number),
        "GLOBAL": b"c" + PICKLE_GLOBALS[number % len(PICKLE_GLOBALS)].encode(),
        "UNICODE": b"\x8c" + bytes([len(text.encode()[:255])]) + text.encode()[:255],
        "BINBYTES": b"C" + bytes([small % 16]) + bytes(small % 16),
        "BINFLOAT": b"G" + struct.pack(">d", INTERESTING_FLOATS[number % 9]),
        "LONG1": b"\x8a" + bytes([small % 9]) + bytes(small % 9),
        "EXT1": b"\x82" + bytes([small]),
        "STRING": b"S'" + text.encode("ascii", "replace")[:20] + b"'\n",
        "INST": b"i" + PICKLE_GLOBALS[number % len(PICKLE_GLOBALS)].encode(),
    }
    return table[kind]


_PICKLE_KINDS = (
    "MARK",
    "STOP",
    "POP",
    "DUP",
    "NONE",
    "EMPTY_DICT",
    "EMPTY_LIST",
    "EMPTY_TUPLE",
    "TUPLE",
    "TUPLE1",
    "TUPLE2",
    "TUPLE3",
    "LIST",
    "DICT",
    "APPEND",
    "APPENDS",
    "SETITEM",
    "SETITEMS",
    "REDUCE",
    "BUILD",
    "NEWOBJ",
    "NEWOBJ_EX",
    "STACK_GLOBAL",
    "MEMOIZE",
    "BINPERSID",
    "EMPTY_SET",
    "ADDITEMS",
    "FROZENSET",
    "OBJ",
    "POP_MARK",
    "NEXT_BUFFER",
    "BININT1",
    "BININT",
    "BINPUT",
    "BINGET",
    "PROTO",
    "FRAME",
    "GLOBAL",
    "UNICODE",
    "BINBYTES",
    "BINFLOAT",
    "LONG1",
    "EXT1",
    "STRING",
    "INST",
)


def pickle_programs() -> Strategy[bytes]:
    """Opcode sequences: stack machines the scanner must follow (or refuse) without crashing."""
    op = st.builds(
        _pickle_op, st.sampled_from(_PICKLE_KINDS), st.integers(0, 2**20), st.text(max_size=12)
    )
    body = st.lists(op, max_size=40).map(b"".join)
    return st.builds(
        lambda head, program, tail: head + program + tail,
        st.sampled_from((b"\x80\x02", b"\x80\x04", b"\x80\x05", b"")),
        body,
        st.sampled_from((b".", b".", b"", b"\x00" * 8)),
    )


def pickled_values() -> Strategy[bytes]:
    """Real pickles of plain data, every protocol: the valid end of the input space."""
    plain = st.recursive(
        st.one_of(
            st.none(), st.booleans(), ints(), floats(), st.text(max_size=8), st.binary(max_size=8)
        ),
        lambda c: st.one_of(
            st.lists(c, max_size=4),
            st.dictionaries(st.text(max_size=4), c, max_size=4),
            st.lists(c, max_size=3).map(tuple),
        ),
        max_leaves=12,
    )
    return st.builds(
        lambda value, protocol: pickle.dumps(value, protocol), plain, st.integers(0, 5)
    )


ZIP_NAMES = (
    "archive/data.pkl",
    "archive/version",
    "archive/data/0",
    "archive/constants.pkl",
    "archive/code/__torch__.py",
    "config.json",
    "metadata.json",
    "model.weights.h5",
    "schema.json",
    "data.pkl",
    "a/b/data.pkl",
)


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members:
            try:
                archive.writestr(name, content)
            except (IndexError, ValueError):  # a name zipfile itself cannot store ("/", ".")
                continue
    return buffer.getvalue()


def json_values() -> Strategy[bytes]:
    return values(("class_name", "config", "layers", "__class__", "__module__", "content")).map(
        dump_json
    )


def zips(contents: Strategy[bytes]) -> Strategy[bytes]:
    """Zip archives with the member names torch, Keras and skops files have."""
    name = st.one_of(st.sampled_from(ZIP_NAMES), st.text(min_size=1, max_size=12))
    member = st.tuples(name, contents)
    return st.lists(member, max_size=5, unique_by=lambda m: m[0]).map(_zip)
