"""SCAFFOLD (Karimireddy et al., ICML 2020) as a Flower Message-API strategy, server side."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from hivenode.models.flower_arrays import array_to_numpy, arrayrecord_to_numpy, numpy_to_array
from hivenode.strategies.aggregate import AggregationError, NDArray, weighted_mean
from hivenode.strategies.flower_arrays import reply_weight

logger = logging.getLogger(__name__)


class Scaffold(FedAvg):
    """SCAFFOLD: stochastic controlled averaging, server side.

    Implementation based on https://arxiv.org/abs/1910.06378 (Algorithm 1, option II).

    The server keeps a control variate c, zero-initialised, with the model's keys and shapes
    (kept in float64; sent in each tensor's model dtype). `configure_train` sends the global
    model x as ArrayRecord `arrayrecord_key` and c as ArrayRecord `control_key`. Every trainer
    i keeps its own c_i (zero at first), takes K_i corrected steps
    y ← y − η_l·(g(y) + c − c_i), updates c_i⁺ = c_i − c + (x − y_i)/(K_i·η_l) (see
    `hivenode.models.training.scaffold_client`) and replies with:

    - ArrayRecord `delta_y_key`: Δy_i = y_i − x, same keys as x;
    - ArrayRecord `delta_c_key`: Δc_i = c_i⁺ − c_i, same keys as x;
    - one MetricRecord holding `weighted_by_key` (its number of examples) and, by convention,
      "local-steps" (K_i) and its train loss.

    `aggregate_train` over the set S of valid replies computes

        x ← x + η_g · mean_S(Δy_i)
        c ← c + (|S|/N) · mean_S(Δc_i) = c + (1/N) · Σ_S Δc_i

    with N = `num_trainers`. mean_S(Δy_i) is the plain mean of the paper by default;
    `weighted=True` weights it by `weighted_by_key` instead, as FedAvg does. The c update
    always uses the plain sum: with it, c stays the mean of all N trainers' c_i.

    Parameters
    ----------
    num_trainers : int
        N, the total number of trainers of the job (all that may ever be sampled), not the
        number sampled per round.
    global_lr : float (default: 1.0)
        η_g, the server learning rate applied to the mean Δy.
    weighted : bool (default: False)
        Weight mean(Δy) by each reply's `weighted_by_key` instead of the paper's plain mean.
    control_key : str (default: "control")
        Key of the ArrayRecord carrying c to trainers.
    delta_y_key : str (default: "delta_y")
        Key of the ArrayRecord carrying Δy_i in replies.
    delta_c_key : str (default: "delta_c")
        Key of the ArrayRecord carrying Δc_i in replies.
    initial_control : ArrayRecord | None (default: None)
        c to resume from (e.g. a checkpoint of `control_record()`); zeros when None.
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes,
    min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key,
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn :
        As in `flwr.serverapp.strategy.FedAvg`.
    """

    # the arguments are Flower's FedAvg ones plus SCAFFOLD's own, documented once above
    def __init__(
        self,
        num_trainers: int,
        *,
        global_lr: float = 1.0,
        weighted: bool = False,
        control_key: str = "control",
        delta_y_key: str = "delta_y",
        delta_c_key: str = "delta_c",
        initial_control: ArrayRecord | None = None,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        if num_trainers < 1:
            raise AggregationError(f"num_trainers must be ≥ 1, got {num_trainers}")
        keys = {arrayrecord_key, configrecord_key, control_key}
        if len(keys) != 3 or delta_y_key == delta_c_key:
            raise AggregationError("record keys must be distinct")
        self.num_trainers = num_trainers
        self.global_lr = global_lr
        self.weighted = weighted
        self.control_key = control_key
        self.delta_y_key = delta_y_key
        self.delta_c_key = delta_c_key
        self._control: dict[str, NDArray] | None = (
            None
            if initial_control is None
            else {k: v.astype(np.float64) for k, v in arrayrecord_to_numpy(initial_control).items()}
        )
        self._model: dict[str, NDArray] | None = None  # x as sent by the last configure_train

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        super().summary()
        logger.info(
            "SCAFFOLD: N=%d trainers, global_lr=%g, %s mean of Δy, keys %r/%r/%r",
            self.num_trainers,
            self.global_lr,
            "weighted" if self.weighted else "plain",
            self.control_key,
            self.delta_y_key,
            self.delta_c_key,
        )

    @property
    def control(self) -> dict[str, NDArray]:
        """A copy of the server control variate c (float64), by key; empty before round 1."""
        return {k: v.copy() for k, v in (self._control or {}).items()}

    def control_record(self) -> ArrayRecord:
        """c as an ArrayRecord (float64), e.g. to checkpoint and pass back as
        `initial_control`."""
        return ArrayRecord({k: numpy_to_array(v) for k, v in (self._control or {}).items()})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the next round of training: x and c to every sampled trainer."""
        if self.fraction_train == 0.0:
            return []
        model = {k: np.array(v) for k, v in arrayrecord_to_numpy(arrays).items()}
        if self._control is None:
            self._control = {k: np.zeros(v.shape, np.float64) for k, v in model.items()}
        _check_keys_and_shapes(self._control, model, "initial_control")
        self._model = model
        num_nodes = int(len(list(grid.get_node_ids())) * self.fraction_train)
        sample_size = max(num_nodes, self.min_train_nodes)
        node_ids, all_nodes = sample_nodes(grid, self.min_available_nodes, sample_size)
        if len(all_nodes) > self.num_trainers:
            logger.warning(
                "%d nodes are connected but num_trainers is %d: c will be wrong",
                len(all_nodes),
                self.num_trainers,
            )
        logger.info("configure_train: sampled %d nodes of %d", len(node_ids), len(all_nodes))
        config["server-round"] = server_round
        control = ArrayRecord(
            {k: numpy_to_array(c.astype(model[k].dtype)) for k, c in self._control.items()}
        )
        record = RecordDict(
            {self.arrayrecord_key: arrays, self.control_key: control, self.configrecord_key: config}
        )
        return self._construct_messages(record, node_ids, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """x ← x + η_g·mean(Δy), c ← c + (1/N)·ΣΔc over the valid replies."""
        valid, _ = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        if not valid:
            return None, None
        if self._model is None or self._control is None:
            raise AggregationError("aggregate_train before configure_train: no x to update")
        if len(valid) > self.num_trainers:
            raise AggregationError(
                f"{len(valid)} replies but num_trainers is {self.num_trainers}: N is too small"
            )
        contents = [msg.content for msg in valid]
        model, control = self._model, self._control
        keys = list(model)
        delta_y = [self._deltas(content, self.delta_y_key, model) for content in contents]
        delta_c = [self._deltas(content, self.delta_c_key, model) for content in contents]
        weights = [
            reply_weight(content, self.weighted_by_key) if self.weighted else 1.0
            for content in contents
        ]
        mean_dy = weighted_mean(delta_y, weights, dtype=np.float64)
        mean_dc = weighted_mean(delta_c, [1.0] * len(contents), dtype=np.float64)
        participation = len(contents) / self.num_trainers
        new_model: dict[str, NDArray] = {}
        for key, dy, dc in zip(keys, mean_dy, mean_dc, strict=True):
            x = model[key]
            new_model[key] = (x.astype(np.float64) + self.global_lr * dy).astype(x.dtype)
            control[key] = control[key] + participation * dc
        self._model = new_model
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return ArrayRecord({k: numpy_to_array(v) for k, v in new_model.items()}), metrics

    def _deltas(
        self, content: RecordDict, record_key: str, model: dict[str, NDArray]
    ) -> list[NDArray]:
        if record_key not in content.array_records:
            raise AggregationError(f"a reply has no ArrayRecord {record_key!r}")
        record = content.array_records[record_key]
        arrays = {k: array_to_numpy(v) for k, v in record.items()}
        _check_keys_and_shapes(arrays, model, f"reply's {record_key!r}")
        return [arrays[k] for k in model]


def _check_keys_and_shapes(got: dict[str, NDArray], model: dict[str, NDArray], what: str) -> None:
    if set(got) != set(model):
        raise AggregationError(f"{what} has arrays {list(got)}, the model has {list(model)}")
    for key, value in got.items():
        if value.shape != model[key].shape:
            raise AggregationError(
                f"{what}[{key!r}] has shape {value.shape}, the model's is {model[key].shape}"
            )
