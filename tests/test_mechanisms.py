"""Laplace / Gaussian count releases: noise scale, ε from the library, contribution bounding."""

from __future__ import annotations

import math

import dp_accounting as dpa
import numpy as np
import pytest
import scipy.sparse as sp
from dp_accounting import dp_event
from scipy import optimize, stats

from fedshop.errors import ConfigError
from fedshop.privacy.accounting import epsilon, make_accountant
from fedshop.privacy.mechanisms import (
    NoisyRelease,
    _check_supported,
    bound_contributions,
    bounded_item_counts,
    gaussian_for_epsilon,
    gaussian_mechanism,
    laplace_mechanism,
    release_counts,
    release_item_popularity,
)

DELTA = 1e-5


def analytic_gaussian_delta(eps: float, sigma: float, sensitivity: float) -> float:
    """Exact δ(ε) of one Gaussian mechanism (Balle & Wang, ICML 2018)."""
    a, b = sensitivity / (2 * sigma), eps * sigma / sensitivity
    return stats.norm.cdf(a - b) - math.exp(eps) * stats.norm.cdf(-a - b)


def analytic_gaussian_epsilon(sigma: float, sensitivity: float, delta: float) -> float:
    return optimize.brentq(
        lambda eps: analytic_gaussian_delta(eps, sigma, sensitivity) - delta, 1e-9, 100
    )


