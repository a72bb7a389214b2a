"""The accountant against closed forms and published values, and RDP against PLD."""

import math

import pytest
from scipy import optimize, stats

from fedshop.errors import ConfigError
from fedshop.privacy.accounting import (
    RunAccountant,
    epsilon,
    gaussian_step,
    noise_for_epsilon,
    repeated,
)


def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact ε of one Gaussian mechanism with sensitivity 1 and noise σ (Balle & Wang, ICML 2018):
    δ(ε) = Φ(1/(2σ) − εσ) − e^ε Φ(−1/(2σ) − εσ)."""

    def excess(eps: float) -> float:
        a = 1 / (2 * sigma)
        return stats.norm.cdf(a - eps * sigma) - math.exp(eps) * stats.norm.cdf(-a - eps * sigma)

    return optimize.brentq(lambda eps: excess(eps) - delta, 1e-9, 100)


@pytest.mark.parametrize("sigma", [0.8, 1.0, 2.0, 5.0])
def test_single_gaussian_matches_the_closed_form(sigma):
    exact = analytic_gaussian_epsilon(sigma, 1e-5)
    by_pld = epsilon(gaussian_step(sigma), 1e-5, "pld")
    by_rdp = epsilon(gaussian_step(sigma), 1e-5, "rdp")
    # PLD is (near) exact and never optimistic; RDP is a valid but looser upper bound.
    assert exact * 0.999 <= by_pld <= exact * 1.01
    assert exact <= by_rdp <= exact * 1.3


def test_abadi_et_al_setting_is_no_worse_than_the_moments_accountant():
    # Abadi et al. (CCS 2016): q = 0.01, σ = 4, 10,000 steps, δ = 1e-5 -> ε = 1.26 with the moments
    # accountant. RDP with the modern conversion and PLD must be at most that, and not absurdly less.
    event = repeated(gaussian_step(4.0, 0.01), 10_000)
    by_rdp = epsilon(event, 1e-5, "rdp")
    by_pld = epsilon(event, 1e-5, "pld")
    assert 0.9 <= by_rdp <= 1.26
    assert 0.8 <= by_pld <= by_rdp


@pytest.mark.parametrize(
    ("sigma", "q", "steps"), [(1.1, 256 / 60_000, 14_040), (0.8, 0.1, 100), (2.0, 1.0, 50)]
)
def test_rdp_and_pld_agree_within_the_expected_slack(sigma, q, steps):
    event = repeated(gaussian_step(sigma, q), steps)
    by_rdp, by_pld = epsilon(event, 1e-5, "rdp"), epsilon(event, 1e-5, "pld")
    assert by_pld <= by_rdp * 1.01
    assert by_pld >= by_rdp * 0.6


def test_calibrated_noise_is_just_enough():
    z = noise_for_epsilon(2.0, 1e-5, steps=500, sampling_rate=0.05)
    assert epsilon(repeated(gaussian_step(z, 0.05), 500), 1e-5) <= 2.0
    assert epsilon(repeated(gaussian_step(z * 0.97, 0.05), 500), 1e-5) > 2.0


def test_run_accountant_grows_and_can_look_ahead_without_spending():
    run = RunAccountant(delta=1e-5)
    assert run.epsilon() == 0.0
    step = gaussian_step(1.0, 0.1)
    ahead = run.epsilon_if(step)
    assert run.epsilon() == 0.0 and not run.entries
    run.record(1, step)
    assert run.epsilon() == pytest.approx(ahead)
    before = run.epsilon()
    run.record(2, step)
    assert run.epsilon() > before


def test_unknown_accountant_and_unsupported_release_are_clear_errors():
    import dp_accounting as dpa

    with pytest.raises(ConfigError, match="accountant must be one of"):
        epsilon(gaussian_step(1.0), 1e-5, "moments")
    with pytest.raises(ConfigError, match="cannot account this release"):
        epsilon(dpa.UnsupportedDpEvent(), 1e-5, "pld")
