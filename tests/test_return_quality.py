"""The merchandiser's quality view (`privacy/return_quality.py`): interval coverage on simulated
counts with known rates, the ledger's refusal, that only the noisy release leaves a storefront, and
the flagged items on the real Online Retail data."""

import math

import numpy as np
import pytest

from fedshop.data.datasets import load_cleaned_retail as load_cleaned
from fedshop.data.returns import ReturnsSettings, labelled_lines
from fedshop.privacy import return_quality as rq
from fedshop.privacy.return_quality import (
    Pairs,
    QualitySettings,
    bounded_counts,
    estimate_rates,
    overall_rate,
    quality_view,
)
from fedshop.storage.ledger import BudgetExceededError, Ledger


def simulate(weighting, seed=0, items=3000):
    """Three storefronts (one large, two small) with known per-item return rates, released with
    Gaussian noise of the sizes ε = 1 gives on Online Retail."""
    rng = np.random.default_rng(seed)
    # Most items at the shop's usual rate, one in ten returned far more often.
    rate = np.where(rng.random(items) < 0.9, 0.015, rng.uniform(0.03, 0.15, items))
    sold = np.stack(
        [rng.integers(200, 3000, items), rng.integers(0, 100, items), rng.integers(0, 30, items)]
    ).astype(float)
    returned = rng.binomial(sold.astype(int), rate).astype(float)
    sold_scale, returned_scale = np.array([80.0, 80.0, 80.0]), np.array([8.0, 8.0, 8.0])
    noisy_sold = sold + sold_scale[:, None] * rng.standard_normal(sold.shape)
    noisy_returned = returned + returned_scale[:, None] * rng.standard_normal(sold.shape)
    totals = overall_rate(
        sold.sum(1) + 500 * rng.standard_normal(3),
        returned.sum(1) + 40 * rng.standard_normal(3),
        np.full(3, 500.0),
        np.full(3, 40.0),
    )
    settings = QualitySettings(weighting=weighting, tested_items=items)
    estimates = estimate_rates(
        noisy_sold, noisy_returned, sold_scale, returned_scale, totals, settings
    )
    return rate, estimates, returned.sum() / sold.sum()


@pytest.mark.parametrize("weighting", ["precision", "sum"])
def test_intervals_cover_known_rates(weighting):
    rate, estimates, true_overall = simulate(weighting)
    tested = estimates.eligible
    assert tested.sum() > 2500
    covered = (estimates.low[tested] <= rate[tested]) & (rate[tested] <= estimates.high[tested])
    assert 0.86 <= covered.mean() <= 0.95
    assert abs(estimates.overall - true_overall) < 0.1 * true_overall
    # Items at or below the threshold are flagged at most about (1 − level)/2 of the time.
    null = tested & (rate <= estimates.threshold)
    assert estimates.flagged[null].mean() <= 0.07
    # and Benjamini-Hochberg's confirmed items are mostly real.
    confirmed = estimates.confirmed
    if confirmed.sum():
        assert (rate[confirmed] <= estimates.threshold).mean() <= 0.2


def test_precision_weighting_measures_more_than_the_plain_sum():
    _, precision, _ = simulate("precision", seed=1)
    _, plain, _ = simulate("sum", seed=1)
    width = np.nanmedian(precision.high - precision.low)
    assert width < np.nanmedian(plain.high - plain.low)


@pytest.fixture(scope="module")
def lines():
    labelled, _ = labelled_lines(load_cleaned(), ReturnsSettings())
    return labelled


def test_one_customer_moves_the_release_by_at_most_the_sensitivity():
    settings = QualitySettings(max_items=5, max_returned=2)
    item_ids = [f"i{k}" for k in range(12)]
    heavy = ["heavy"] * 12
    others = ["a", "a", "b", "b", "b"]
    pairs = Pairs(
        np.array(others + heavy), np.array([0, 1, 0, 2, 3, *range(12)]),
        np.array([True, False, False, True, True] + [True] * 12),
    )  # fmt: skip
    without = Pairs(pairs.customer_ids[:5], pairs.items[:5], pairs.returned[:5])
    w, a, b = settings.sold_weight, settings.total_sold_weight, settings.total_returned_weight

    def vector(p):
        sold, returned = bounded_counts(p, item_ids, settings)
        return np.concatenate([w * sold, returned, [a * sold.sum(), b * returned.sum()]])

    change = np.linalg.norm(vector(pairs) - vector(without))
    assert change == pytest.approx(settings.sensitivity)  # the heavy customer reaches the bound
    sold, returned = bounded_counts(pairs, item_ids, settings)
    assert sold.sum() == 2 + 3 + 5 and returned.sum() == 1 + 2 + 2


