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


def bandwidth_shares(bandwidths: Sequence[float]) -> list[float]:
    """Fractions p_i of the vector each peer reduces, given each peer's bandwidth b_i.

    Minimises the slowest peer's sending time T_i = (1 + (n−2)·p_i) / b_i (in vectors): a
    peer sends the (1 − p_i) of its own vector that others reduce, and its reduced part to
    the n − 1 others. Balanced peers have equal T, so p_i = (T·b_i − 1)/(n − 2) with
    T = (n − 2 + k) / Σ b over the k peers that reduce; a peer too slow for p_i ≥ 0 reduces
    nothing, and T is solved again without it (water-filling; hivemind's load balancing
    solves the same by linear programming). With two peers T does not depend on p: parts ∝ b.
    """
    n = len(bandwidths)
    if n == 0 or min(bandwidths) < 0 or sum(bandwidths) <= 0:
        raise ParallelError("bandwidths must be ≥ 0 with a positive sum")
    if n <= 2:
        return [b / sum(bandwidths) for b in bandwidths]
    order = sorted(range(n), key=lambda i: -bandwidths[i])
    for k in range(n, 0, -1):
        active = order[:k]
        total = sum(bandwidths[i] for i in active)
        if total <= 0:
            continue
        speed = (n - 2 + k) / total
        shares = [0.0] * n
        for i in active:
            shares[i] = (speed * bandwidths[i] - 1) / (n - 2)
        if min(shares[i] for i in active) >= 0:
            return shares
    raise ParallelError("no peer can reduce")  # unreachable: k = 1 always fits


def part_bounds(
    size: int, group: Sequence[str], bandwidths: Mapping[str, float] | None = None
) -> list[tuple[int, int]]:
    """[start, end) of each group member's part of a `size`-value vector.

    Equal parts by default; with `bandwidths` (bytes/s per peer, the same mapping on every
    peer), `bandwidth_shares` of it. A peer missing from `bandwidths` counts as the slowest
    one present. A part may be empty: that peer reduces nothing.
    """
    if not group:
        raise ParallelError("an all-reduce needs at least one peer")
    weights = [1.0] * len(group)
    if bandwidths:
        floor = min(bandwidths.values())
        speeds = [max(float(bandwidths.get(peer, floor)), 0.0) for peer in group]
        if sum(speeds) > 0:
            weights = bandwidth_shares(speeds)
    counts = proportional_counts(size, weights)
    bounds, start = [], 0
    for count in counts:
        bounds.append((start, start + count))
        start += count
    return bounds
