"""The privacy a DP job spent: Rényi-DP accounting of repeated Gaussian releases, as (ε, δ).

Each aggregated round of a central-DP job releases the clipped updates' mean plus Gaussian
noise of standard deviation z·C/m (noise multiplier z, clipping norm C, m sampled trainers):
one Gaussian mechanism of noise multiplier z at the client level. Its Rényi DP of order α is
α/(2z²) (Mironov 2017, Prop. 7), and T releases compose by adding: T·α/(2z²).

Sampling m of N trainers per round is *not* credited (no privacy amplification): Flower
samples a fixed number without replacement, for which the Poisson-subsampled bound does not
hold as such. The reported ε is therefore an upper bound, valid whatever the sampling rate.

RDP converts to (ε, δ) with Canonne, Kamath & Steinke 2020 (Prop. 12), as Google's
`dp-accounting` does:  ε = min_α  ρ(α) + log((α−1)/α) − (log δ + log α)/(α − 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ACCOUNTING = "rdp, gaussian, no sampling amplification"
"""How ε was computed, as the job reports it."""

_ORDERS = np.geomspace(1.001, 1e6, 4000)
"""Rényi orders α searched: dense enough that ε is within 0.1 % of its minimum over α."""


@dataclass(frozen=True)
class PrivacySpent:
    """What a job's DP rounds cost: (ε, δ)-DP at the client level after `releases` rounds."""

    epsilon: float
    delta: float
    releases: int
    noise_multiplier: float
    clipping_norm: float
    mode: str
    accounting: str = ACCOUNTING

    def describe(self) -> str:
        return (
            f"(ε = {self.epsilon:.3g}, δ = {self.delta:g}) after {self.releases} round(s), "
            f"z = {self.noise_multiplier:g}, C = {self.clipping_norm:g} [{self.mode}]"
        )


def gaussian_rdp(noise_multiplier: float, orders: np.ndarray, releases: int) -> np.ndarray:
    """Rényi DP at `orders` of `releases` Gaussian mechanisms of sensitivity 1, std z."""
    if noise_multiplier <= 0:
        return np.full(orders.shape, math.inf)
    return releases * orders / (2.0 * noise_multiplier**2)


def rdp_to_epsilon(orders: np.ndarray, rdp: np.ndarray, delta: float) -> tuple[float, float]:
    """(ε, the optimal α) for (ε, δ)-DP from RDP values ρ(α) (Canonne et al. 2020)."""
    if not 0 < delta < 1:
        raise ValueError(f"δ must be in (0, 1), got {delta}")
    with np.errstate(over="ignore", invalid="ignore"):
        eps = rdp + np.log1p(-1.0 / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)
    eps = np.where(np.isfinite(eps), eps, np.inf)
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), float(orders[best])


def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """ε after `releases` Gaussian releases of noise multiplier z at δ (0 before any)."""
    if releases <= 0:
        return 0.0
    rdp = gaussian_rdp(noise_multiplier, _ORDERS, releases)
    return rdp_to_epsilon(_ORDERS, rdp, delta)[0]


@dataclass
class GaussianAccountant:
    """Counts a job's DP releases and turns them into `PrivacySpent`."""

    noise_multiplier: float
    clipping_norm: float
    delta: float
    mode: str
    releases: int = 0

    def compose(self, count: int = 1) -> None:
        self.releases += count

    def spent(self) -> PrivacySpent:
        return PrivacySpent(
            epsilon=gaussian_epsilon(self.noise_multiplier, self.releases, self.delta),
            delta=self.delta,
            releases=self.releases,
            noise_multiplier=self.noise_multiplier,
            clipping_norm=self.clipping_norm,
            mode=self.mode,
        )
