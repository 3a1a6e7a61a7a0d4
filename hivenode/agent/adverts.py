"""Advert cadence: how often a node re-announces itself, sized to the swarm it sees."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

ADVERT_CHECK_PERIOD = 5.0
"""How often a node looks for a change worth re-announcing at once (roles, GPUs, models)."""


def advert_period(known_peers: int, min_period: float, deliveries_per_s: float) -> float:
    """Seconds between a node's adverts so that each node receives about `deliveries_per_s`.

    Every advert reaches every node, so a swarm of N nodes advertising every P seconds costs
    each node N/P deliveries per second. py-libp2p handles a few hundred deliveries per second
    per event loop, so a fixed period that suits 20 nodes floods 100 (measured: 100 nodes at a
    3 s period never converged). Stretching P to N / deliveries_per_s keeps the cost flat.
    """
    return max(min_period, (known_peers + 1) / deliveries_per_s)


def sequence_numbers(start: float | None = None) -> Iterator[int]:
    """Advert sequence numbers that keep growing across restarts without being stored:
    they start at the wall clock in milliseconds."""
    return itertools.count(int((time.time() if start is None else start) * 1000))
