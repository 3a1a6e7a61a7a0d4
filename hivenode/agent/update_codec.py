"""Compressed federated updates: trainers send a train reply's arrays as a compressed update,
the aggregator rebuilds the float arrays before the update screen or the strategy reads them.

The job's `compression` reaches trainers in the train message's ConfigRecord "config" under
"compression"; evaluate messages, error replies, metrics and configs are never touched.

- `none`: nothing changes.
- `fp16`: the update in float16 (2 bytes a value).
- `int8`: the update in blockwise 8-bit (`hivenode.protocol.compression`, ~1 byte a value).
- `topk:F`: of each array's update, the fraction F of largest magnitude, as int32 indices and
  float32 values (8·F bytes a value), with error feedback: the trainer keeps what it did not
  send in the job's `Context.state` (saved with it, so it survives a restart) and adds it to
  its next update, so every coordinate's change arrives eventually (Stich et al. 2018,
  "Sparsified SGD with memory"). `topk:F:no-feedback` drops it instead.

What is compressed is the update, never the weights: one round's change is small and centred
on zero, so quantising it loses far less than quantising the weights would, and keeping the
largest changes is meaningful where keeping the largest weights is not. A reply ArrayRecord
named like one of the request (the built-in app's "arrays", a model) is sent as its difference
from that record; one without a namesake (SCAFFOLD's "delta_y", "delta_c") is an update
already and is sent as it is, shaped like a request record with the same keys, shapes and
dtypes (the update screen's convention). Non-float arrays (a step counter) travel exactly, as
parts of their own; a record that matches no request record travels uncompressed.

On the wire the compressed records are replaced by ArrayRecord `PARTS` (keys "0", "1", ... in
order) and ConfigRecord `MANIFEST` (the scheme, the record names, the request record each is
shaped like). The aggregator takes every key, shape and dtype from what it sent itself, never
from the trainer; a reply that does not fit raises ProtocolError, which the Grid turns into an
error reply for that trainer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, TypeGuard

import numpy as np
import trio
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from hivenode.models.flower_arrays import ArrayFormatError, array_to_numpy, numpy_to_array
from hivenode.protocol.compression import (
    Compression,
    CompressionError,
    UpdateCompression,
    Vector,
    decode,
    decode_topk,
    encode,
    encode_topk,
    topk_count,
)
from hivenode.protocol.errors import ProtocolError

log = logging.getLogger(__name__)

NDArray = np.ndarray[Any, Any]

TRAIN_CONFIG = "config"
"""The train message's ConfigRecord that names the scheme (the built-in app's contract)."""
CONFIG_KEY = "compression"
MANIFEST = "hivenode.update"
PARTS = "hivenode.update-parts"
RESIDUAL_PREFIX = "hivenode.residual."
"""Context.state ArrayRecord `RESIDUAL_PREFIX + record`: top-k's unsent update, per key."""


# --- the trainer's side ---------------------------------------------------------------------


async def encode_update_off_loop(request: Message, reply: Message, state: RecordDict) -> Message:
    """`encode_update` in a worker thread (it is CPU work), or `reply` itself at no cost when
    the request asks for no compression."""
    if reply.has_error() or _trainer_scheme(request) is None:
        return reply
    encoded: Message = await trio.to_thread.run_sync(encode_update, request, reply, state)
    return encoded


