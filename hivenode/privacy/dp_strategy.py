"""Flower's central-DP wrappers (fixed clipping), with the privacy they spend accounted.

The wrappers are Flower's own (`flwr.serverapp.strategy.dp_fixed_clipping`); these
subclasses change three things, each for the guarantee to hold as reported:

- the mean is unweighted: the noise std z·C/m is calibrated to a plain mean of m clipped
  updates (a trainer with more examples would otherwise move a weighted mean by more than
  C/m). Each reply gets `UNIFORM_WEIGHT_KEY` = 1, which the wrapped FedAvg weighs by.
- m is the number of updates actually averaged this round, not the number sampled: a mean
  of fewer updates moves more per update, so it gets proportionally more noise.
- every aggregated round is one Gaussian release in a `GaussianAccountant` (Flower's own
  accountant needs Google's dp-accounting and equal weights; ours is `accountant.py`).

Flower skips a round's aggregation when any reply is an error (the model stays; nothing
is released, nothing spent).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from hivenode.privacy.accountant import GaussianAccountant

UNIFORM_WEIGHT_KEY = "hivenode.dp-weight"
"""The metric a DP job's FedAvg weighs replies by: 1 for every train reply."""
EXAMPLES_KEY = "num-examples"


def _unweighted(replies: Iterable[Message]) -> list[Message]:
    replies = list(replies)
    for reply in replies:
        if reply.has_error():
            continue
        for record in reply.content.metric_records.values():
            record[UNIFORM_WEIGHT_KEY] = 1
    return replies


def _by_examples(replies: Iterable[Message]) -> list[Message]:
    """Evaluate replies keep their weighting by examples (nothing is noised there)."""
    replies = list(replies)
    for reply in replies:
        if reply.has_error():
            continue
        for record in reply.content.metric_records.values():
            if EXAMPLES_KEY in record:
                record[UNIFORM_WEIGHT_KEY] = record[EXAMPLES_KEY]
    return replies


def _averaged(replies: list[Message], sampled: int) -> int:
    return sum(1 for r in replies if not r.has_error()) or sampled


class _Accounted(Strategy):
    """What both wrappers change (see the module docstring); first in their bases, so that
    its `super()` is Flower's wrapper."""

    ledger: GaussianAccountant
    num_sampled_clients: int

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        listed = _unweighted(replies)
        self.num_sampled_clients = _averaged(listed, self.num_sampled_clients)
        arrays, metrics = super().aggregate_train(server_round, listed)  # type: ignore[safe-super]
        if arrays is not None:
            self.ledger.compose()
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return super().aggregate_evaluate(server_round, _by_examples(replies))  # type: ignore[safe-super]


class ServerSideDP(_Accounted, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping wrapper, accounted in `accountant`."""

    def __init__(self, strategy: Strategy, accountant: GaussianAccountant, sampled: int) -> None:
        DifferentialPrivacyServerSideFixedClipping.__init__(
            self, strategy, accountant.noise_multiplier, accountant.clipping_norm, sampled
        )
        self.ledger = accountant


class ClientSideDP(_Accounted, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping wrapper (trainers run `fixedclipping_mod`),
    accounted in `accountant`."""

    def __init__(self, strategy: Strategy, accountant: GaussianAccountant, sampled: int) -> None:
        DifferentialPrivacyClientSideFixedClipping.__init__(
            self, strategy, accountant.noise_multiplier, accountant.clipping_norm, sampled
        )
        self.ledger = accountant
