"""Demand forecasting: the weekly table (no test week reaches a training input), the forecast metrics
and the inventory simulation on hand-computed cases, and the baselines."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from fedshop.data.datasets import load_cleaned_retail as load_cleaned
from fedshop.data.demand import DemandSettings, build_table, build_weekly
from fedshop.eval.forecast import (
    adi,
    forecast_metrics,
    is_intermittent,
    mase_per_series,
    pinball,
    scaled_pinball,
    wape,
)
from fedshop.eval.forecast_baselines import (
    LEVELS,
    residual_quantiles,
    seasonal_naive,
    seasonal_naive_point,
)
from fedshop.eval.inventory import InventorySettings, inventory_report, quantile_at, simulate

SETTINGS = DemandSettings()


@pytest.fixture(scope="module")
def cleaned():
    return load_cleaned()


@pytest.fixture(scope="module")
def weekly(cleaned):
    return build_weekly(cleaned, SETTINGS)


@pytest.fixture(scope="module")
def table(weekly):
    return build_table(weekly, SETTINGS)


# --- the table ---------------------------------------------------------------------------------


def test_weeks_are_complete_and_the_last_partial_week_is_dropped(weekly):
    report = weekly.report
    assert report["weeks"] == 53 and report["train_weeks"] == 45
    assert report["first_week"] == "2010-12-01" and report["first_test_week"] == "2011-10-12"
    assert report["partial_week_dropped"]["from"] == "2011-12-07"
    assert report["partial_week_dropped"]["lines"] > 0
    assert weekly.units.shape == (report["series_kept"], 53)
    # Every kept series sold in at least min_sales_weeks training weeks.
    assert ((weekly.train > 0).sum(1) >= SETTINGS.min_sales_weeks).all()
    # Everything dropped is counted.
    assert report["series_all"] == (
        report["series_kept"]
        + report["series_no_training_sale"]
        + report["series_too_few_sales_weeks"]
        + report["series_dropped_small_countries"]
    )
    assert sum(report["silos"].values()) == report["series_kept"]


def test_table_shapes_and_targets(table, weekly):
    H, L = SETTINGS.horizon, SETTINGS.lags
    assert table.kind == "quantile" and table.horizon == H
    assert table.silo_names == weekly.silo_names
    origins = weekly.n_train - H - L + 1
    for silo in table.silos:
        n = int((weekly.silo == silo.index).sum())
        assert len(silo.train) == n * origins and len(silo.test) == n
        assert silo.train.target.shape == (n * origins, H)
        # The test target is the test weeks over the series' scale.
        s, scale = silo.test.extra["series"], silo.test.extra["scale"]
        np.testing.assert_allclose(
            silo.test.target * scale[:, None], weekly.test[s], rtol=1e-5, atol=1e-3
        )
        np.testing.assert_allclose(scale, weekly.train[s].mean(1))
        assert set(silo.train.extra["series"]) == set(s)
    assert (table.pooled("test").categorical > 0).all()  # no unknown code among kept series


def _perturb_test_weeks(cleaned, first_test_day: pd.Timestamp):
    """The same data with every purchase and cancellation from the test weeks on changed."""
    rng = np.random.default_rng(0)
    purchases, returns = cleaned.purchases.copy(), cleaned.returns.copy()
    late = purchases["InvoiceDate"] >= first_test_day
    purchases.loc[late, "Quantity"] = purchases.loc[late, "Quantity"] * 3 + rng.integers(
        1, 50, int(late.sum())
    )
    # Cancel, in the test weeks, training purchases: with same-week matching they must not count.
    early = purchases[~late].sample(500, random_state=0)
    fake = early.assign(
        InvoiceNo="C999999",
        Quantity=-early["Quantity"],
        InvoiceDate=first_test_day + pd.Timedelta(days=1),
    )
    late_returns = returns["InvoiceDate"] >= first_test_day
    returns = pd.concat([returns[~late_returns], fake], ignore_index=True)
    return dataclasses.replace(cleaned, purchases=purchases, returns=returns)


def test_no_test_week_reaches_a_training_input(cleaned, weekly, table):
    first_test_day = weekly.week_starts[weekly.n_train]
    changed = _perturb_test_weeks(cleaned, first_test_day)
    weekly2 = build_weekly(changed, SETTINGS)
    table2 = build_table(weekly2, SETTINGS)
    np.testing.assert_array_equal(weekly2.train, weekly.train)
    assert not np.array_equal(weekly2.test, weekly.test)  # the perturbation did change the test
    assert table2.cardinalities == table.cardinalities
    for a, b in zip(table.silos, table2.silos, strict=True):
        for name in ("categorical", "numeric", "target"):
            np.testing.assert_array_equal(getattr(a.train, name), getattr(b.train, name))
        for name in ("series", "scale"):
            np.testing.assert_array_equal(a.train.extra[name], b.train.extra[name])
            np.testing.assert_array_equal(a.test.extra[name], b.test.extra[name])
        np.testing.assert_array_equal(a.test.categorical, b.test.categorical)
        np.testing.assert_array_equal(a.test.numeric, b.test.numeric)
    assert not np.array_equal(table.pooled("test").target, table2.pooled("test").target)


def test_training_targets_lie_in_training_weeks(table, weekly):
    # Each training target row equals training weeks of its series: the last origin's target
    # ends at the last training week.
    silo = table.silos[0]
    series, scale = silo.train.extra["series"], silo.train.extra["scale"]
    last = np.flatnonzero(series == series[0])[-1]
    np.testing.assert_allclose(
        silo.train.target[last] * scale[last],
        weekly.train[series[0], -SETTINGS.horizon :],
        rtol=1e-5,
    )


# --- metrics -----------------------------------------------------------------------------------


def test_wape_mase_pinball_by_hand():
    actual = np.array([[2.0, 0.0, 4.0], [1.0, 1.0, 1.0]])
    forecast = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 3.0]])
    train = np.array([[0.0, 2.0, 0.0, 2.0], [3.0, 3.0, 3.0, 3.0]])
    # |err| = 1 + 1 + 3 + 0 + 0 + 2 = 7 over 9 units.
    assert wape(forecast, actual) == pytest.approx(7 / 9)
    # Series 0: MAE 5/3 over mean |diff| 2 -> 5/6; series 1: constant history -> undefined.
    mase = mase_per_series(forecast, actual, train)
    assert mase[0] == pytest.approx(5 / 6) and np.isnan(mase[1])
    np.testing.assert_allclose(adi(train), [2.0, 1.0])
    np.testing.assert_array_equal(is_intermittent(train), [True, False])
    m = forecast_metrics(forecast, actual, train, np.array(["A", "B"]))
    assert m["overall"]["mase"] == pytest.approx(5 / 6) and m["overall"]["mase_undefined"] == 1
    assert m["per_country"]["A"]["wape"] == pytest.approx(5 / 6)
    assert m["per_country"]["B"]["wape"] == pytest.approx(2 / 3)
    assert m["intermittent"]["series"] == 1 and m["smooth"]["wape"] == pytest.approx(2 / 3)
    # Pinball: y = 2, q = (1, 3) at levels (0.2, 0.8): 0.2 * 1 = 0.2 and 0.2 * 1 = 0.2.
    q = np.array([[[1.0, 3.0]]])
    loss = pinball(q, np.array([[2.0]]), np.array([0.2, 0.8]))
    assert loss["q0.2"] == pytest.approx(0.2) and loss["q0.8"] == pytest.approx(0.2)
    # The median alone: scaled pinball = WAPE.
    med = forecast[..., None]
    assert scaled_pinball(med, actual, np.array([0.5])) == pytest.approx(7 / 9)


# --- inventory ---------------------------------------------------------------------------------


def test_quantile_interpolation():
    q = np.array([[[0.0, 10.0, 20.0]]])
    levels = np.array([0.1, 0.5, 0.9])
    assert quantile_at(q, levels, 0.8)[0, 0] == pytest.approx(17.5)
    assert quantile_at(q, levels, 0.95)[0, 0] == 20.0 and quantile_at(q, levels, 0.05)[0, 0] == 0


def test_inventory_by_hand_lead_time_zero():
    # Order up to 5 each week (the 0.8-quantile, h = 1, b = 4); demand 3, 7, 5 and start empty:
    # week 1: order 5, serve 3, 2 left (hold 2); week 2: order 3, serve 5 of 7, lose 2;
    # week 3: order 5, serve 5, 0 left. Holding 2, lost 2 units (cost 8), fill 13 / 15.
    levels = np.array([0.5, 0.8])
    q = np.array([[[4.0, 5.0]] * 3])
    demand = np.array([[3.0, 7.0, 5.0]])
    sim = simulate(q, levels, demand)
    np.testing.assert_allclose(sim["order"][0], [5, 3, 5])
    np.testing.assert_allclose(sim["end"][0], [2, 0, 0])
    report = inventory_report(q, levels, demand, np.array(["A"]))
    overall = report["overall"]
    assert overall["holding_cost"] == 2 and overall["stockout_cost"] == 8
    assert overall["total_cost"] == 10 and overall["fill_rate"] == pytest.approx(13 / 15)
    assert report["per_country"]["A"] == overall


def test_inventory_by_hand_lead_time_one():
    # Level = two weeks' quantiles = 10; start with 5 on hand (the first week's level), empty
    # pipeline. Week 1: position 5, order 5 (arrives week 2), serve 3 -> 2 left.
    # Week 2: position 2 + 5 = 7, order 3; 5 arrives -> 7 on hand, serve 7 -> 0 left.
    # Week 3: position 0 + 3 = 3, order 7; 3 arrives, serve 3 of 5, lose 2.
    levels = np.array([0.8])
    q = np.full((1, 3, 1), 5.0)
    demand = np.array([[3.0, 7.0, 5.0]])
    sim = simulate(q, levels, demand, InventorySettings(lead_time=1))
    np.testing.assert_allclose(sim["order"][0], [5, 3, 7])
    np.testing.assert_allclose(sim["available"][0], [5, 7, 3])
    np.testing.assert_allclose(sim["lost"][0], [0, 0, 2])
    np.testing.assert_allclose(sim["end"][0], [2, 0, 0])


# --- baselines ---------------------------------------------------------------------------------


def test_seasonal_naive_by_hand():
    history = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    np.testing.assert_array_equal(seasonal_naive_point(history, 6, 4), [[3, 4, 5, 6, 3, 4]])
    np.testing.assert_array_equal(seasonal_naive_point(history, 2, 1), [[6, 6]])
    q = residual_quantiles(np.array([[1.0, 2.0]]), np.array([[-3.0, 0.0, 1.0]]), (0.0, 0.5, 1.0))
    np.testing.assert_allclose(q[0], [[0, 1, 2], [0, 2, 3]])


def test_baselines_on_the_real_series(weekly):
    H = SETTINGS.horizon
    f = seasonal_naive(weekly.train, H)
    n = len(weekly.units)
    assert f.point.shape == (n, H) and f.quantiles.shape == (n, H, len(LEVELS))
    assert np.isfinite(f.quantiles).all() and (f.quantiles >= 0).all()
    assert (np.diff(f.quantiles, axis=-1) >= 0).all()
    m = forecast_metrics(f.point, weekly.test, weekly.train, weekly.series_country)
    assert 0 < m["overall"]["wape"] < 5
    assert set(m["per_country"]) == set(weekly.silo_names)


def test_best_statistical_against_seasonal_naive_on_a_few_series(weekly):
    pytest.importorskip("statsforecast", reason="statsforecast is not installed")
    from fedshop.eval.forecast_baselines import best_statistical

    H = SETTINGS.horizon
    # The six best-selling series: smooth, so every candidate is tried.
    rows = np.argsort(-weekly.train.sum(1))[:6]
    train, test = weekly.train[rows], weekly.test[rows]
    f = best_statistical(train, H, workers=1)
    assert f.point.shape == (6, H) and f.quantiles.shape == (6, H, len(LEVELS))
    assert np.isfinite(f.quantiles).all() and (np.diff(f.quantiles, axis=-1) >= 0).all()
    assert set(f.chosen) <= {"AutoETS", "AutoARIMA", "CrostonOptimized"}
    parallel = best_statistical(train, H, workers=2)  # the worker processes give the same
    np.testing.assert_allclose(parallel.quantiles, f.quantiles)
    # On a flat series, the statistical models' forecast is close to its level.
    flat = np.full((1, 40), 10.0) + np.tile([0.5, -0.5], 20)
    g = best_statistical(flat, 4, workers=1)
    np.testing.assert_allclose(g.point, 10.0, atol=0.6)
    # Chosen on the validation window, the best statistical model is no worse there than the
    # seasonal naive by more than a modest factor on the test weeks of these big series.
    naive = seasonal_naive(train, H)
    assert wape(f.point, test) < 1.5 * wape(naive.point, test)


def test_predictions_in_units(table, weekly):
    from fedshop.data.demand import predictions_in_units

    # Predicting the (scaled) targets gives back the test weeks in units, in the weekly order.
    quantiles = [np.repeat(s.test.target[..., None], 3, axis=-1) for s in table.silos]
    units = predictions_in_units(table, quantiles)
    assert units.shape == (len(weekly.units), SETTINGS.horizon, 3)
    np.testing.assert_allclose(units[..., 1], weekly.test, rtol=1e-5, atol=1e-3)
