"""Accuracy of demand forecasts over the test weeks: WAPE, MASE and the pinball (quantile) loss,
overall, per country and for smooth vs intermittent series. Pure numpy.

Inputs are per series: point forecasts and actuals (n_series, H), the training weeks (n_series, T)
for MASE's scale and the intermittency class, and each series' country.

- WAPE = sum |y - ŷ| / sum y over all series and test weeks of the group (NaN when sum y = 0).
- MASE of a series = mean |y - ŷ| over its test weeks / mean |y_t - y_(t-1)| over its training weeks
  (the in-sample one-step naive error, Hyndman & Koehler 2006). A series whose training weeks never
  change (zero denominator) has no MASE: it is left out of the mean and counted in `mase_undefined`.
  A group's MASE is the mean over its series.
- Intermittent (Syntetos & Boylan 2005): ADI, the mean interval between training weeks with a sale
  (T / number of weeks with a sale), > 1.32. The other series are "smooth" here; the CV² split of
  their four classes is not used.
- Pinball loss of quantile q at level τ: max(τ (y - q), (τ - 1)(y - q)); `pinball` reports its mean
  per level and over levels, and `scaled_pinball` = 2 * sum of the mean-over-levels loss / sum y
  (the weighted quantile loss, which equals WAPE for the median alone).
"""

from __future__ import annotations

import numpy as np

from fedshop.eval.inventory import InventorySettings, inventory_report

ADI_THRESHOLD = 1.32


def wape(forecast: np.ndarray, actual: np.ndarray) -> float:
    total = float(np.sum(actual))
    return float(np.sum(np.abs(actual - forecast)) / total) if total > 0 else float("nan")


def mase_denominator(train: np.ndarray) -> np.ndarray:
    """Per series, the mean absolute one-step change over the training weeks."""
    train = np.asarray(train, dtype=np.float64)
    return np.abs(np.diff(train, axis=1)).mean(axis=1)


def mase_per_series(forecast: np.ndarray, actual: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Per series MASE; NaN where the denominator is zero."""
    mae = np.abs(np.asarray(actual, float) - np.asarray(forecast, float)).mean(axis=1)
    denominator = mase_denominator(train)
    out = np.full(len(mae), np.nan)
    ok = denominator > 0
    out[ok] = mae[ok] / denominator[ok]
    return out


def adi(train: np.ndarray) -> np.ndarray:
    """Average demand interval: training weeks per week with a sale (inf when none sold)."""
    sales = (np.asarray(train) > 0).sum(axis=1)
    with np.errstate(divide="ignore"):
        return np.where(sales > 0, train.shape[1] / np.maximum(sales, 1), np.inf)


def is_intermittent(train: np.ndarray) -> np.ndarray:
    return adi(train) > ADI_THRESHOLD


def pinball(quantiles: np.ndarray, actual: np.ndarray, levels: np.ndarray) -> dict[str, float]:
    """Mean pinball loss per level and over levels. quantiles: (n, H, Q); actual: (n, H)."""
    levels = np.asarray(levels, dtype=np.float64)
    diff = np.asarray(actual, float)[..., None] - np.asarray(quantiles, float)
    loss = np.maximum(levels * diff, (levels - 1) * diff)
    out = {f"q{level:g}": float(loss[..., i].mean()) for i, level in enumerate(levels)}
    out["mean"] = float(loss.mean())
    return out


def scaled_pinball(quantiles: np.ndarray, actual: np.ndarray, levels: np.ndarray) -> float:
    levels = np.asarray(levels, dtype=np.float64)
    diff = np.asarray(actual, float)[..., None] - np.asarray(quantiles, float)
    loss = np.maximum(levels * diff, (levels - 1) * diff).mean(axis=-1)
    total = float(np.sum(actual))
    return float(2 * loss.sum() / total) if total > 0 else float("nan")


def _group(
    forecast: np.ndarray,
    actual: np.ndarray,
    mase: np.ndarray,
    rows: np.ndarray,
    quantiles: np.ndarray | None,
    levels: np.ndarray | None,
) -> dict:
    defined = rows & ~np.isnan(mase)
    out = {
        "series": int(rows.sum()),
        "wape": wape(forecast[rows], actual[rows]),
        "mase": float(mase[defined].mean()) if defined.any() else float("nan"),
        "mase_undefined": int((rows & np.isnan(mase)).sum()),
        "units": float(actual[rows].sum()),
    }
    if quantiles is not None:
        out["scaled_pinball"] = scaled_pinball(quantiles[rows], actual[rows], levels)
    return out


def forecast_metrics(
    forecast: np.ndarray,
    actual: np.ndarray,
    train: np.ndarray,
    country: np.ndarray,
    quantiles: np.ndarray | None = None,
    levels: np.ndarray | None = None,
) -> dict:
    """WAPE, MASE (and the scaled pinball loss when quantiles (n, H, Q) at `levels` are given)
    overall, per country, and for smooth and intermittent series."""
    forecast = np.asarray(forecast, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if forecast.shape != actual.shape or len(train) != len(actual) or len(country) != len(actual):
        raise ValueError("forecast, actual, train and country must describe the same series")
    if not np.isfinite(forecast).all():
        raise ValueError("a forecast is not finite")
    mase = mase_per_series(forecast, actual, train)
    country = np.asarray(country, dtype=object)
    sparse = is_intermittent(train)
    everyone = np.ones(len(actual), dtype=bool)

    def group(rows: np.ndarray) -> dict:
        return _group(forecast, actual, mase, rows, quantiles, levels)

    return {
        "overall": group(everyone),
        "per_country": {c: group(country == c) for c in dict.fromkeys(country)},
        "smooth": group(~sparse),
        "intermittent": group(sparse),
        "rules": {
            "intermittent": f"ADI > {ADI_THRESHOLD} over the training weeks (Syntetos-Boylan)",
            "mase": "series with a constant training history are left out (mase_undefined)",
        },
    }


def evaluate_demand(
    point: np.ndarray,
    quantiles: np.ndarray,
    levels: np.ndarray,
    actual: np.ndarray,
    train: np.ndarray,
    country: np.ndarray,
    inventory: InventorySettings | None = None,
) -> dict:
    """Accuracy (`forecast_metrics`) and the inventory policy's costs (`inventory_report`) of one
    method's forecasts: point (n, H) and quantiles (n, H, Q) at `levels`, in units."""
    return {
        "accuracy": forecast_metrics(point, actual, train, country, quantiles, levels),
        "pinball": pinball(quantiles, actual, levels),
        "inventory": inventory_report(quantiles, levels, actual, country, inventory),
    }
