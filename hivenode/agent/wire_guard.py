"""Who may make this node work, and how fast a peer may ask: checked by the RpcServer on
each request, before it is read past its header or handed to its handler.

The caller is the peer id libp2p authenticated when the connection was secured (the
stream's remote peer), never a field of the request: a body can claim anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Final

from hivenode.agent.blob_transfer import BLOB_PROTOCOL
from hivenode.agent.errors import RpcError
from hivenode.agent.rate_limit import RateLimiter
from hivenode.agent.rpc import RATE_LIMITED
from hivenode.agent.settings import RateLimitSettings, RequestRate, SecuritySettings
from hivenode.protocol.ids import (
    ALLREDUCE_PROTOCOL,
    DEPLOY_PROTOCOL,
    DP_STATE_PROTOCOL,
    FL_PROTOCOL,
    INFER_PROTOCOL,
    PARALLEL_JOB_PROTOCOL,
    PEER_TABLE_PROTOCOL,
    PIPELINE_PROTOCOL,
    QTABLE_PROTOCOL,
    STATUS_PROTOCOL,
)

log = logging.getLogger(__name__)

NOT_ALLOWED: Final = "not_allowed"


class RateClass(StrEnum):
    CONTROL = "control"
    JOB = "job"
    DATA = "data"


JOB_PROTOCOLS: Final = frozenset({FL_PROTOCOL, PARALLEL_JOB_PROTOCOL, DEPLOY_PROTOCOL})
"""The requests by which a peer makes this node work for a job: train or evaluate a round,
run a member's part of a parallel job (and report on it), fetch and serve a model. Inference
requests stay public: they reach only models the operator or an allowed peer deployed, and
the all-reduce, pipeline and dp-state protocols reach only jobs this node already took."""

PROTOCOL_CLASSES: Final[Mapping[str, RateClass]] = {
    STATUS_PROTOCOL: RateClass.CONTROL,
    PEER_TABLE_PROTOCOL: RateClass.CONTROL,
    QTABLE_PROTOCOL: RateClass.CONTROL,
    FL_PROTOCOL: RateClass.JOB,
    PARALLEL_JOB_PROTOCOL: RateClass.JOB,
    DEPLOY_PROTOCOL: RateClass.JOB,
    BLOB_PROTOCOL: RateClass.DATA,
    ALLREDUCE_PROTOCOL: RateClass.DATA,
    DP_STATE_PROTOCOL: RateClass.DATA,
    PIPELINE_PROTOCOL: RateClass.DATA,
    INFER_PROTOCOL: RateClass.DATA,
}
"""A protocol not listed here (one a role above `agent/` registers) is in the data class:
the loosest, so that no new protocol is throttled by surprise."""


class WireGuard:
    """The allow-list and the rate limits of one node's RpcServer."""

    def __init__(
        self,
        own_peer_id: str,
        settings: SecuritySettings,
        clock: Callable[[], float],
    ) -> None:
        self.own_peer_id = own_peer_id
        self.settings = settings
        self._submitters = frozenset(settings.job_submitters)
        self._clock = clock
        limits = settings.rate_limits
        self._rates = _rates(limits)
        self.limiter = RateLimiter(limits.idle_s, limits.max_buckets, list(self._rates.values()))

    def check(self, protocol_id: str, caller: str) -> None:
        """Raise RpcError (rate_limited, not_allowed) unless `caller` may send this request
        now. The node itself is never refused (an aggregator may train on its own node)."""
        if caller == self.own_peer_id:
            return
        self._check_rate(protocol_id, caller)
        self._check_allowed(protocol_id, caller)

    def _check_rate(self, protocol_id: str, caller: str) -> None:
        if not self.settings.rate_limits.enabled:
            return
        rate_class = PROTOCOL_CLASSES.get(protocol_id, RateClass.DATA)
        rate = self._rates[rate_class]
        key = (caller, protocol_id)
        retry_in = self.limiter.admit(key, rate, self._clock())
        if retry_in is None:
            return
        if self.limiter.first_refusal(key):
            log.warning(
                "%s sends %s requests faster than %g/s (burst %d): refusing the excess",
                caller,
                protocol_id,
                rate.per_s,
                rate.burst,
            )
        raise RpcError(
            RATE_LIMITED,
            f"over {rate.per_s:g} {rate_class} requests/s (burst {rate.burst}) on "
            f"{protocol_id}; retry in {retry_in:.3f} s",
        )

    def takes_work_from(self, caller: str) -> bool:
        """Whether `caller` may make this node work for a job (submit one, hand one over)."""
        return (
            self.settings.accept_public_work
            or caller == self.own_peer_id
            or caller in self._submitters
        )

    def _check_allowed(self, protocol_id: str, caller: str) -> None:
        if protocol_id in JOB_PROTOCOLS and not self.takes_work_from(caller):
            raise RpcError(
                NOT_ALLOWED,
                f"this node takes jobs only from its security.job_submitters; {caller} is not one",
            )


def _rates(limits: RateLimitSettings) -> dict[RateClass, RequestRate]:
    return {
        RateClass.CONTROL: limits.control,
        RateClass.JOB: limits.job,
        RateClass.DATA: limits.data,
    }