def shop(seed: int = 0, n_users: int = 400, n_items: int = 120) -> sp.csr_matrix:
    """Users × items purchases: some users buy nothing, some a few, some most of the catalogue;
    entries are quantities (not 0/1), with some duplicate (user, item) entries left unsummed."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice([0, 1, 2, 3, 5, 8, 20, 60, n_items], size=n_users)
    rows = np.repeat(np.arange(n_users), sizes)
    cols = np.concatenate([rng.choice(n_items, size=s, replace=False) for s in sizes])
    qty = rng.integers(1, 5, size=rows.size).astype(float)
    # Repeat purchases: the same (user, item) again, as a separate COO entry.
    extra = rng.choice(rows.size, size=rows.size // 10, replace=False)
    rows, cols = np.concatenate([rows, rows[extra]]), np.concatenate([cols, cols[extra]])
    qty = np.concatenate([qty, qty[extra]])
    return sp.coo_matrix((qty, (rows, cols)), shape=(n_users, n_items)).tocsr()


def distinct_items(matrix: sp.csr_matrix) -> list[set[int]]:
    return [set(matrix[u].nonzero()[1]) for u in range(matrix.shape[0])]


# ------------------------------------------------------------------------------------- noise scale


def test_laplace_noise_has_scale_sensitivity_over_epsilon():
    rng = np.random.default_rng(1)
    values = np.arange(20_000, dtype=float).reshape(100, 200)
    release = laplace_mechanism(values, l1_sensitivity=3.0, epsilon=0.5, rng=rng)
    assert release.values.shape == values.shape and release.values.dtype == np.float64
    assert release.mechanism == "laplace" and release.sensitivity == 3.0
    assert release.scale == pytest.approx(6.0)
    noise = (release.values - values).ravel()
    assert stats.kstest(noise, stats.laplace(0, 6.0).cdf).pvalue > 0.01
    # The test has the power to see a 10% error in the scale.
    assert stats.kstest(noise, stats.laplace(0, 6.6).cdf).pvalue < 1e-3


def test_gaussian_noise_has_sigma_multiplier_times_sensitivity():
    rng = np.random.default_rng(2)
    values = np.full(20_000, 7.0)
    release = gaussian_mechanism(values, l2_sensitivity=2.0, noise_multiplier=1.5, rng=rng)
    assert release.mechanism == "gaussian" and release.scale == pytest.approx(3.0)
    assert isinstance(release.event, dpa.GaussianDpEvent)
    assert release.event.noise_multiplier == pytest.approx(1.5)
    noise = release.values - values
    assert stats.kstest(noise, stats.norm(0, 3.0).cdf).pvalue > 0.01
    assert stats.kstest(noise, stats.norm(0, 3.3).cdf).pvalue < 1e-3


def test_release_is_repeatable_with_the_same_seed():
    values = np.arange(10.0)
    a = laplace_mechanism(values, 1.0, 1.0, np.random.default_rng(5))
    b = laplace_mechanism(values, 1.0, 1.0, np.random.default_rng(5))
    np.testing.assert_array_equal(a.values, b.values)


# ------------------------------------------------------------------------- ε from the accountants


@pytest.mark.parametrize(("eps", "sensitivity"), [(0.1, 1.0), (1.0, 5.0), (3.0, 2.0)])
def test_laplace_event_gives_epsilon_back(eps, sensitivity):
    release = laplace_mechanism(np.zeros(3), sensitivity, eps, np.random.default_rng(0))
    assert isinstance(release.event, dpa.LaplaceDpEvent)
    assert release.event.noise_multiplier == pytest.approx(1 / eps)
    # PLD is exact for Laplace: pure ε at a negligible δ.
    assert epsilon(release.event, 1e-12, "pld") == pytest.approx(eps, rel=0.01)
    # dp-accounting 0.6's RDP accountant takes Laplace too, as a valid but slightly looser bound.
    by_rdp = epsilon(release.event, 1e-12, "rdp")
    assert eps <= by_rdp <= eps + 0.05


def test_both_accountants_support_laplace():
    event = dpa.LaplaceDpEvent(1.0)
    assert make_accountant("pld").supports(event)
    assert make_accountant("rdp").supports(event)


def test_unsupported_event_is_a_config_error_that_points_to_pld():
    # dp-accounting 0.6's RDP accountant has no discrete Laplace; the check must say what to do.
    with pytest.raises(ConfigError, match="pld"):
        _check_supported(dp_event.DiscreteLaplaceDpEvent(1.0, 1), "rdp")


@pytest.mark.parametrize("eps", [0.5, 1.0])
def test_gaussian_calibrated_with_pld_matches_the_analytic_gaussian(eps):
    release = gaussian_for_epsilon(np.zeros(4), 2.0, eps, DELTA, np.random.default_rng(0), "pld")
    assert release.scale == pytest.approx(release.event.noise_multiplier * 2.0)
    assert epsilon(release.event, DELTA, "pld") <= eps
    # The exact ε of this σ is at most the target and, PLD being tight, within 2% of it.
    exact = analytic_gaussian_epsilon(release.scale, 2.0, DELTA)
    assert eps * 0.98 <= exact <= eps
    assert analytic_gaussian_delta(eps, release.scale, 2.0) <= DELTA * 1.001
    # Just enough noise: 2% less and the exact mechanism is over budget.
    assert analytic_gaussian_delta(eps, release.scale * 0.98, 2.0) > DELTA


def test_gaussian_calibrated_with_rdp_is_valid_and_more_conservative():
    eps = 1.0
    by_rdp = gaussian_for_epsilon(np.zeros(4), 1.0, eps, DELTA, np.random.default_rng(0), "rdp")
    by_pld = gaussian_for_epsilon(np.zeros(4), 1.0, eps, DELTA, np.random.default_rng(0), "pld")
    assert eps * 0.99 <= epsilon(by_rdp.event, DELTA, "rdp") <= eps
    assert analytic_gaussian_epsilon(by_rdp.scale, 1.0, DELTA) <= eps
    assert by_pld.scale < by_rdp.scale < by_pld.scale * 1.2


# ----------------------------------------------------------------------------- contribution bounding


@pytest.mark.parametrize("k", [1, 3, 10])
def test_bounding_keeps_at_most_k_of_each_users_own_items(k):
    train = shop()
    bounded = bound_contributions(train, k, np.random.default_rng(0))
    assert bounded.shape == train.shape
    assert set(np.unique(bounded.data)) <= {1.0}
    before, after = distinct_items(train), distinct_items(bounded)
    for had, kept in zip(before, after, strict=True):
        assert kept <= had
        assert len(kept) == min(len(had), k)  # ≤ k items: all kept; more: exactly k
    counts, l1, l2 = bounded_item_counts(train, k, np.random.default_rng(0))
    assert (l1, l2) == (float(k), pytest.approx(math.sqrt(k)))
    assert counts.dtype == np.float64 and counts.shape == (train.shape[1],)
    np.testing.assert_array_equal(counts, np.asarray(bounded.sum(axis=0)).ravel())


@pytest.mark.parametrize("k", [1, 4, 15])
def test_removing_one_user_moves_the_counts_by_at_most_the_sensitivity(k):
    train = shop(seed=3)
    sizes = np.diff(train.indptr)
    # The heaviest shoppers (whole catalogue), a light one, and one with no purchases.
    users = [*np.argsort(sizes)[-3:], int(np.flatnonzero(sizes == 2)[0]), int(np.argmin(sizes))]
    for user in users:
        # Put the user last, so that on the neighbour without them every other user draws the
        # same random keys: a real adjacent pair, run through the function twice.
        order = np.r_[np.delete(np.arange(train.shape[0]), user), user]
        with_user = train[order]
        full, l1, l2 = bounded_item_counts(with_user, k, np.random.default_rng(7))
        without, _, _ = bounded_item_counts(with_user[:-1], k, np.random.default_rng(7))
        diff = full - without
        assert np.all(diff >= 0)
        assert np.abs(diff).sum() <= l1
        assert np.linalg.norm(diff) <= l2 + 1e-12
        assert np.abs(diff).sum() == min(len(set(train[user].nonzero()[1])), k)
    # Without the cap, one shopper who bought everything moves the counts by the catalogue size.
    unbounded = np.asarray((train[users[-3]] != 0).sum())
    assert unbounded == train.shape[1] > 15


def test_bounding_picks_items_uniformly():
    # 6,000 identical shoppers with 10 items each, k = 3: every item is kept by about 30% of them.
    train = sp.csr_matrix(np.ones((6_000, 10)))
    counts, _, _ = bounded_item_counts(train, 3, np.random.default_rng(11))
    assert counts.sum() == 18_000
    assert stats.chisquare(counts).pvalue > 0.01


def test_bounding_is_repeatable_and_depends_on_the_seed():
    train = shop(seed=4)
    a = bound_contributions(train, 2, np.random.default_rng(9))
    b = bound_contributions(train, 2, np.random.default_rng(9))
    c = bound_contributions(train, 2, np.random.default_rng(10))
    assert (a != b).nnz == 0
    assert (a != c).nnz > 0


def test_bounding_is_fast_for_100k_users():
    import time

    # 100k shoppers with 0–40 items each (about 2M entries), built directly: sp.random is slow.
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 41, size=100_000)
    indptr = np.r_[0, np.cumsum(sizes)]
    train = sp.csr_matrix(
        (np.ones(indptr[-1]), rng.integers(0, 2_000, size=indptr[-1]), indptr),
        shape=(100_000, 2_000),
    )
    train.sum_duplicates()
    start = time.perf_counter()
    counts, _, _ = bounded_item_counts(train, 20, np.random.default_rng(0))
    assert time.perf_counter() - start < 5
    assert counts.sum() == np.minimum(np.diff(train.indptr), 20).sum()


# -------------------------------------------------------------------------------------- releases


def test_item_popularity_laplace_uses_l1_and_ignores_delta():
    train = shop()
    release = release_item_popularity(train, 0.5, 0.0, "laplace", 4, np.random.default_rng(0))
    assert isinstance(release, NoisyRelease) and release.mechanism == "laplace"
    assert release.values.shape == (train.shape[1],)
    assert release.sensitivity == 4.0 and release.scale == pytest.approx(8.0)
    assert epsilon(release.event, 1e-12, "pld") == pytest.approx(0.5, rel=0.01)


def test_item_popularity_gaussian_uses_l2():
    train = shop()
    release = release_item_popularity(
        train, 1.0, DELTA, "gaussian", 4, np.random.default_rng(0), accountant="rdp"
    )
    assert release.mechanism == "gaussian" and release.sensitivity == pytest.approx(2.0)
    assert release.scale == pytest.approx(2.0 * release.event.noise_multiplier)
    assert epsilon(release.event, DELTA, "rdp") <= 1.0
    # Same seed: the bounded counts it noised are the ones bounded_item_counts gives.
    counts, _, _ = bounded_item_counts(train, 4, np.random.default_rng(0))
    assert np.abs(release.values - counts).max() < 10 * release.scale


def test_silo_counts_have_sensitivity_one_and_clamping_is_post_processing():
    counts = np.array([120.0, 3.0, 0.0, 57.0])
    lap = release_counts(counts, 1.0, 0.0, "laplace", np.random.default_rng(0))
    assert lap.sensitivity == 1.0 and lap.scale == pytest.approx(1.0)
    gau = release_counts(counts, 1.0, DELTA, "gaussian", np.random.default_rng(0), "pld")
    assert gau.sensitivity == 1.0
    assert gau.scale == pytest.approx(gau.event.noise_multiplier)
    raw = release_counts(counts, 0.2, 0.0, "laplace", np.random.default_rng(3))
    clamped = release_counts(
        counts, 0.2, 0.0, "laplace", np.random.default_rng(3), clamp_at_zero=True
    )
    assert (raw.values < 0).any()  # noise on the zero count goes negative unclamped
    np.testing.assert_array_equal(clamped.values, np.maximum(raw.values, 0))
    assert clamped.event == raw.event  # no extra privacy cost


# ------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_bad_epsilon_is_a_config_error(bad):
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="ε"):
        laplace_mechanism(np.zeros(2), 1.0, bad, rng)
    with pytest.raises(ConfigError, match="ε"):
        gaussian_for_epsilon(np.zeros(2), 1.0, bad, DELTA, rng)
    with pytest.raises(ConfigError, match="ε"):
        release_counts(np.zeros(2), bad, DELTA, "gaussian", rng)


@pytest.mark.parametrize("bad", [0.0, -2.0, math.nan])
def test_bad_sensitivity_or_noise_is_a_config_error(bad):
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="sensitivity"):
        laplace_mechanism(np.zeros(2), bad, 1.0, rng)
    with pytest.raises(ConfigError, match="sensitivity"):
        gaussian_mechanism(np.zeros(2), bad, 1.0, rng)
    with pytest.raises(ConfigError, match="noise multiplier"):
        gaussian_mechanism(np.zeros(2), 1.0, bad, rng)


def test_other_bad_inputs_are_config_errors():
    rng, train = np.random.default_rng(0), shop()
    with pytest.raises(ConfigError, match="mechanism"):
        release_counts(np.zeros(2), 1.0, DELTA, "exponential", rng)
    with pytest.raises(ConfigError, match="mechanism"):
        release_item_popularity(train, 1.0, DELTA, "Laplace", 3, rng)
    for k in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="max_items_per_user"):
            bounded_item_counts(train, k, rng)
    for delta in (0.0, 1.0, -1e-5):
        with pytest.raises(ConfigError, match="δ"):
            release_item_popularity(train, 1.0, delta, "gaussian", 3, rng)
    with pytest.raises(ConfigError, match="accountant"):
        release_counts(np.zeros(2), 1.0, DELTA, "laplace", rng, accountant="moments")
    with pytest.raises(ConfigError, match="accountant"):
        gaussian_for_epsilon(np.zeros(2), 1.0, 1.0, DELTA, rng, accountant="moments")
    with pytest.raises(ConfigError, match="finite"):
        laplace_mechanism(np.array([1.0, np.nan]), 1.0, 1.0, rng)
