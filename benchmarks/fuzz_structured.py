"""Structure-aware inputs per target: valid documents with one field altered, random nested
msgpack with the decoder's own field names, and envelopes around them, all ending in bytes."""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from typing import Any

import fuzz_corpus as corpus
from fuzz_strategies import (
    Strategy,
    altered,
    dump_json,
    floats,
    ints,
    json_values,
    pack,
    packed,
    pickle_programs,
    pickled_values,
    protobuf,
    values,
    zips,
)
from hypothesis import strategies as st

ENVELOPE_FIELDS = ("v", "t", "id", "from", "body", "tensors", "dtype", "shape", "nbytes")
DTYPES = (
    ",8",  # numpy parses comma strings as record dtypes, and some raise SyntaxError
    "<f4",
    "<f8",
    "<f2",
    "|b1",
    "|i1",
    "<i2",
    "<i4",
    "<i8",
    "|u1",
    "<u8",
    ">f4",
    "<c8",
    "|O",
    "<U4",
    "|V8",
    "f4",
    "",
)


def _framed(header: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(header)) + header + payload


def _tensor_specs() -> Strategy[list[Any]]:
    """Mostly none or well-formed specs (so the body gets decoded), else anything."""
    valid = st.lists(
        st.builds(
            lambda dtype, dims: {"dtype": dtype, "shape": dims, "nbytes": _nbytes(dtype, dims)},
            st.sampled_from(DTYPES[1:11]),  # the allowed ones
            st.lists(st.integers(0, 4), max_size=3),
        ),
        max_size=3,
    )
    return st.one_of(st.just([]), valid, _random_specs())


def _random_specs() -> Strategy[list[Any]]:
    shape = st.lists(st.one_of(st.integers(0, 6), ints()), max_size=4)
    spec = st.builds(
        lambda dtype, dims, exact, nbytes: {
            "dtype": dtype,
            "shape": dims,
            "nbytes": _nbytes(dtype, dims) if exact else nbytes,
        },
        st.sampled_from(DTYPES),
        shape,
        st.booleans(),
        ints(),
    )
    return st.lists(spec, max_size=4)


def _nbytes(dtype: str, dims: list[int]) -> int:
    size = {"1": 1, "2": 2, "4": 4, "8": 8}.get(dtype[-1:], 1)
    for dim in dims:
        size *= dim
    return size


