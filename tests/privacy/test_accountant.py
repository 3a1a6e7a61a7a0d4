"""The RDP accountant against Google's dp-accounting and the exact Gaussian privacy curve."""

from __future__ import annotations

import math

import pytest
from scipy.stats import norm

from hivenode.privacy.accountant import GaussianAccountant, gaussian_epsilon

# dp-accounting 0.6.0: rdp.RdpAccountant().compose(GaussianDpEvent(z), T).get_epsilon(1e-5),
# computed once (its default orders are coarser: ours may only be lower, by < 0.1 %)
DP_ACCOUNTING = [
    (1.0, 10, 19.05359753163139),
    (2.0, 10, 8.079406222420491),
    (0.5, 5, 30.12663110385034),
    (1.1, 100, 83.09977949943618),
    (4.0, 3, 1.8472795614140454),
]


@pytest.mark.parametrize(("noise", "releases", "reference"), DP_ACCOUNTING)
def test_epsilon_matches_dp_accounting(noise: float, releases: int, reference: float) -> None:
    epsilon = gaussian_epsilon(noise, releases, 1e-5)
    assert reference * 0.999 <= epsilon <= reference


def exact_delta(epsilon: float, sigma: float) -> float:
    """δ(ε) of one Gaussian mechanism of sensitivity 1 and std σ (Balle & Wang 2018)."""
    a = 1 / (2 * sigma)
    return float(
        norm.cdf(-epsilon * sigma + a) - math.exp(epsilon) * norm.cdf(-epsilon * sigma - a)
    )


@pytest.mark.parametrize(("noise", "releases"), [(0.8, 1), (1.0, 10), (3.0, 50), (10.0, 5)])
def test_epsilon_is_a_tight_upper_bound_of_the_exact_curve(noise: float, releases: int) -> None:
    # T Gaussian releases of std z compose exactly to one of std z/√T
    epsilon = gaussian_epsilon(noise, releases, 1e-5)
    sigma = noise / math.sqrt(releases)
    assert exact_delta(epsilon, sigma) <= 1e-5  # the RDP bound is never optimistic
    assert exact_delta(epsilon * 0.75, sigma) > 1e-5  # and not loose by a quarter


def test_epsilon_grows_with_rounds_and_falls_with_noise() -> None:
    assert gaussian_epsilon(1.0, 0, 1e-5) == 0.0
    by_rounds = [gaussian_epsilon(1.0, t, 1e-5) for t in (1, 2, 5, 20)]
    assert by_rounds == sorted(by_rounds)
    by_noise = [gaussian_epsilon(z, 10, 1e-5) for z in (0.5, 1.0, 2.0, 8.0)]
    assert by_noise == sorted(by_noise, reverse=True)
    assert gaussian_epsilon(0.0, 1, 1e-5) == math.inf


def test_the_accountant_reports_what_it_composed() -> None:
    accountant = GaussianAccountant(1.0, 0.5, 1e-6, "server-fixed")
    accountant.compose()
    accountant.compose(2)
    spent = accountant.spent()
    assert spent.releases == 3 and spent.delta == 1e-6 and spent.clipping_norm == 0.5
    assert spent.epsilon == gaussian_epsilon(1.0, 3, 1e-6)
    assert "ε" in spent.describe()
