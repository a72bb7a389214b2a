"""The Gaussian mechanism of the released counts: noise scale, its event, ε from the library."""

from __future__ import annotations

import math

import dp_accounting as dpa
import numpy as np
import pytest
from scipy import optimize, stats

from fedshop.config import load_config
from fedshop.errors import ConfigError
from fedshop.privacy.accounting import epsilon
from fedshop.privacy.dp import make_plan, release_silo_counts
from fedshop.privacy.mechanisms import gaussian_mechanism

DELTA = 1e-5


def analytic_gaussian_delta(eps: float, sigma: float, sensitivity: float) -> float:
    """Exact δ(ε) of one Gaussian mechanism (Balle & Wang, ICML 2018)."""
    a, b = sensitivity / (2 * sigma), eps * sigma / sensitivity
    return stats.norm.cdf(a - b) - math.exp(eps) * stats.norm.cdf(-a - b)


def analytic_gaussian_epsilon(sigma: float, sensitivity: float, delta: float) -> float:
    return optimize.brentq(
        lambda eps: analytic_gaussian_delta(eps, sigma, sensitivity) - delta, 1e-9, 100
    )


def test_gaussian_noise_has_sigma_multiplier_times_sensitivity():
    rng = np.random.default_rng(2)
    values = np.full(20_000, 7.0)
    release = gaussian_mechanism(values, l2_sensitivity=2.0, noise_multiplier=1.5, rng=rng)
    assert release.scale == pytest.approx(3.0)
    assert isinstance(release.event, dpa.GaussianDpEvent)
    assert release.event.noise_multiplier == pytest.approx(1.5)
    noise = release.values - values
    assert stats.kstest(noise, stats.norm(0, 3.0).cdf).pvalue > 0.01
    # The test has the power to see a 10% error in the scale.
    assert stats.kstest(noise, stats.norm(0, 3.3).cdf).pvalue < 1e-3


@pytest.mark.parametrize("z", [0.8, 2.0, 5.0])
def test_the_event_gives_the_analytic_gaussian_epsilon(z):
    release = gaussian_mechanism(np.zeros(3), 1.0, z, np.random.default_rng(0))
    exact = analytic_gaussian_epsilon(z, 1.0, DELTA)
    assert epsilon(release.event, DELTA, "pld") == pytest.approx(exact, rel=0.01)
    assert epsilon(release.event, DELTA, "rdp") >= exact * 0.999  # RDP is an upper bound


def test_silo_counts_are_released_with_the_plans_accounted_noise():
    privacy = load_config(overrides={"privacy.mode": "record", "privacy.epsilon": 4.0}).privacy
    plan = make_plan(privacy, 3, 1000, 0.05, 2, count_noise_multiplier=10.0)
    counts = np.array([120, 3, 57])
    released = release_silo_counts(counts, plan, np.random.default_rng(0))
    assert released.shape == (3,) and (released >= 1.0).all()  # clamping: post-processing
    # The same draw as the mechanism: σ = 10 around the true counts.
    raw = gaussian_mechanism(counts, 1.0, 10.0, np.random.default_rng(0))
    np.testing.assert_array_equal(released, np.maximum(raw.values, 1.0))
    assert raw.event == plan.fixed_events[0]


@pytest.mark.parametrize("bad", [0.0, -2.0, math.nan])
def test_bad_sensitivity_or_noise_is_a_config_error(bad):
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="sensitivity"):
        gaussian_mechanism(np.zeros(2), bad, 1.0, rng)
    with pytest.raises(ConfigError, match="noise multiplier"):
        gaussian_mechanism(np.zeros(2), 1.0, bad, rng)
    with pytest.raises(ConfigError, match="finite"):
        gaussian_mechanism(np.array([1.0, np.nan]), 1.0, 1.0, rng)
