"""SecAgg+ for Message-API strategies: Flower's SecAgg+ protocol, run over any Grid.

Flower 1.42 ships SecAgg+ as `SecAggPlusWorkflow`, which drives a *legacy* strategy through a
`LegacyContext` (`configure_fit`/`aggregate_fit`); it cannot wrap a Message-API strategy. The
trainers' half, `secaggplus_mod`, only needs train messages. So this wrapper is the
workflow's server half rewritten as a Message-API strategy (same stages, same messages, same
cryptography and arithmetic from `flwr.common.secure_aggregation`), and the trainers run
Flower's mod unchanged (`hivenode.privacy.client_mods`):

- `configure_train` samples with the wrapped strategy, then runs the *setup* (public keys)
  and *share keys* (Shamir shares of each trainer's mask seed and X25519 key, encrypted to
  their holders) stages itself, and returns the *collect masked vectors* messages: the
  wrapped strategy's train messages plus the forwarded shares.
- `Strategy.start` sends those; each trainer trains and answers its weighted update,
  quantized and masked (a private mask, plus pairwise masks that cancel in the sum).
- `aggregate_train` adds the masked vectors, runs the *unmask* stage (the survivors' shares
  of the survivors' seeds, and of the dropped trainers' keys, whose pairwise masks it then
  removes), and dequantizes the sum into the weighted mean of the updates.

The aggregator never holds an unmasked individual update, only the masked vectors and the
sum. A trainer that drops after sharing its keys is recovered from its neighbours' shares
while at least `threshold` of each trainer's neighbours survive; otherwise the round keeps
the current model. Trainers mask their update (w_i − w_global), not their weights, so the
quantization range only has to hold one round's change.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from hivenode.models.flower_arrays import arrayrecord_to_numpy, numpy_to_array
from hivenode.privacy.client_mods import MASKED_RECORD, UNIFORM_WEIGHT

log = logging.getLogger(__name__)

NDArray = np.ndarray[Any, Any]
MODULUS_RANGE = 2**32
"""Mask entries are uniform in [0, 2³²): Flower's default and its maximum."""


@dataclass
class SecAggRound:
    """One round's protocol state, and what the job reports of it."""

    neighbours: dict[int, set[int]] = field(default_factory=dict)
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    sampled: set[int] = field(default_factory=set)
    shared: set[int] = field(default_factory=set)
    """Trainers that shared their keys: the survivors' vectors hold pairwise masks with them."""
    active: set[int] = field(default_factory=set)
    threshold: int = 0
    arrays: ArrayRecord = field(default_factory=ArrayRecord)
    train: dict[int, Message] = field(default_factory=dict)
    forwarded: dict[int, tuple[list[int], list[bytes]]] = field(default_factory=dict)
    masked_requests: dict[int, Message] = field(default_factory=dict)
    survivors: int = 0
    """Trainers whose masked update is in the sum."""
    recovered: int = 0
    """Dropped trainers whose pairwise masks were rebuilt from their neighbours' shares."""


