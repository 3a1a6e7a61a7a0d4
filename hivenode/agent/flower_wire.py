"""Flower `Message`s as hivenode stream messages: metadata and records in the msgpack body,
every array as a raw tensor frame.

Flower's own wire (protobuf with .npy bytes per array) would copy each tensor twice more;
here the sender writes views over the arrays' memory and the receiver wraps the received
buffers. Metric and config values keep their types through msgpack (int, float, bool, str,
bytes and lists of them), as Flower's records require.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)

from hivenode.models.flower_arrays import ArrayFormatError, array_to_numpy, numpy_to_array
from hivenode.protocol.errors import ProtocolError

NDArray = np.ndarray[Any, Any]

_META_FIELDS: tuple[tuple[str, type | tuple[type, ...]], ...] = (
    ("run_id", int),
    ("message_id", str),
    ("src_node_id", int),
    ("dst_node_id", int),
    ("reply_to_message_id", str),
    ("group_id", str),
    ("created_at", (int, float)),
    ("ttl", (int, float)),
    ("message_type", str),
)
_KINDS = ("arrays", "metrics", "config")


def encode_flower(message: Message) -> tuple[dict[str, Any], list[NDArray]]:
    """The body and tensors that carry `message`; arrays are views, not copies."""
    meta = {name: getattr(message.metadata, name) for name, _ in _META_FIELDS}
    if message.has_error():
        error = message.error
        return {"meta": meta, "error": [error.code, error.reason or ""]}, []
    records, tensors = encode_records(message.content)
    return {"meta": meta, "records": records}, tensors


def encode_records(content: RecordDict) -> tuple[list[list[Any]], list[NDArray]]:
    """A RecordDict as [name, kind, value] entries plus its arrays, in order."""
    tensors: list[NDArray] = []
    records: list[list[Any]] = []
    for name, array_record in content.array_records.items():
        keys = []
        for key, array in array_record.items():
            keys.append(key)
            tensors.append(_to_numpy(array))
        records.append([name, "arrays", keys])
    for name, metric_record in content.metric_records.items():
        records.append([name, "metrics", dict(metric_record)])
    for name, config_record in content.config_records.items():
        records.append([name, "config", dict(config_record)])
    return records, tensors


def decode_flower(body: Mapping[str, Any], tensors: Sequence[NDArray]) -> Message:
    """The Flower Message in a body and its tensors; ProtocolError when malformed."""
    metadata = _metadata(body.get("meta"))
    if "error" in body:
        code, reason = _error(body["error"])
        return _with_metadata(metadata, error=Error(code, reason))
    return _with_metadata(metadata, content=decode_records(body.get("records"), tensors))


def decode_records(raw_records: Any, tensors: Sequence[NDArray]) -> RecordDict:
    """The RecordDict that `encode_records` made; ProtocolError when malformed."""
    if not isinstance(raw_records, list):
        raise ProtocolError("a Flower message needs a list of records")
    content = RecordDict()
    used = 0
    for raw in raw_records:
        if not (isinstance(raw, list) and len(raw) == 3 and isinstance(raw[0], str)):
            raise ProtocolError("each record must be [name, kind, value]")
        name, kind, value = raw
        if name in content:
            raise ProtocolError(f"record {name!r} appears twice")
        if kind == "arrays":
            record, used = _array_record(value, tensors, used)
            content[name] = record
        elif kind in _KINDS:
            content[name] = _scalar_record(kind, value, name)
        else:
            raise ProtocolError(f"record {name!r} has unknown kind {kind!r}")
    if used != len(tensors):
        raise ProtocolError(f"{len(tensors)} tensors sent but the records name {used}")
    return content


def _with_metadata(metadata: Metadata, **content_or_error: Any) -> Message:
    # the received metadata is kept as sent; Flower's typed overloads leave this form out
    build: Any = Message
    message: Message = build(metadata=metadata, **content_or_error)
    return message


def _to_numpy(array: Any) -> NDArray:
    try:
        return array_to_numpy(array)
    except ArrayFormatError as exc:  # e.g. a torch-serialised Array: convert once
        try:
            return np.asarray(array.numpy())
        except Exception:
            raise exc from None


def _metadata(raw: Any) -> Metadata:
    if not isinstance(raw, dict):
        raise ProtocolError("a Flower message needs its metadata")
    values: dict[str, Any] = {}
    for name, kind in _META_FIELDS:
        value: Any = raw.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ProtocolError(f"Flower metadata field {name!r} is missing or mistyped")
        values[name] = value
    # msgpack may bring a whole-number float back as an int; Flower's fields are floats
    try:
        return Metadata(**values | {k: float(values[k]) for k in ("created_at", "ttl")})
    except (ValueError, TypeError) as exc:  # Flower's own checks (message_type, ...)
        raise ProtocolError(f"Flower metadata refused: {exc}") from exc


def _error(raw: Any) -> tuple[int, str]:
    if not (isinstance(raw, list) and len(raw) == 2):
        raise ProtocolError("a Flower error must be [code, reason]")
    code, reason = raw
    if not isinstance(code, int) or not isinstance(reason, str):
        raise ProtocolError("a Flower error must be [int, str]")
    return code, reason


def _array_record(keys: Any, tensors: Sequence[NDArray], used: int) -> tuple[ArrayRecord, int]:
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ProtocolError("an array record must list its keys")
    if len(set(keys)) != len(keys):
        raise ProtocolError("an array record names a key twice")
    if used + len(keys) > len(tensors):
        raise ProtocolError("the records name more tensors than were sent")
    record = ArrayRecord()
    for offset, key in enumerate(keys):
        record[key] = numpy_to_array(tensors[used + offset])
    return record, used + len(keys)


def _scalar_record(kind: str, value: Any, name: str) -> MetricRecord | ConfigRecord:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ProtocolError(f"record {name!r} must be a map with string keys")
    try:
        return MetricRecord(value) if kind == "metrics" else ConfigRecord(value)
    except (TypeError, ValueError) as exc:  # Flower checks the value types itself
        raise ProtocolError(f"record {name!r}: {exc}") from exc


def node_id_of(peer_id: str) -> int:
    """The Flower node id of a peer: 63 bits of its id's hash, never 0 (Flower's "unset")."""
    digest = hashlib.sha256(peer_id.encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 1) or 1
