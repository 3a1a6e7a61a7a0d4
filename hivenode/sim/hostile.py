"""Hostile trainers for the simulator: ClientApp wrappers that turn honest updates into attacks.

A wrapped app trains honestly, then replaces the update in its reply; keys, shapes and
dtypes stay as they were, so the reply passes every format check and only its values lie.
For a record named like one of the request (the built-in app's "arrays": a model) the
update is w_i − w_global; a record without a namesake (SCAFFOLD's "delta_y", "delta_c") is
the update itself. Integer and boolean arrays are left alone. Evaluate replies and error
replies pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict

from hivenode.models.flower_arrays import arrayrecord_to_numpy, numpy_to_array

NDArray = np.ndarray[Any, Any]
ClientAppLike = Callable[[Message, Context], Message]

SCALE_FACTOR = 100.0
"""The `scale` attack multiplies the honest update by this."""
RANDOM_STD = 1.0
"""The `random` attack draws every float entry from N(0, RANDOM_STD²)."""


class Attack(Enum):
    """What a hostile trainer sends instead of its honest update Δ = w_i − w_global."""

    SIGN_FLIP = "sign-flip"
    """w_global − Δ: pushes the model back the way it came."""
    SCALE = "scale"
    """w_global + 100·Δ: one trainer outweighs all the others."""
    NAN = "nan"
    """every float entry NaN."""
    INF = "inf"
    """every float entry +Inf."""
    RANDOM = "random"
    """every float entry drawn from N(0, 1), unrelated to the model."""

    @classmethod
    def parse(cls, text: str) -> Attack:
        try:
            return cls(text.strip().lower())
        except ValueError:
            known = ", ".join(attack.value for attack in cls)
            raise ValueError(f"unknown attack {text!r}: use one of {known}") from None


def hostile_app(app: ClientAppLike, attack: Attack, seed: int = 0) -> ClientAppLike:
    """`app`, whose train replies carry `attack` instead of the honest update. The random
    draws depend on `seed`, the round and the trainer's partition id: reruns repeat them."""

    def run(message: Message, context: Context) -> Message:
        reply = app(message, context)
        if message.metadata.message_type != MessageType.TRAIN or reply.has_error():
            return reply
        config = message.content.config_records.get("config")
        server_round = config.get("server-round", 0) if config is not None else 0
        partition = context.node_config.get("partition-id", 0)
        rng = np.random.default_rng([seed, _natural(server_round), _natural(partition)])
        return Message(
            attacked_content(message.content, reply.content, attack, rng), reply_to=message
        )

    return run


def attacked_content(
    request: RecordDict, reply: RecordDict, attack: Attack, rng: np.random.Generator
) -> RecordDict:
    """`reply` with every ArrayRecord attacked (see the module); the other records kept."""
    attacked = RecordDict()
    for name, record in reply.items():
        if not isinstance(record, ArrayRecord):
            attacked[name] = record
            continue
        base = request.array_records.get(name)
        reference = arrayrecord_to_numpy(base) if base is not None else None
        arrays = arrayrecord_to_numpy(record)
        attacked[name] = ArrayRecord(
            {
                key: numpy_to_array(
                    attacked_array(value, reference.get(key) if reference else None, attack, rng)
                )
                for key, value in arrays.items()
            }
        )
    return attacked


def attacked_array(
    value: NDArray, reference: NDArray | None, attack: Attack, rng: np.random.Generator
) -> NDArray:
    """One array of a reply under `attack`; `reference` is the global model's array, or None
    when `value` is an update already. Same shape and dtype; non-float arrays unchanged."""
    if value.dtype.kind != "f":
        return np.array(value, copy=True)
    base = (
        np.zeros_like(value, dtype=np.float64)
        if reference is None or reference.shape != value.shape
        else reference.astype(np.float64)
    )
    update = value.astype(np.float64) - base
    result: NDArray
    with np.errstate(over="ignore", invalid="ignore"):  # overflowing is the point of some
        match attack:
            case Attack.SIGN_FLIP:
                result = base - update
            case Attack.SCALE:
                result = base + SCALE_FACTOR * update
            case Attack.NAN:
                result = np.full(value.shape, np.nan)
            case Attack.INF:
                result = np.full(value.shape, np.inf)
            case Attack.RANDOM:
                result = RANDOM_STD * rng.standard_normal(tuple(value.shape))
        return result.astype(value.dtype)


MIXED = "mixed"
"""Not an attack of its own: the hostile trainers take the attacks in turn."""


def hostile_trainers(count: int, fraction: float, attack: str) -> dict[int, Attack]:
    """Trainer index → its attack, for `fraction` of `count` trainers: the last
    round(count × fraction), so the same trainers turn for every strategy of a comparison.
    `attack` names one `Attack`, or `mixed` for each of them in turn."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"the attackers' fraction must be in [0, 1], not {fraction}")
    try:
        kinds = list(Attack) if attack.strip().lower() == MIXED else [Attack.parse(attack)]
    except ValueError:
        known = ", ".join([*(kind.value for kind in Attack), MIXED])
        raise ValueError(f"unknown attack {attack!r}: use one of {known}") from None
    hostile = round(count * fraction)
    first = count - hostile
    return {index: kinds[(index - first) % len(kinds)] for index in range(first, count)}


def _natural(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