class SecAggPlus(Strategy):
    """`strategy` (a FedAvg: its update is a weighted mean) aggregated with SecAgg+.

    Parameters
    ----------
    strategy : FedAvg
        Samples, configures and evaluates; its `train_metrics_aggr_fn` aggregates the
        metrics. Its arrays aggregation is replaced by the secure sum.
    num_shares : int | float
        Shares of each trainer's secrets: an int > 2, or a fraction of the round's trainers.
    reconstruction_threshold : int | float
        Shares that rebuild a secret: an int, or a fraction of `num_shares`.
    max_weight : float
        The largest trainer weight (its number of examples); weights are quantized as
        weight / max_weight, so it must bound them.
    clipping_range, quantization_range : float, int
        Each weighted update entry is clipped to ±clipping_range and quantized to
        quantization_range levels.
    timeout : float
        Seconds each stage waits for replies.
    uniform_weights : bool
        Weigh every trainer 1 (DP's noise is calibrated to an unweighted mean).
    """

    def __init__(
        self,
        strategy: FedAvg,
        *,
        num_shares: int | float = 1.0,
        reconstruction_threshold: int | float = 0.67,
        max_weight: float = 1000.0,
        clipping_range: float = 8.0,
        quantization_range: int = 2**22,
        timeout: float = 600.0,
        uniform_weights: bool = False,
    ) -> None:
        super().__init__()
        self.strategy = strategy
        self.num_shares = num_shares
        self.reconstruction_threshold = reconstruction_threshold
        self.max_weight = 1.0 if uniform_weights else max_weight
        self.clipping_range = clipping_range
        self.quantization_range = quantization_range
        self.timeout = timeout
        self.uniform_weights = uniform_weights
        self._grid: Grid | None = None
        self.current: SecAggRound | None = None
        self.history: list[SecAggRound] = []

    def summary(self) -> None:
        log.info("SecAgg+ over %s", type(self.strategy).__name__)

    # --- train: setup and share keys, then the masked train messages -----------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._grid = grid
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self.current = None
        if len(messages) < 3:
            log.error("SecAgg+ needs 3 trainers in a round, %d were sampled", len(messages))
            return []
        state = SecAggRound(arrays=arrays)
        state.train = {m.metadata.dst_node_id: m for m in messages}
        self.current = state
        if not self._setup(state, grid) or not self._share_keys(state, grid):
            log.error("SecAgg+ round %d: too few trainers left to share keys", server_round)
            self.history.append(state)
            self.current = None
            return []
        state.masked_requests = {nid: self._masked_request(state, nid) for nid in state.active}
        return list(state.masked_requests.values())

    def _setup(self, state: SecAggRound, grid: Grid) -> bool:
        nids = sorted(state.train)
        count = len(nids)
        shares, state.threshold = self._share_numbers(count)
        configs = {
            Key.STAGE: Stage.SETUP,
            Key.SAMPLE_NUMBER: count,
            Key.SHARE_NUMBER: shares,
            Key.THRESHOLD: state.threshold,
            Key.CLIPPING_RANGE: float(self.clipping_range),
            Key.TARGET_RANGE: self.quantization_range,
            Key.MOD_RANGE: MODULUS_RANGE,
            Key.MAX_WEIGHT: float(self.max_weight),
        }
        # each trainer shares with the `shares` trainers around it on a random ring
        ring = list(nids)
        random.SystemRandom().shuffle(ring)
        half = shares >> 1
        state.neighbours = {
            nid: {ring[(i + offset) % count] for offset in range(-half, half + 1)}
            for i, nid in enumerate(ring)
        }
        state.sampled = set(nids)
        replies = self._stage(grid, {nid: dict(configs) for nid in nids})
        for nid, reply in replies.items():
            keys = reply.content.config_records[RECORD_KEY_CONFIGS]
            pk1, pk2 = keys[Key.PUBLIC_KEY_1], keys[Key.PUBLIC_KEY_2]
            state.public_keys[nid] = (cast(bytes, pk1), cast(bytes, pk2))
        state.active = set(replies)
        return self._enough(state)

    def _share_numbers(self, count: int) -> tuple[int, int]:
        """(shares, threshold) for a round of `count` trainers, as Flower's workflow sets them."""
        if isinstance(self.num_shares, float):
            shares = round(self.num_shares * count)
            if shares < count and shares % 2 == 0:
                shares += 1
            if shares <= 2:
                shares = count
        else:
            shares = min(self.num_shares, count)
        if shares < count and shares % 2 == 0:
            shares += 1  # a ring neighbourhood is odd: itself and `half` each side
        if isinstance(self.reconstruction_threshold, float):
            threshold = max(2, round(self.reconstruction_threshold * shares))
        else:
            threshold = self.reconstruction_threshold
        return shares, min(threshold, shares)

    def _share_keys(self, state: SecAggRound, grid: Grid) -> bool:
        configs: dict[int, dict[str, Any]] = {}
        for nid in state.active:
            known = state.neighbours[nid] & state.active
            configs[nid] = {str(n): list(state.public_keys[n]) for n in known}
            configs[nid][Key.STAGE] = Stage.SHARE_KEYS
        replies = self._stage(grid, configs)
        state.active = set(replies)
        forwarded: dict[int, tuple[list[int], list[bytes]]] = {n: ([], []) for n in state.active}
        for src, reply in replies.items():
            answer = reply.content.config_records[RECORD_KEY_CONFIGS]
            dsts = cast(list[int], answer[Key.DESTINATION_LIST])
            ciphertexts = cast(list[bytes], answer[Key.CIPHERTEXT_LIST])
            for dst, ciphertext in zip(dsts, ciphertexts, strict=True):
                if dst in forwarded:
                    forwarded[dst][0].append(src)
                    forwarded[dst][1].append(ciphertext)
        state.forwarded = forwarded
        state.shared = set(state.active)
        return self._enough(state)

    def _masked_request(self, state: SecAggRound, nid: int) -> Message:
        sources, ciphertexts = state.forwarded[nid]
        train = state.train[nid]
        content = RecordDict(dict(train.content.items()))
        configs: dict[str, Any] = {
            Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
            Key.CIPHERTEXT_LIST: ciphertexts,
            Key.SOURCE_LIST: sources,
        }
        if self.uniform_weights:
            configs[UNIFORM_WEIGHT] = True
        content[RECORD_KEY_CONFIGS] = ConfigRecord(configs)
        return Message(content, nid, MessageType.TRAIN, group_id=train.metadata.group_id)

    # --- aggregate: the masked sum, unmasked ------------------------------------------------

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        state, self.current = self.current, None
        if state is None or self._grid is None:
            return None, None
        self.history.append(state)
        # the Grid gave each request its id when it sent it: replies are matched to those
        asked = {m.metadata.message_id: nid for nid, m in state.masked_requests.items()}
        by_node = {
            asked[r.metadata.reply_to_message_id]: r
            for r in replies
            if not r.has_error()
            and r.metadata.reply_to_message_id in asked
            and MASKED_RECORD in r.content.array_records
        }
        if len(by_node) < state.threshold:
            log.error(
                "SecAgg+ round %d: %d masked updates, fewer than the threshold %d",
                server_round,
                len(by_node),
                state.threshold,
            )
            return None, None
        masked: list[NDArray] | None = None
        for reply in by_node.values():
            record = reply.content.array_records[MASKED_RECORD]
            vector = [np.asarray(a, np.int64) for a in arrayrecord_to_numpy(record).values()]
            masked = vector if masked is None else parameters_addition(masked, vector)
        assert masked is not None
        state.active = set(by_node)
        state.survivors = len(by_node)
        total = self._unmask(state, self._grid, parameters_mod(masked, MODULUS_RANGE))
        if total is None:
            log.error("SecAgg+ round %d: too few key shares to unmask the sum", server_round)
            return None, None
        contents = [r.content for r in by_node.values()]
        metrics = self.strategy.train_metrics_aggr_fn(contents, self.strategy.weighted_by_key)
        return self._mean_model(state, total), metrics

    def _unmask(
        self, state: SecAggRound, grid: Grid, masked: list[NDArray]
    ) -> list[NDArray] | None:
        active, dead = state.active, state.shared - state.active
        configs = {
            nid: {
                Key.STAGE: Stage.UNMASK,
                Key.ACTIVE_NODE_ID_LIST: sorted(state.neighbours[nid] & active),
                Key.DEAD_NODE_ID_LIST: sorted(state.neighbours[nid] & dead),
            }
            for nid in active
        }
        replies = self._stage(grid, configs)
        shares: dict[int, list[bytes]] = {nid: [] for nid in active | dead}
        for reply in replies.values():
            answer = reply.content.config_records[RECORD_KEY_CONFIGS]
            owners = cast(list[int], answer[Key.NODE_ID_LIST])
            held = cast(list[bytes], answer[Key.SHARE_LIST])
            for owner, share in zip(owners, held, strict=True):
                if owner in shares:
                    shares[owner].append(share)
        shapes = [a.shape for a in masked]
        for nid, owned in shares.items():
            if len(owned) < state.threshold:
                return None
            secret = combine_shares(owned)
            if nid in active:  # its private mask: rebuilt from its seed
                masked = parameters_subtraction(
                    masked, pseudo_rand_gen(secret, MODULUS_RANGE, shapes)
                )
                continue
            # a dropped trainer: its pairwise masks with the survivors did not cancel
            state.recovered += 1
            for neighbour in state.neighbours[nid] - {nid}:
                if neighbour not in active:
                    continue
                shared = generate_shared_key(
                    bytes_to_private_key(secret),
                    bytes_to_public_key(state.public_keys[neighbour][0]),
                )
                mask = pseudo_rand_gen(shared, MODULUS_RANGE, shapes)
                if nid > neighbour:
                    masked = parameters_addition(masked, mask)
                else:
                    masked = parameters_subtraction(masked, mask)
        return parameters_mod(masked, MODULUS_RANGE)

    def _mean_model(self, state: SecAggRound, total: list[NDArray]) -> ArrayRecord:
        """w_global + Σ q_i·Δ_i / Σ q_i, from the dequantized sum (Flower's arithmetic)."""
        total_weight, summed = factor_extract(total)
        mean = dequantize(summed, self.clipping_range, self.quantization_range)
        offset = -(state.survivors - 1) * self.clipping_range
        scale = self.quantization_range / float(np.asarray(total_weight).reshape(-1)[0])
        current = arrayrecord_to_numpy(state.arrays)
        out: dict[str, Any] = {}
        for (key, value), update in zip(current.items(), mean, strict=True):
            step = (update + offset) * scale
            out[key] = numpy_to_array((value + step.reshape(value.shape)).astype(value.dtype))
        return ArrayRecord(out)

    # --- the stages' exchange ---------------------------------------------------------------

    def _stage(self, grid: Grid, configs: dict[int, dict[str, Any]]) -> dict[int, Message]:
        """Send each node its stage configs; the replies without error, by node."""
        messages = [
            Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(c)}), nid, MessageType.TRAIN)
            for nid, c in configs.items()
        ]
        replies = list(grid.send_and_receive(messages, timeout=self.timeout))
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        good: dict[int, Message] = {}
        for reply in replies:
            nid = sent.get(reply.metadata.reply_to_message_id)
            if nid is None:
                continue
            if reply.has_error():
                log.info("SecAgg+: node %d dropped: %s", nid, reply.error.reason)
                continue
            good[nid] = reply
        return good

    def _enough(self, state: SecAggRound) -> bool:
        return all(
            len(state.neighbours[nid] & state.active) >= state.threshold for nid in state.sampled
        )

    # --- evaluate: the wrapped strategy's ---------------------------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
