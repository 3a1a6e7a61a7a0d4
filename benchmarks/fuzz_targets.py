"""The fuzzer's targets: every decoder of bytes a peer (or a peer's model file) controls, with
the error types its module documents; anything else it raises is a crash.

Each target takes one `bytes` input, so every engine (hypothesis, atheris, the mutation
fuzzer) drives it the same way and a saved crash replays with `fuzz.py --replay`. hivenode
modules are imported inside the feed functions: atheris instruments only what is imported
after it starts, and a worker pays only for the parts its target reaches.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
from fuzz_corpus import (
    advert_corpus,
    flower_corpus,
    manifest_corpus,
    message_corpus,
    model_file_corpus,
    npy_corpus,
    order_corpus,
    qdelta_corpus,
    qtable_docs,
    signed_corpus,
)
from fuzz_model_targets import (
    feed_identify,
    feed_pickle,
    feed_protobuf,
    feed_safetensors,
    identify_masks,
    model_error,
)
from fuzz_strategies import Strategy, mutated, pickle_programs, pickled_values, protobuf
from fuzz_structured import (
    advert_inputs,
    flower_inputs,
    infer_inputs,
    manifest_inputs,
    message_inputs,
    model_file_inputs,
    npy_inputs,
    order_inputs,
    qdelta_inputs,
    qtable_file_inputs,
    signed_inputs,
    stream_inputs,
    tensor_json_inputs,
)
from hypothesis import strategies as st

Errors = tuple[type[BaseException], ...]


class OracleError(AssertionError):
    """The decoder accepted an input but broke an invariant (a round trip, a re-read)."""


@dataclass(frozen=True)
class Target:
    """One decoder: how to feed it, what it may raise, and what to feed it."""

    name: str
    exercises: str
    """The functions it reaches, for the report."""
    feed: Callable[[bytes], object]
    accepted: Callable[[], Errors]
    """The documented error types; imported lazily like the code under test."""
    structured: Callable[[], Strategy[bytes]]
    """Structure-aware inputs: valid encodings, one field altered, random nested msgpack."""
    corpus: Callable[[], list[bytes]]
    """Valid encodings: hypothesis mutates them, and they seed atheris and the mutator."""
    masks: Callable[[BaseException], bool] | None = None
    """True for an accepted error that wraps an unexpected one (a catch-all's message)."""

    def strategy(self) -> Strategy[bytes]:
        structured = self.structured()  # twice: most inputs should get past the first check
        return st.one_of(st.binary(max_size=512), mutated(self.corpus()), structured, structured)


# --- wire: envelope, stream framing, gossip records -------------------------------------------


def _protocol_error() -> Errors:
    from hivenode.protocol.errors import ProtocolError

    return (ProtocolError,)


def feed_message(data: bytes) -> None:
    from hivenode.protocol.message import decode_message, encode_message

    message = decode_message(data)
    try:  # what a node decoded it can send on (a relay, an echo): the round trip must hold
        again = decode_message(b"".join(bytes(part) for part in encode_message(message)))
    except Exception as exc:
        raise OracleError(f"a decoded message does not re-encode: {exc!r}") from exc
    same = (again.type, again.request_id, again.sender) == (
        message.type,
        message.request_id,
        message.sender,
    )
    if not same or _packb(again.body) != _packb(message.body):
        raise OracleError("a decoded message changed through encode/decode")
    if [(a.dtype, a.shape, a.tobytes()) for a in again.tensors] != [
        (a.dtype, a.shape, a.tobytes()) for a in message.tensors
    ]:
        raise OracleError("a decoded message's tensors changed through encode/decode")


def _packb(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


class ChunkedStream:
    """A ByteStream over `data` that hands out at most `chunk` bytes per read, as a peer's
    TCP segments would."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self._view = memoryview(data)
        self._chunk = chunk

    async def read(self, n: int) -> bytes:
        piece = bytes(self._view[: min(n, self._chunk)])
        self._view = self._view[len(piece) :]
        return piece

    async def write(self, data: bytes) -> None:
        raise AssertionError("the decoder wrote to its input stream")


STREAM_MESSAGES = 8
"""A session stream carries message after message; the fuzzer reads up to this many."""


def _stream_limits() -> Any:
    from hivenode.protocol.limits import Limits

    # DEFAULT_LIMITS would let one input make this process allocate 4 GiB (the payload
    # buffer is sized by the header before its bytes arrive; see docs): bounded here
    return Limits(max_header_bytes=256 * 1024, max_tensors=4096, max_total_bytes=64 * 1024**2)


def feed_stream(data: bytes) -> None:
    """First byte: the chunk size the stream delivers (1..256); the rest: what arrives."""
    import trio

    from hivenode.protocol.streams import read_message_or_end

    chunk = (data[0] if data else 0) + 1
    stream = ChunkedStream(data[1:], chunk)
    limits = _stream_limits()

    async def session() -> None:
        for _ in range(STREAM_MESSAGES):
            if await read_message_or_end(stream, limits) is None:
                return

    trio.run(session)


def feed_advert(data: bytes) -> None:
    from hivenode.agent.peer_table import PeerTable
    from hivenode.protocol.advert import Advert

    advert = Advert.from_wire(data)
    advert.same_content(advert)
    table = PeerTable("fuzzer")
    table.offer(advert, now=time.time())
    table.expire(now=time.time() + 1.0)


def feed_qdelta(data: bytes) -> None:
    from hivenode.planner.crdt import QDelta, SwarmTable

    delta = QDelta.from_wire(data)
    table = SwarmTable("fuzzer")
    table.apply(delta, delta.origin)  # no `now`: a snapshot's old deltas are merged too
    _, visits = table.merged()
    try:  # the node saves its table to qtable.json and reads it back after a restart
        again = SwarmTable.from_json(json.loads(json.dumps(table.to_json())))
    except Exception as exc:
        raise OracleError(f"a merged delta does not survive to_json/from_json: {exc!r}") from exc
    if not np.array_equal(again.merged()[1], visits):
        raise OracleError("a merged delta's visits changed through to_json/from_json")
    table.deltas(delta.origin, now=time.time())


def _qdelta_errors() -> Errors:
    return _protocol_error()


def feed_qtable_file(data: bytes) -> None:
    """qtable.json as `hivenode qtable import` and a restart read it (Python's json accepts
    NaN and Infinity, so they are in scope)."""
    from hivenode.planner.qtable import QTable

    try:
        doc = json.loads(data)
    except ValueError:
        return  # not JSON: json's business, not the table's
    QTable.from_json(doc)


def _planner_error() -> Errors:
    from hivenode.planner.state import PlannerError

    return (PlannerError,)


def feed_signed(data: bytes) -> None:
    """A signed pubsub message handed on by a third party (peer table, Q-table snapshot):
    `verify_signed` answers None for anything it cannot vouch for and never raises."""
    from hivenode.agent.gossip import peek_signed, verify_signed
    from hivenode.protocol.ids import ADVERTS_TOPIC, QTABLE_TOPIC

    for topic in (ADVERTS_TOPIC, QTABLE_TOPIC):
        peek_signed(data, topic)
        verify_signed(data, topic)


def _nothing() -> Errors:
    return ()


# --- Flower, parallel jobs, bulk offers, inference --------------------------------------------


def feed_flower(data: bytes) -> None:
    from hivenode.agent.flower_wire import decode_flower, encode_flower
    from hivenode.protocol.message import decode_message

    wire = decode_message(data)
    message = decode_flower(wire.body, wire.tensors)
    try:  # the trainer answers with a Message built from it, encoded the same way
        body, tensors = encode_flower(message)
        decode_flower(body, tensors)
    except Exception as exc:
        raise OracleError(f"a decoded Flower message does not re-encode: {exc!r}") from exc


def feed_flower_array(data: bytes) -> None:
    from flwr.app import Array

    from hivenode.models.flower_arrays import NUMPY_STYPE, array_to_numpy

    array = array_to_numpy(Array(dtype="", shape=(), stype=NUMPY_STYPE, data=data))
    if len(array.tobytes()) != array.nbytes:  # the view must really cover what it claims
        raise OracleError("array_to_numpy returned a view shorter than its shape")
    if array.dtype.kind not in "biufc":
        # ArrayFormatError's contract: "not a plain numeric .npy buffer" is refused
        raise OracleError(f"array_to_numpy accepted the non-numeric dtype {array.dtype}")


def _array_format_error() -> Errors:
    from hivenode.models.flower_arrays import ArrayFormatError

    return (ArrayFormatError,)


def feed_order(data: bytes) -> None:
    """A `parallel_start` body (msgpack, as the envelope carries it) and the parallel
    protocols' field checks on the same body."""
    from hivenode.parallel.wire import field, number, peer_list
    from hivenode.protocol.parallel_job import JobOrder

    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception:
        return  # the envelope decoder refuses it first (the message target covers that)
    if not isinstance(body, dict):
        return
    order = JobOrder.from_body(body)
    # compared as encodings: an option may be NaN, which never equals itself
    if _packb(JobOrder.from_body(order.to_body()).to_body()) != _packb(order.to_body()):
        raise OracleError("a job order changed through to_body/from_body")
    for check in (
        lambda: field(body, "job", str),
        lambda: number(body, "lr"),
        lambda: peer_list(body, "members"),
    ):
        try:
            check()
        except _protocol_error():
            pass


def feed_manifest(data: bytes) -> None:
    from hivenode.agent.bulk.receiver import DEFAULT_MAX_TOTAL_BYTES
    from hivenode.agent.bulk.wire import OFFER_LIMITS, Manifest
    from hivenode.protocol.limits import Limits

    limits = Limits(OFFER_LIMITS.max_header_bytes, 4096, DEFAULT_MAX_TOTAL_BYTES)  # the receiver's
    manifest = Manifest.from_wire(data, limits)
    for index in range(min(manifest.frame_count, 4)):
        manifest.frame_length(index)
    ends = manifest.tensor_ends
    if (ends[-1] if ends else 0) != manifest.total_bytes:
        raise OracleError("the tensors' ends do not add up to the manifest's total")
    if Manifest.from_wire(manifest.to_wire(), limits).to_wire() != manifest.to_wire():
        raise OracleError("a manifest changed through to_wire/from_wire")


def _bulk_error() -> Errors:
    from hivenode.agent.bulk.errors import BulkError

    return (BulkError,)


def feed_infer(data: bytes) -> None:
    """An inference request as a worker reads it, and the same body read as a worker's reply
    by the router (which documents no error: it takes whatever numbers it finds)."""
    from hivenode.inference.wire import INFER_LIMITS, InferReply, InferRequest
    from hivenode.protocol.message import decode_message

    message = decode_message(data, INFER_LIMITS)
    InferReply.from_body(message.body)  # first: an exception of its own must not be masked
    InferRequest.from_message(message)


def _inference_errors() -> Errors:
    from hivenode.inference.errors import InferenceError

    return (*_protocol_error(), InferenceError)


def feed_tensor_json(data: bytes) -> None:
    from hivenode.inference.tensor_json import tensor_from_json

    try:
        raw = json.loads(data)
    except ValueError:
        return
    tensor_from_json(raw)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "message",
            "protocol.message.decode_message + re-encode",
            feed_message,
            _protocol_error,
            message_inputs,
            message_corpus,
        ),
        Target(
            "stream",
            "protocol.streams.read_message_or_end (chunked session)",
            feed_stream,
            _protocol_error,
            stream_inputs,
            lambda: [b"\x07" + m for m in message_corpus()],
        ),
        Target(
            "advert",
            "protocol.records.Record.from_wire (Advert) + PeerTable.offer",
            feed_advert,
            _protocol_error,
            advert_inputs,
            advert_corpus,
        ),
        Target(
            "qdelta",
            "planner.crdt.QDelta.from_wire + SwarmTable.apply/to_json",
            feed_qdelta,
            _qdelta_errors,
            qdelta_inputs,
            qdelta_corpus,
        ),
        Target(
            "qtable_file",
            "planner.qtable.QTable.from_json (qtable.json, import)",
            feed_qtable_file,
            _planner_error,
            qtable_file_inputs,
            lambda: [json.dumps(d).encode() for d in qtable_docs()],
        ),
        Target(
            "signed_gossip",
            "agent.gossip.peek_signed/verify_signed",
            feed_signed,
            _nothing,
            signed_inputs,
            signed_corpus,
        ),
        Target(
            "flower",
            "agent.flower_wire.decode_flower (+ encode_flower round trip)",
            feed_flower,
            _protocol_error,
            flower_inputs,
            flower_corpus,
        ),
        Target(
            "flower_array",
            "models.flower_arrays.array_to_numpy",
            feed_flower_array,
            _array_format_error,
            npy_inputs,
            npy_corpus,
        ),
        Target(
            "job_order",
            "protocol.parallel_job.JobOrder.from_body + parallel.wire",
            feed_order,
            _protocol_error,
            order_inputs,
            order_corpus,
        ),
        Target(
            "bulk_manifest",
            "agent.bulk.wire.Manifest.from_wire",
            feed_manifest,
            _bulk_error,
            manifest_inputs,
            manifest_corpus,
        ),
        Target(
            "infer",
            "inference.wire.InferRequest.from_message, InferReply.from_body",
            feed_infer,
            _inference_errors,
            infer_inputs,
            lambda: message_corpus(infer=True),
        ),
        Target(
            "tensor_json",
            "inference.tensor_json.tensor_from_json",
            feed_tensor_json,
            _inference_errors,
            tensor_json_inputs,
            lambda: [b'{"dtype": "float32", "shape": [2], "b64": "AACAPwAAAEA="}', b"[[1, 2]]"],
        ),
        Target(
            "pickle_scan",
            "models.pickle_scan.scan_stream (joblib arrays) + walk",
            feed_pickle,
            model_error,
            lambda: st.one_of(pickle_programs(), pickled_values()),
            lambda: model_file_corpus("pickle"),
        ),
        Target(
            "protobuf",
            "models.identify_onnx/_savedmodel parsers, models.protowire",
            feed_protobuf,
            model_error,
            protobuf,
            lambda: model_file_corpus("protobuf"),
        ),
        Target(
            "safetensors",
            "models.identify_safetensors.read_header/identify_safetensors",
            feed_safetensors,
            model_error,
            lambda: model_file_inputs("safetensors"),
            lambda: model_file_corpus("safetensors"),
        ),
        Target(
            "identify",
            "models.identify.identify on files of every kind",
            feed_identify,
            model_error,
            lambda: model_file_inputs("any"),
            lambda: model_file_corpus("any"),
            masks=identify_masks,
        ),
    )
}