def envelope(
    body: Strategy[Any], methods: tuple[str, ...] = ("status", "fl", "ok")
) -> Strategy[bytes]:
    """Whole messages: a header (valid or altered) and a payload of the declared length,
    or a few bytes more or less."""

    def build(header: dict[str, Any], slack: int, fill: bytes) -> bytes:
        declared = 0
        specs = header.get("tensors") if isinstance(header, dict) else None
        for spec in specs if isinstance(specs, list) else []:
            if isinstance(spec, dict) and isinstance(spec.get("nbytes"), int):
                declared += max(spec["nbytes"], 0)
        length = max(0, min(declared, 4096) + slack)
        return _framed(pack(header), (fill * (length // max(len(fill), 1) + 1))[:length])

    headers = st.fixed_dictionaries(
        {
            "v": st.just(1),  # valid at first; `altered` below breaks one field at a time
            "t": st.one_of(st.sampled_from(methods), st.text(max_size=8)),
            "id": st.integers(0, 2**63 - 1),
            "from": st.just(corpus.PEER_A),
            "body": body,
            "tensors": _tensor_specs(),
        }
    )
    return st.builds(
        build,
        st.one_of(headers, altered(headers, ENVELOPE_FIELDS)),
        st.sampled_from((0, 0, 0, -1, 1, 7)),
        st.binary(min_size=1, max_size=8),
    )


def message_inputs() -> Strategy[bytes]:
    body = values(("job", "model", "adverts", "signed"), max_leaves=12).filter(
        lambda v: isinstance(v, dict)
    ) | st.dictionaries(st.text(max_size=6), values(max_leaves=8), max_size=4)
    raw_header = packed(ENVELOPE_FIELDS).map(lambda h: _framed(h, b""))
    return st.one_of(envelope(body), raw_header)


def stream_inputs() -> Strategy[bytes]:
    """A chunk size, then one to three messages back to back, maybe cut short."""
    return st.builds(
        lambda chunk, messages, cut: bytes([chunk]) + b"".join(messages)[: cut or None],
        st.integers(0, 255),
        st.lists(
            st.one_of(message_inputs(), st.sampled_from(corpus.message_corpus())),
            min_size=1,
            max_size=3,
        ),
        st.one_of(st.just(0), st.integers(-64, 64)),
    )


ADVERT_FIELDS = (
    "origin",
    "seq",
    "timestamp",
    "ttl",
    "roles",
    "addrs",
    "hardware",
    "load",
    "datasets",
    "models",
    "apps",
    "cpu",
    "memory",
    "gpus",
    "frameworks",
)


def advert_inputs() -> Strategy[bytes]:
    docs = st.sampled_from(corpus.advert_docs())
    return st.one_of(altered(docs, ADVERT_FIELDS).map(pack), packed(ADVERT_FIELDS))


QDELTA_FIELDS = ("origin", "seq", "timestamp", "ttl", "entries")


def _entry() -> Strategy[list[Any]]:
    small = st.integers(-1, 12)
    return st.builds(
        lambda key, visits, mean, seq: [*key, visits, mean, seq],
        st.lists(small, min_size=5, max_size=5),
        st.one_of(st.integers(1, 100), ints()),
        st.one_of(st.floats(-2, 2), floats()),
        st.one_of(st.integers(0, 2**41), ints()),
    )


def qdelta_inputs() -> Strategy[bytes]:
    doc = st.fixed_dictionaries(
        {
            "origin": st.sampled_from((corpus.PEER_A, "")),
            "seq": st.one_of(st.just(2**41), ints()),
            "timestamp": st.one_of(st.just(1.7e9), floats()),
            "ttl": st.one_of(st.just(3600.0), floats()),
            "entries": st.lists(_entry(), max_size=6),
        }
    )
    docs = st.one_of(st.sampled_from(corpus.qdelta_docs()), doc)
    return st.one_of(altered(docs, QDELTA_FIELDS).map(pack), doc.map(pack))


def qtable_file_inputs() -> Strategy[bytes]:
    names = (
        "format",
        "version",
        "shape",
        "hyper",
        "swarm",
        "origins",
        "cells",
        "clock",
        "evidence",
        "own_origin",
        "epsilon",
    )
    valid = corpus.qtable_docs()[0]
    number = st.one_of(st.integers(0, 5), ints(), floats())
    cells = st.lists(st.lists(number, min_size=8, max_size=8), max_size=4)
    origin = st.fixed_dictionaries({"clock": number, "cells": cells, "evidence": st.just([])})
    swarm = st.fixed_dictionaries(
        {
            "own_origin": st.text(max_size=4),
            "origins": st.dictionaries(st.text(max_size=4), origin, max_size=2),
        }
    )
    built = st.builds(lambda sw, eps: valid | {"swarm": sw, "epsilon": eps}, swarm, number)
    # json.dumps writes NaN and Infinity, which json.loads (and so a table file) accepts
    return st.one_of(altered(st.just(valid), names), built).map(dump_json)


def signed_inputs() -> Strategy[bytes]:
    from libp2p.pubsub.pb import rpc_pb2

    from hivenode.protocol.ids import ADVERTS_TOPIC

    def build(
        from_id: bytes, data: bytes, topics: list[str], signature: bytes, key: bytes
    ) -> bytes:
        message = rpc_pb2.Message(
            from_id=from_id, data=data, topicIDs=topics, signature=signature, key=key
        )
        return bytes(message.SerializeToString())

    real = [rpc_pb2.Message.FromString(m) for m in corpus.signed_corpus()]
    return st.builds(
        build,
        st.one_of(st.sampled_from([m.from_id for m in real]), st.binary(max_size=40)),
        st.binary(max_size=64),
        st.lists(st.one_of(st.just(ADVERTS_TOPIC), st.text(max_size=8)), max_size=2),
        st.one_of(st.sampled_from([m.signature for m in real]), st.binary(max_size=70)),
        st.one_of(st.sampled_from([m.key for m in real]), st.binary(max_size=40)),
    )


FLOWER_FIELDS = (
    "meta",
    "records",
    "error",
    "run_id",
    "message_id",
    "src_node_id",
    "dst_node_id",
    "reply_to_message_id",
    "group_id",
    "created_at",
    "ttl",
    "message_type",
    "arrays",
    "metrics",
    "config",
)


def flower_inputs() -> Strategy[bytes]:
    from hivenode.protocol.message import Message

    bodies = corpus.flower_bodies()

    def build(index: int, body: dict[str, Any], drop: int) -> bytes:
        tensors = tuple(bodies[index][1])
        tensors = tensors[: len(tensors) - drop] if drop else tensors
        return corpus.wire_bytes(Message("fl", 1, corpus.PEER_A, body, tensors))

    return st.one_of(
        st.builds(
            build, st.just(0), altered(st.just(bodies[0][0]), FLOWER_FIELDS), st.integers(0, 1)
        ),
        st.builds(build, st.just(1), altered(st.just(bodies[1][0]), FLOWER_FIELDS), st.just(0)),
        envelope(
            st.fixed_dictionaries({"meta": values(FLOWER_FIELDS), "records": values(FLOWER_FIELDS)})
        ),
    )


def npy_inputs() -> Strategy[bytes]:
    """.npy buffers: magic, version, a header dict (valid or not) and some data."""
    descr = st.one_of(
        st.sampled_from(DTYPES), st.text(max_size=12), st.just("[('a', '<i4'), ('b', 'O')]")
    )
    shape = st.one_of(
        st.lists(st.integers(0, 5), max_size=3).map(tuple), st.lists(ints(), max_size=3).map(tuple)
    )
    header = st.one_of(
        st.builds(
            lambda d, f, s: repr({"descr": d, "fortran_order": f, "shape": s}),
            descr,
            st.booleans(),
            shape,
        ),
        st.text(max_size=40),
        st.just("{'descr': '<f4', 'fortran_order': False, 'shape': (" + "(" * 300 + ")"),
    )

    def build(major: int, text: str, length_delta: int, data: bytes) -> bytes:
        raw = text.encode("latin-1", "replace")
        raw += b" " * ((-len(raw) - 11) % 64) + b"\n"
        size = max(0, len(raw) + length_delta)
        prefix = struct.pack("<H", size % 2**16) if major == 1 else struct.pack("<I", size)
        return b"\x93NUMPY" + bytes([major, 0]) + prefix + raw + data

    return st.builds(
        build,
        st.sampled_from((1, 2, 3, 0, 4)),
        header,
        st.sampled_from((0, 0, 0, -1, 1, 1000)),
        st.binary(max_size=48),
    )


ORDER_FIELDS = (
    "job",
    "mode",
    "members",
    "rank",
    "dataset",
    "model",
    "options",
    "feature_shape",
    "num_classes",
    "seed",
    "steps",
    "batch_size",
    "lr",
    "momentum",
    "micro_batches",
    "peer_timeout",
    "compression",
)


def order_inputs() -> Strategy[bytes]:
    docs = st.sampled_from(corpus.order_bodies())
    return st.one_of(altered(docs, ORDER_FIELDS).map(pack), packed(ORDER_FIELDS))


MANIFEST_FIELDS = (
    "tensors",
    "total_bytes",
    "sha256",
    "meta",
    "frame_bytes",
    "dtype",
    "shape",
    "nbytes",
)


def manifest_inputs() -> Strategy[bytes]:
    docs = st.sampled_from(corpus.manifest_docs())
    built = st.fixed_dictionaries(
        {
            "tensors": _tensor_specs(),
            "total_bytes": st.one_of(st.integers(0, 4096), ints()),
            "sha256": st.sampled_from(("0" * 64, "A" * 64, "0" * 63, "")),
            "meta": values(max_leaves=4),
            "frame_bytes": st.one_of(st.sampled_from((65536, 2**20, 2**24)), ints()),
        }
    )
    return st.one_of(altered(docs, MANIFEST_FIELDS).map(pack), built.map(pack))


INFER_FIELDS = ("model", "timeout_ms", "queue", "compute_ms", "batch")


def infer_inputs() -> Strategy[bytes]:
    # a request and a reply share the body here: the worker reads one, the router the other
    body = st.fixed_dictionaries(
        {
            "model": st.one_of(st.sampled_from(("mlp", "mlp@2", "")), values(max_leaves=2)),
            "timeout_ms": st.one_of(ints(), floats(), st.booleans(), st.none()),
            "queue": st.one_of(ints(), floats()),
            "compute_ms": st.one_of(ints(), floats()),
            "batch": st.one_of(ints(), floats()),
        }
    )
    return envelope(altered(body, INFER_FIELDS), methods=("infer", "ok", "deploy"))


def tensor_json_inputs() -> Strategy[bytes]:
    doc = st.fixed_dictionaries(
        {
            "dtype": st.one_of(
                st.sampled_from(
                    (
                        "float32",
                        "int64",
                        "bool",
                        "uint8",
                        "object",
                        "(2,)i4",
                        ",8",
                        "U3",
                        "V8",
                        "<f4",
                        ">f8",
                    )
                ),
                st.text(max_size=8),
            ),
            "shape": st.lists(st.one_of(st.integers(-2, 5), ints()), max_size=3),
            "b64": st.sampled_from(("", "AACAPwAAAEA=", "AAAA", "!!", "AA==")),
        }
    )
    nested = st.recursive(
        st.one_of(ints(), floats(), st.booleans(), st.text(max_size=2)),
        lambda c: st.lists(c, max_size=4),
        max_leaves=16,
    )
    return st.one_of(altered(doc, ("dtype", "shape", "b64")).map(dump_json), nested.map(dump_json))


def _safetensors(header: Any, data_size: int, length_delta: int) -> bytes:
    raw = dump_json(header)
    return struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + bytes(data_size)


def safetensors_inputs() -> Strategy[bytes]:
    entry = st.fixed_dictionaries(
        {
            "dtype": st.one_of(
                st.sampled_from(("F32", "F16", "BF16", "I64", "BOOL", "F8_E4M3")),
                st.text(max_size=4),
            ),
            "shape": st.lists(st.one_of(st.integers(0, 4), ints()), max_size=3),
            "data_offsets": st.lists(st.one_of(st.integers(0, 64), ints()), min_size=0, max_size=3),
        }
    )
    header = st.dictionaries(
        st.one_of(st.sampled_from(("fc.weight", "fc.bias", "__metadata__")), st.text(max_size=6)),
        st.one_of(entry, values(max_leaves=4)),
        max_size=4,
    )
    return st.builds(
        _safetensors, header, st.integers(0, 64), st.sampled_from((0, 0, -1, 1, 10**6))
    )


def _compressed(kind: int, data: bytes) -> bytes:
    return (zlib.compress, gzip.compress, bz2.compress, lzma.compress)[kind % 4](data)


def model_file_inputs(kind: str) -> Strategy[bytes]:
    """Files of every kind identify() recognises, valid-shaped or not; for "any" prefixed
    with the byte that picks the file's suffix."""
    if kind == "safetensors":
        return safetensors_inputs()
    pickles = st.one_of(pickle_programs(), pickled_values())
    contents = st.one_of(pickles, json_values(), st.binary(max_size=64))
    files = st.one_of(
        zips(contents),
        pickles,
        safetensors_inputs(),
        protobuf(),
        st.builds(_compressed, st.integers(0, 3), pickles),
        st.binary(max_size=64).map(lambda b: b"\x89HDF\r\n\x1a\n" + b),
    )
    return st.builds(lambda suffix, data: bytes([suffix]) + data, st.integers(0, 8), files)