def encode_update(request: Message, reply: Message, state: RecordDict) -> Message:
    """The train `reply` with its arrays compressed as `request` asks; top-k's residual is
    read from and written to `state` (the job's Context.state). Anything the scheme does not
    apply to is returned as it is."""
    scheme = _trainer_scheme(request)
    if scheme is None or reply.has_error():
        return reply
    content = reply.content
    if MANIFEST in content or PARTS in content:
        log.warning("the app's reply already uses %s or %s: sent uncompressed", MANIFEST, PARTS)
        return reply
    references = _numpy_records(request.content)
    parts: dict[str, NDArray] = {}
    names: list[str] = []
    likes: list[str] = []
    for name, record in content.array_records.items():
        arrays = _numpy_or_none(record)
        like = _shaped_like(name, arrays, references) if arrays is not None else None
        if arrays is None or like is None:
            continue
        reference = references[name] if like == name else None
        for value in _encode_record(name, arrays, reference, scheme, state):
            parts[str(len(parts))] = value
        names.append(name)
        likes.append(like)
    if not names:
        return reply
    rebuilt = RecordDict({k: v for k, v in content.items() if k not in names})
    rebuilt[PARTS] = ArrayRecord({key: numpy_to_array(value) for key, value in parts.items()})
    rebuilt[MANIFEST] = ConfigRecord({"scheme": str(scheme), "records": names, "like": likes})
    reply.content = rebuilt
    return reply


def _trainer_scheme(request: Message) -> UpdateCompression | None:
    """The scheme a train request asks for; None for none or a scheme this node does not
    know (a newer aggregator's): an uncompressed reply is always accepted."""
    text = _requested_text(request)
    if text is None:
        return None
    try:
        scheme = UpdateCompression.parse(text)
    except CompressionError as exc:
        log.warning("sending the update uncompressed: %s", exc)
        return None
    return None if scheme.kind == "none" else scheme


def _encode_record(
    name: str,
    arrays: Mapping[str, NDArray],
    reference: Mapping[str, NDArray] | None,
    scheme: UpdateCompression,
    state: RecordDict,
) -> list[NDArray]:
    residuals = _residuals(state, name, arrays) if scheme.keeps_residual else {}
    if not scheme.keeps_residual and RESIDUAL_PREFIX + name in state:
        del state[RESIDUAL_PREFIX + name]  # the job changed scheme: a stale residual is noise
    parts: list[NDArray] = []
    kept: dict[str, NDArray] = {}
    for key, local in arrays.items():
        if not _is_float(local):  # e.g. a step counter: exact, as it is
            parts.append(local)
            continue
        update = _difference(local, reference[key]) if reference is not None else _flat(local)
        if key in residuals:
            update += residuals[key]
        encoded = _encode(update, scheme)
        parts.extend(encoded)
        if scheme.keeps_residual:
            kept[key] = (update - _decode(encoded, scheme, update.size)).reshape(local.shape)
    if scheme.keeps_residual:
        if all(np.isfinite(r).all() for r in kept.values()):
            state[RESIDUAL_PREFIX + name] = ArrayRecord(
                {key: numpy_to_array(value) for key, value in kept.items()}
            )
        else:  # a diverged round must not poison every later one through the residual
            log.warning("dropping the non-finite top-k residual of %r", name)
            state.pop(RESIDUAL_PREFIX + name, None)
    return parts


def _residuals(state: RecordDict, name: str, arrays: Mapping[str, NDArray]) -> dict[str, Vector]:
    """The residual kept for record `name`, as flat float32 copies; empty when none is kept
    or it was made for another model (other keys or shapes)."""
    record = state.array_records.get(RESIDUAL_PREFIX + name)
    kept = _numpy_or_none(record) if record is not None else None
    if kept is None:
        return {}
    floats = {key: value for key, value in arrays.items() if _is_float(value)}
    if list(kept) != list(floats) or any(kept[k].shape != v.shape for k, v in floats.items()):
        log.warning("discarding the top-k residual of %r: it was kept for another model", name)
        return {}
    return {key: value.astype(np.float32).reshape(-1) for key, value in kept.items()}


def _difference(local: NDArray, reference: NDArray) -> Vector:
    """local − reference as a flat float32 vector (float64 weights subtract in float64)."""
    wide = np.result_type(local.dtype, np.float32)
    out: Vector = np.subtract(local, reference, dtype=wide).astype(np.float32).reshape(-1)
    return out


