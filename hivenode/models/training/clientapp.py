"""The built-in Flower ClientApp: trains and evaluates a job's model on the node's own data.

Message contract (the aggregator side is written against it):

- train: ArrayRecord "arrays" (the global model x), ConfigRecord "config" with
  "server-round", "dataset", the `ModelSpec` keys, "lr", "local-epochs", "batch-size" and
  optionally "proximal-mu" (0), "seed" (0), "straggler-fraction" (0), "deadline-s" (none:
  seconds of local training allowed from receipt). SCAFFOLD adds ArrayRecord "control" (c).
  The reply holds ArrayRecord "arrays" (SCAFFOLD: "delta_y" and "delta_c" instead) and
  MetricRecord "metrics": "num-examples", "train-loss", "epochs-completed", "examples-seen",
  "local-steps", "partial".
- evaluate: ArrayRecord "arrays", ConfigRecord "config"; the reply's MetricRecord "metrics"
  holds "num-examples", "eval-loss", "eval-accuracy", "global-train-loss".

Only model code the node already has runs: the spec picks an adapter with `backend_for`.
Errors raise; Flower's ClientApp turns them into error replies carrying their message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from hivenode.models.flower_arrays import ArrayFormatError, arrayrecord_to_numpy, numpy_to_array
from hivenode.models.training.backend import (
    LocalData,
    ModelSpec,
    NDArray,
    ScaffoldState,
    TrainingError,
    TrainOutcome,
    TrainSettings,
    backend_for,
)
from hivenode.models.training.scaffold_client import control_update

logger = logging.getLogger(__name__)

LoadData = Callable[[str], LocalData]

CLIENT_CONTROL_KEY = "scaffold-client-control"  # c_i, in context.state between rounds
# Spawn key of the batch-shuffling stream, apart from the straggler draw's stream.
_SHUFFLE_STREAM = 1


def build_client_app(load_data: LoadData) -> ClientApp:
    """The ClientApp; `load_data(dataset)` returns the node's local data (caching is its job)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        # The deadline counts from receipt, before the data is loaded.
        received_at = time.monotonic()
        return Message(train_reply(msg.content, context, load_data, received_at), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(evaluate_reply(msg.content, load_data), reply_to=msg)

    return app


def train_reply(
    content: RecordDict, context: Context, load_data: LoadData, received_at: float
) -> RecordDict:
    """The reply content to a train message (plain, FedProx or SCAFFOLD)."""
    config = _config(content)
    spec = ModelSpec.from_config(config)
    backend = backend_for(spec.framework)
    x = _arrays(content, "arrays")
    data = load_data(_string(config, "dataset"))
    settings = train_settings(config, _partition_id(context), received_at)
    controls = _controls(content, x, context.state) if "control" in content.array_records else None
    outcome = backend.train(spec, x, data, settings, controls.state(x) if controls else None)
    logger.info(
        "round %d: trained %s/%s for %d epochs, %d steps on %d examples, loss %.4g",
        _integer(config, "server-round"),
        spec.framework,
        spec.name,
        outcome.epochs_completed,
        outcome.local_steps,
        outcome.examples_seen,
        outcome.train_loss,
    )
    metrics = _train_metrics(outcome, data, settings)
    if controls is None:
        return RecordDict({"arrays": _array_record(outcome.arrays), "metrics": metrics})
    deltas = _scaffold_deltas(controls, x, outcome, settings.lr, context.state)
    return RecordDict({**deltas, "metrics": metrics})


def evaluate_reply(content: RecordDict, load_data: LoadData) -> RecordDict:
    """The reply content to an evaluate message: the received model on the local test set,
    and its loss on the local train set."""
    config = _config(content)
    spec = ModelSpec.from_config(config)
    backend = backend_for(spec.framework)
    x = _arrays(content, "arrays")
    data = load_data(_string(config, "dataset"))
    test = backend.evaluate(spec, x, data.x_test, data.y_test)
    train = backend.evaluate(spec, x, data.x_train, data.y_train)
    metrics = MetricRecord(
        {
            "num-examples": test.num_examples,
            "eval-loss": test.loss,
            "eval-accuracy": test.accuracy,
            "global-train-loss": train.loss,
        }
    )
    return RecordDict({"metrics": metrics})


def train_settings(config: ConfigRecord, partition_id: int, received_at: float) -> TrainSettings:
    """This trainer's settings for the round the config describes."""
    server_round = _integer(config, "server-round")
    seed = _integer(config, "seed", 0)
    local_epochs = _integer(config, "local-epochs")
    deadline_s = _number(config, "deadline-s") if "deadline-s" in config else None
    return TrainSettings(
        lr=_number(config, "lr"),
        local_epochs=local_epochs,
        batch_size=_integer(config, "batch-size"),
        proximal_mu=_number(config, "proximal-mu", 0.0),
        seed=shuffle_seed(seed, server_round, partition_id),
        max_epochs=straggler_epochs(
            _number(config, "straggler-fraction", 0.0),
            seed,
            server_round,
            partition_id,
            local_epochs,
        ),
        deadline=None if deadline_s is None else received_at + deadline_s,
    )


def straggler_epochs(
    fraction: float, seed: int, server_round: int, partition_id: int, local_epochs: int
) -> int | None:
    """The simulator's systems heterogeneity: with probability `fraction` this trainer is a
    straggler this round and stops after a uniform 1..E−1 epochs; None when it is not."""
    if fraction <= 0:
        return None
    rng = np.random.default_rng(_entropy(seed, server_round, partition_id))
    if rng.random() < fraction and local_epochs > 1:
        return int(rng.integers(1, local_epochs))
    return None


def shuffle_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The batch-shuffling seed: different for every round and trainer, the same on replay
    (Python's `hash` is salted per process, so it is not used)."""
    sequence = np.random.SeedSequence(
        _entropy(seed, server_round, partition_id), spawn_key=(_SHUFFLE_STREAM,)
    )
    return int(sequence.generate_state(1)[0])


@dataclass(frozen=True)
class _Controls:
    """SCAFFOLD's c (from the message) and c_i (from the context state), float64, by key."""

    control: dict[str, NDArray]
    client_control: dict[str, NDArray]

    def state(self, x: Mapping[str, NDArray]) -> ScaffoldState:
        """Both in the model's key order and dtypes, as the adapters take them."""
        return ScaffoldState(
            control=[self.control[key].astype(x[key].dtype) for key in x],
            client_control=[self.client_control[key].astype(x[key].dtype) for key in x],
        )


def _controls(content: RecordDict, x: Mapping[str, NDArray], state: RecordDict) -> _Controls:
    control = _arrays(content, "control")
    _check_like(control, x, "ArrayRecord 'control'")
    return _Controls(
        control={key: control[key].astype(np.float64) for key in x},
        client_control=_client_control(state, x),
    )


def _scaffold_deltas(
    controls: _Controls,
    x: Mapping[str, NDArray],
    outcome: TrainOutcome,
    lr: float,
    state: RecordDict,
) -> dict[str, ArrayRecord]:
    """Option II: c_i⁺ = c_i − c + (x − y_i)/(K_i·η_l), kept in `state`; the reply's
    Δy = y_i − x and Δc = c_i⁺ − c_i, in the model's dtypes."""
    keys = list(x)
    if outcome.local_steps == 0:
        # No step taken (the deadline had passed): no update, and c_i⁺ is undefined (÷ K_i).
        zeros = _array_record({key: np.zeros_like(x[key]) for key in keys})
        return {"delta_y": zeros, "delta_c": zeros}
    new_control = control_update(
        [controls.client_control[key] for key in keys],
        [controls.control[key] for key in keys],
        [x[key].astype(np.float64) for key in keys],
        [outcome.arrays[key].astype(np.float64) for key in keys],
        outcome.local_steps,
        lr,
    )
    state[CLIENT_CONTROL_KEY] = _array_record(dict(zip(keys, new_control, strict=True)))
    delta_y = {key: outcome.arrays[key] - x[key] for key in keys}
    delta_c = {
        key: (new - controls.client_control[key]).astype(x[key].dtype)
        for key, new in zip(keys, new_control, strict=True)
    }
    return {"delta_y": _array_record(delta_y), "delta_c": _array_record(delta_c)}


def _client_control(state: RecordDict, x: Mapping[str, NDArray]) -> dict[str, NDArray]:
    """c_i (float64) from the context state; zeros in the first round, or when the stored one
    was made for another model (a stale c_i would corrupt every later update)."""
    record = state.array_records.get(CLIENT_CONTROL_KEY)
    if record is not None:
        stored = _numpy(record, f"state {CLIENT_CONTROL_KEY!r}")
        try:
            _check_like(stored, x, "stored c_i")
            return {key: stored[key].astype(np.float64) for key in x}
        except TrainingError as exc:
            logger.warning("discarding SCAFFOLD c_i kept for another model: %s", exc)
    return {key: np.zeros(value.shape, np.float64) for key, value in x.items()}


def _train_metrics(outcome: TrainOutcome, data: LocalData, settings: TrainSettings) -> MetricRecord:
    return MetricRecord(
        {
            # FedAvg's weight is the local train set, whatever part of it this round saw
            "num-examples": len(data.y_train),
            "train-loss": outcome.train_loss,
            "epochs-completed": outcome.epochs_completed,
            "examples-seen": outcome.examples_seen,
            "local-steps": outcome.local_steps,
            "partial": int(outcome.epochs_completed < settings.local_epochs),
        }
    )


def _config(content: RecordDict) -> ConfigRecord:
    config = content.config_records.get("config")
    if config is None:
        raise TrainingError("the message has no ConfigRecord 'config'")
    return config


def _arrays(content: RecordDict, key: str) -> dict[str, NDArray]:
    record = content.array_records.get(key)
    if record is None:
        raise TrainingError(f"the message has no ArrayRecord {key!r}")
    return _numpy(record, f"ArrayRecord {key!r}")


def _numpy(record: ArrayRecord, what: str) -> dict[str, NDArray]:
    try:
        return arrayrecord_to_numpy(record)
    except ArrayFormatError as exc:
        raise TrainingError(f"{what}: {exc}") from exc


def _array_record(arrays: Mapping[str, NDArray]) -> ArrayRecord:
    return ArrayRecord({key: numpy_to_array(value) for key, value in arrays.items()})


def _check_like(arrays: Mapping[str, NDArray], model: Mapping[str, NDArray], what: str) -> None:
    if set(arrays) != set(model):
        raise TrainingError(f"{what} has arrays {sorted(arrays)}, the model has {sorted(model)}")
    for key, value in arrays.items():
        if value.shape != model[key].shape:
            raise TrainingError(
                f"{what}[{key!r}] has shape {value.shape}, the model's is {model[key].shape}"
            )


def _partition_id(context: Context) -> int:
    value = context.node_config.get("partition-id", 0)
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"node config 'partition-id' is not an int: {value!r}") from exc


def _entropy(seed: int, server_round: int, partition_id: int) -> list[int]:
    entropy = [seed, server_round, partition_id]
    if min(entropy) < 0:
        raise TrainingError(
            f"seed, server-round and partition-id must be ≥ 0, got {seed}, {server_round}, "
            f"{partition_id}"
        )
    return entropy


def _value(config: ConfigRecord, key: str, default: object) -> object:
    # None marks a required key: no config value is ever None
    value = config.get(key, default)
    if value is None:
        raise TrainingError(f"the message's config has no {key!r}")
    return value


def _integer(config: ConfigRecord, key: str, default: int | None = None) -> int:
    value = _value(config, key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise TrainingError(f"config {key!r} must be an int, got {value!r}")
    return value


def _number(config: ConfigRecord, key: str, default: float | None = None) -> float:
    value = _value(config, key, default)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TrainingError(f"config {key!r} must be a number, got {value!r}")
    return float(value)


def _string(config: ConfigRecord, key: str) -> str:
    value = _value(config, key, None)
    if not isinstance(value, str):
        raise TrainingError(f"config {key!r} must be a str, got {value!r}")
    return value