def test_only_noisy_counts_leave_a_storefront(lines, monkeypatch):
    calls = []
    real = rq.gaussian_mechanism

    def spy(values, sensitivity, noise_multiplier, rng):
        release = real(values, sensitivity, noise_multiplier, rng)
        calls.append((np.array(values), release))
        return release

    monkeypatch.setattr(rq, "gaussian_mechanism", spy)
    view = quality_view(lines, epsilon=1.0, noise_seed=5)
    assert len(calls) == len(view.storefronts) == len(view.releases)
    n_items = lines.loc[lines["period"] != "unlabelled", "StockCode"].nunique()
    settings = QualitySettings()
    for (values, release), mine in zip(calls, view.releases, strict=True):
        # One vector per storefront, all of it noised at the sensitivity charged for.
        assert len(values) == 2 * n_items + 2
        assert release.sensitivity == pytest.approx(settings.sensitivity)
        noise = (release.values - values)[:n_items] / settings.sold_weight
        assert np.std(noise) == pytest.approx(mine.scales["sold"], rel=0.1)
        np.testing.assert_array_equal(mine.sold, release.values[:n_items] / settings.sold_weight)
        np.testing.assert_array_equal(mine.returned, release.values[n_items : 2 * n_items])
    # Only arrays of numbers and the accounting travel (no customer ids, no exact counts).
    assert set(rq.QualityRelease.__dataclass_fields__) == {
        "sold", "returned", "total_sold", "total_returned", "scales", "noise_multiplier",
        "sensitivity", "event",
    }  # fmt: skip
    # Everything reported is computed from the releases alone.
    again = estimate_rates(
        np.stack([r.sold for r in view.releases]),
        np.stack([r.returned for r in view.releases]),
        np.array([r.scales["sold"] for r in view.releases]),
        np.array([r.scales["returned"] for r in view.releases]),
        view.overall_rate,
        settings,
    )
    np.testing.assert_allclose(np.sort(again.rate[again.eligible]), np.sort(view.items["rate"]))


def test_noise_is_secret_unless_seeded(lines):
    first = quality_view(lines, epsilon=1.0)
    second = quality_view(lines, epsilon=1.0)
    assert not np.array_equal(first.releases[0].returned, second.releases[0].returned)
    assert first.report["noise_seed_known"] is False
    seeded = [quality_view(lines, epsilon=1.0, noise_seed=3) for _ in range(2)]
    np.testing.assert_array_equal(seeded[0].releases[0].returned, seeded[1].releases[0].returned)


def test_the_ledger_pays_first_and_refuses_when_spent(lines, tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    storefronts = sorted(lines["silo"].unique())
    with pytest.raises(BudgetExceededError, match="no privacy budget"):
        quality_view(lines, epsilon=1.0, ledger=ledger, noise_seed=1)
    for name in storefronts:
        ledger.set_budget(name, "online-retail", 1.5, 1e-4)
    view = quality_view(lines, epsilon=1.0, ledger=ledger, noise_seed=1)
    for name in storefronts:
        balance = ledger.balance(name, "online-retail")
        assert balance.spent_epsilon == pytest.approx(view.epsilon)
        assert balance.spent_delta == pytest.approx(view.delta)
        assert balance.runs == 1
    with pytest.raises(BudgetExceededError, match="nothing was released"):
        quality_view(lines, epsilon=1.0, ledger=ledger, noise_seed=1)
    assert all(ledger.balance(n, "online-retail").runs == 1 for n in storefronts)
    assert math.isclose(view.epsilon, 1.0, rel_tol=1e-6)


def test_flagged_items_on_real_data_are_plausible(lines):
    settings = QualitySettings()
    view = quality_view(lines, epsilon=1.0, noise_seed=1, settings=settings)
    assert 0.01 < view.overall_rate < 0.02
    assert view.report["tested_items"] == settings.tested_items
    flagged = view.flagged
    # The regency cake stand, the shop's most returned item, is flagged.
    assert "22423" in set(flagged["item_id"])
    assert 1 <= len(flagged) <= 10
    # Every flagged item's noise-free rate (the same bounded counts, pooled) is above the shop's.
    labelled = lines[lines["period"] != "unlabelled"]
    item_ids = sorted(labelled["StockCode"].unique())
    index = {code: i for i, code in enumerate(item_ids)}
    sold, returned = np.zeros(len(item_ids)), np.zeros(len(item_ids))
    for name in view.storefronts:
        s, r = bounded_counts(
            rq.pairs_of(labelled[labelled["silo"] == name], index), item_ids, settings
        )
        sold, returned = sold + s, returned + r
    exact_overall = returned.sum() / sold.sum()
    assert view.overall_rate == pytest.approx(exact_overall, rel=0.15)
    for code in flagged["item_id"]:
        assert returned[index[code]] / sold[index[code]] > 2 * exact_overall