def _flat(values: NDArray) -> Vector:
    out: Vector = values.astype(np.float32).reshape(-1)  # a copy: the residual is added in place
    return out


def _encode(update: Vector, scheme: UpdateCompression) -> tuple[NDArray, ...]:
    if scheme.kind == "topk":
        return encode_topk(update, topk_count(update.size, scheme.fraction))
    return encode(update, Compression(scheme.kind))


# --- the aggregator's side ------------------------------------------------------------------


async def decode_update_off_loop(request: Message, reply: Message) -> Message:
    """`decode_update` in a worker thread (it is CPU work), or `reply` itself at no cost when
    it is not compressed."""
    if reply.has_error() or (MANIFEST not in reply.content and PARTS not in reply.content):
        return reply
    decoded: Message = await trio.to_thread.run_sync(decode_update, request, reply)
    return decoded


def decode_update(request: Message, reply: Message) -> Message:
    """The reply to `request` with its compressed records rebuilt as the trainer's arrays
    (the request's arrays plus the decoded update); ProtocolError when it does not fit what
    was sent. An uncompressed reply is returned as it is."""
    if reply.has_error():
        return reply
    content = reply.content
    if MANIFEST not in content and PARTS not in content:
        return reply
    scheme = _aggregator_scheme(request)
    manifest = content.config_records.get(MANIFEST)
    part_record = content.array_records.get(PARTS)
    if manifest is None or part_record is None:
        raise ProtocolError(
            f"a compressed update needs ConfigRecord {MANIFEST!r} and ArrayRecord {PARTS!r}"
        )
    names, likes = _manifest(manifest, scheme)
    parts = _parts(part_record)
    references = _numpy_records(request.content)
    rebuilt: dict[str, ArrayRecord] = {}
    used = 0
    for name, like in zip(names, likes, strict=True):
        if name in content or name in rebuilt:
            raise ProtocolError(f"compressed record {name!r} is also sent or named twice")
        if like not in references or (name in references and like != name):
            raise ProtocolError(f"compressed record {name!r} is not shaped like a sent record")
        rebuilt[name], used = _decode_record(
            name, references[like], name == like, scheme, parts, used
        )
    if used != len(parts):
        raise ProtocolError(f"a compressed update has {len(parts)} parts, its records use {used}")
    rest = {k: v for k, v in content.items() if k not in (MANIFEST, PARTS)}
    reply.content = RecordDict({**rebuilt, **rest})
    return reply


def _aggregator_scheme(request: Message) -> UpdateCompression:
    text = _requested_text(request)
    try:
        scheme = UpdateCompression.parse(text) if text is not None else UpdateCompression()
    except CompressionError as exc:  # only ProtocolError may leave: the Grid answers it
        raise ProtocolError(str(exc)) from exc
    if scheme.kind == "none":
        raise ProtocolError("the update is compressed but the job asked for none")
    return scheme


def _manifest(manifest: ConfigRecord, scheme: UpdateCompression) -> tuple[list[str], list[str]]:
    claimed = manifest.get("scheme")
    if claimed != str(scheme):
        raise ProtocolError(f"the update is compressed with {claimed!r}, the job asked {scheme}")
    names, likes = manifest.get("records"), manifest.get("like")
    if not (_strings(names) and _strings(likes) and len(names) == len(likes) and names):
        raise ProtocolError("a compressed update's manifest must list records and their shapes")
    return names, likes


def _strings(value: Any) -> TypeGuard[list[str]]:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _parts(record: ArrayRecord) -> list[NDArray]:
    if list(record) != [str(i) for i in range(len(record))]:
        raise ProtocolError(f"ArrayRecord {PARTS!r} must be keyed 0, 1, ... in order")
    try:
        return [array_to_numpy(value) for value in record.values()]
    except ArrayFormatError as exc:
        raise ProtocolError(f"a compressed update's part: {exc}") from exc


