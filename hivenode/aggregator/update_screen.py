"""Screens a round's train replies before the strategy aggregates them.

A reply is rejected when any of its arrays is not finite (NaN or ±Inf), when it does not
match the model it was sent (other keys or shapes), or — with at least
`MIN_REPLIES_FOR_NORM` acceptable replies in the round — when its update norm
‖w_i − w_global‖ exceeds `factor` × the median norm of the round's acceptable replies.
Honest updates of one round have norms of one order of magnitude; a scaled or random one
stands out, and the median cannot be dragged by fewer than half of the replies.

An ArrayRecord of the reply named like one of the request (the built-in app's "arrays") is
a model: its update is the difference. One without a namesake in the request (SCAFFOLD's
"delta_y" and "delta_c") is an update already. The norm is taken over every array of every
record of the reply, in at least float32 and without overflowing on large values.

The functions are pure: the Grid calls `screen_train_replies` on a round's replies and turns
the rejected ones into Flower error replies.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import RecordDict

from hivenode.models.flower_arrays import ArrayFormatError, arrayrecord_to_numpy

NDArray = np.ndarray[Any, Any]
Arrays = Mapping[str, NDArray]
Records = Mapping[str, Arrays]
"""ArrayRecord name → array name → array: what a Flower reply's arrays are, as numpy."""

MIN_REPLIES_FOR_NORM = 3
"""With fewer acceptable replies a median says nothing: only the other checks apply."""


@dataclass(frozen=True)
class ScreenVerdict:
    """Which replies of a round (by index) the strategy gets, and why the others do not."""

    keep: tuple[int, ...]
    rejected: Mapping[int, str] = field(default_factory=dict)
    """Index → the reason, one line."""
    norms: tuple[float | None, ...] = ()
    """Each reply's update norm; None where the reply was rejected before its norm."""
    median_norm: float | None = None
    """The median over acceptable replies; None when there were too few to use one."""


class _Rejected(Exception):
    """A reply that fails a check regardless of the others; the message is the reason."""


def screen_updates(
    updates: Sequence[Records],
    references: Sequence[Records],
    factor: float,
) -> ScreenVerdict:
    """Screen `updates[i]`, the reply to a request holding `references[i]` (see the module).

    `factor` ≤ 0 turns the norm bound off (the per-reply checks stay). A median of 0 (every
    trainer took no step) bounds nothing either: it would reject every non-zero update.
    """
    if len(updates) != len(references):
        raise ValueError(f"{len(updates)} updates for {len(references)} references")
    norms: list[float | None] = []
    rejected: dict[int, str] = {}
    for index, (update, reference) in enumerate(zip(updates, references, strict=True)):
        try:
            norms.append(update_norm(update, reference))
        except _Rejected as exc:
            norms.append(None)
            rejected[index] = str(exc)
    valid = [norm for norm in norms if norm is not None]
    median = statistics.median(valid) if len(valid) >= MIN_REPLIES_FOR_NORM else None
    if median is not None and median > 0 and factor > 0:
        bound = factor * median
        for index, norm in enumerate(norms):
            if norm is not None and norm > bound:
                rejected[index] = (
                    f"update norm {norm:.4g} exceeds {factor:g} × the round's median {median:.4g}"
                )
    keep = tuple(index for index in range(len(updates)) if index not in rejected)
    return ScreenVerdict(keep, dict(sorted(rejected.items())), tuple(norms), median)


def screen_train_replies(
    requests: Sequence[RecordDict],
    replies: Sequence[RecordDict],
    factor: float,
) -> ScreenVerdict:
    """`screen_updates` on Flower contents: `replies[i]` answers `requests[i]`. A reply
    whose arrays cannot be read as numpy (not .npy, object dtype, wrong size) is rejected."""
    updates: list[Records] = []
    references: list[Records] = []
    unreadable: dict[int, str] = {}
    for index, (request, reply) in enumerate(zip(requests, replies, strict=True)):
        try:
            updates.append(_numpy_records(reply))
        except ArrayFormatError as exc:
            unreadable[index] = f"unreadable arrays: {exc}"
            continue
        references.append(_numpy_records(request))
    readable = [index for index in range(len(replies)) if index not in unreadable]
    verdict = screen_updates(updates, references, factor)
    # back to the caller's indexes
    rejected = {readable[i]: reason for i, reason in verdict.rejected.items()} | unreadable
    norms: list[float | None] = [None] * len(replies)
    for position, norm in zip(readable, verdict.norms, strict=True):
        norms[position] = norm
    keep = tuple(index for index in range(len(replies)) if index not in rejected)
    return ScreenVerdict(keep, dict(sorted(rejected.items())), tuple(norms), verdict.median_norm)


def update_norm(update: Records, reference: Records) -> float:
    """‖update − reference‖ over every array (see the module for records without a
    namesake); raises `_Rejected` for non-finite values, mismatched arrays or overflow."""
    norms: list[float] = []
    for record_name, arrays in update.items():
        base = reference.get(record_name)
        if base is not None and set(base) != set(arrays):
            raise _Rejected(
                f"ArrayRecord {record_name!r} has arrays {sorted(arrays)}, the model has "
                f"{sorted(base)}"
            )
        for key, array in arrays.items():
            where = f"{record_name}[{key!r}]"
            _check_finite(array, where)
            if base is None:
                norms.append(_array_norm(array, None, where))
                continue
            if array.shape != base[key].shape:
                raise _Rejected(
                    f"{where} has shape {array.shape}, the model's is {base[key].shape}"
                )
            norms.append(_array_norm(array, base[key], where))
    total = math.hypot(*norms)  # scaled internally: no overflow from the squares
    if not math.isfinite(total):
        raise _Rejected("the update norm overflows")
    return total


def _check_finite(array: NDArray, where: str) -> None:
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        raise _Rejected(f"{where} holds NaN or Inf")
    if array.dtype.kind not in "biufc":
        raise _Rejected(f"{where} is not numeric ({array.dtype})")


def _array_norm(array: NDArray, base: NDArray | None, where: str) -> float:
    if array.size == 0:
        return 0.0
    dtype = np.promote_types(
        np.result_type(array, base) if base is not None else array.dtype, np.float32
    )
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is a verdict, not a warning
        delta = np.asarray(array, dtype) if base is None else np.subtract(array, base, dtype=dtype)
        largest = float(np.max(np.abs(delta)))
    if not math.isfinite(largest):  # finite inputs whose difference overflows
        raise _Rejected(f"{where}: the update overflows {dtype}")
    if largest == 0.0:
        return 0.0
    # divided by the largest entry first, the squares cannot overflow
    return largest * float(np.linalg.norm((delta / largest).ravel()))


def _numpy_records(content: RecordDict) -> dict[str, dict[str, NDArray]]:
    return {name: arrayrecord_to_numpy(record) for name, record in content.array_records.items()}
