"""How a flat gradient is cut into the parts the peers reduce: equal, or sized by bandwidth."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from hivenode.parallel.errors import ParallelError


def proportional_counts(total: int, weights: Sequence[float]) -> list[int]:
    """Integers ∝ `weights` summing to `total` (largest remainders; ties: earlier first)."""
    if not weights or min(weights) < 0 or sum(weights) <= 0:
        raise ParallelError("part weights must be ≥ 0 with a positive sum")
    scale = sum(weights)
    quotas = [total * w / scale for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def part_bounds(
    size: int, group: Sequence[str], bandwidths: Mapping[str, float] | None = None
) -> list[tuple[int, int]]:
    """[start, end) of each group member's part of a `size`-value vector.

    Equal parts by default. With `bandwidths` (bytes/s per peer, the same mapping on every
    peer) part i ∝ b_i: a reducer receives and sends back its part from every other peer, so
    its traffic is ∝ its part and sizing parts by bandwidth makes every reducer take about
    the same time (hivemind's load balancing solves the same problem as a linear program;
    proportional sizing is its solution when every peer also sends at the same rate).
    A peer missing from `bandwidths` counts as the slowest one present.
    """
    if not group:
        raise ParallelError("an all-reduce needs at least one peer")
    if bandwidths:
        floor = min(bandwidths.values())
        weights = [max(float(bandwidths.get(peer, floor)), 0.0) for peer in group]
        if sum(weights) <= 0:
            weights = [1.0] * len(group)
    else:
        weights = [1.0] * len(group)
    counts = proportional_counts(size, weights)
    bounds, start = [], 0
    for count in counts:
        bounds.append((start, start + count))
        start += count
    return bounds