def _decode_record(
    name: str,
    reference: Mapping[str, NDArray],
    is_difference: bool,
    scheme: UpdateCompression,
    parts: list[NDArray],
    used: int,
) -> tuple[ArrayRecord, int]:
    record = ArrayRecord()
    for key, sent in reference.items():
        count = scheme.parts_per_array if _is_float(sent) else 1
        if used + count > len(parts):
            raise ProtocolError(f"a compressed update has too few parts for {name}[{key!r}]")
        tensors = tuple(parts[used : used + count])
        used += count
        if not _is_float(sent):
            if tensors[0].dtype != sent.dtype or tensors[0].shape != sent.shape:
                raise ProtocolError(f"{name}[{key!r}] must be {sent.dtype} {sent.shape}")
            record[key] = numpy_to_array(np.ascontiguousarray(tensors[0]))
            continue
        try:
            update = _decode(tensors, scheme, sent.size).reshape(sent.shape)
        except ProtocolError as exc:
            raise ProtocolError(f"compressed {name}[{key!r}]: {exc.reason}") from exc
        value = sent + update.astype(sent.dtype) if is_difference else update.astype(sent.dtype)
        record[key] = numpy_to_array(np.ascontiguousarray(value))
    return record, used


def _decode(tensors: tuple[NDArray, ...], scheme: UpdateCompression, size: int) -> Vector:
    if scheme.kind == "topk":
        return decode_topk(tensors, size, topk_count(size, scheme.fraction))
    decoded = decode(tensors, Compression(scheme.kind), size)
    # a NaN or negative block scale would turn a whole block into garbage: not an update
    if scheme.kind == "int8" and not (
        np.isfinite(tensors[1]).all() and (tensors[1][:, 1] >= 0).all()
    ):
        raise ProtocolError("8-bit block scales must be finite with a non-negative step")
    return decoded


# --- both sides -----------------------------------------------------------------------------


def _requested_text(request: Message) -> str | None:
    """The scheme text of a train request's config, None when it names none."""
    if request.metadata.message_type != MessageType.TRAIN or not request.has_content():
        return None
    config = request.content.config_records.get(TRAIN_CONFIG)
    text = config.get(CONFIG_KEY) if config is not None else None
    return text if isinstance(text, str) else None


def _numpy_records(content: RecordDict) -> dict[str, dict[str, NDArray]]:
    """Every readable ArrayRecord of `content` as numpy views, by name."""
    found: dict[str, dict[str, NDArray]] = {}
    for name, record in content.array_records.items():
        arrays = _numpy_or_none(record)
        if arrays is not None:
            found[name] = arrays
    return found


def _numpy_or_none(record: ArrayRecord) -> dict[str, NDArray] | None:
    try:
        return {key: array_to_numpy(value) for key, value in record.items()}
    except ArrayFormatError:  # e.g. torch-serialised: the wire converts it, uncompressed
        return None


def _shaped_like(
    name: str, arrays: Mapping[str, NDArray], references: Mapping[str, Mapping[str, NDArray]]
) -> str | None:
    """The request record a reply record is compressed against: its namesake (a model: sent
    as the difference) or, without one, the first with the same layout (an update already)."""
    if name in references:
        return name if _same_layout(arrays, references[name]) else None
    return next((other for other, ref in references.items() if _same_layout(arrays, ref)), None)


def _same_layout(arrays: Mapping[str, NDArray], reference: Mapping[str, NDArray]) -> bool:
    """Same keys in the same order, same shapes and dtypes, some of them floats: then the
    aggregator rebuilds exactly what the trainer would have sent."""
    return (
        list(arrays) == list(reference)
        and any(_is_float(value) for value in arrays.values())
        and all(
            value.shape == reference[key].shape and value.dtype == reference[key].dtype
            for key, value in arrays.items()
        )
    )


def _is_float(array: NDArray) -> bool:
    """Floats are compressed; any other array (a counter, a mask) travels exactly."""
    return bool(np.issubdtype(array.dtype, np.floating))
