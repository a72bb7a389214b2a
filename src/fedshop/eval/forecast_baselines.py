"""Baseline demand forecasts per series, from its own training weeks only: point forecasts (n, H)
and quantile forecasts (n, H, Q) at `LEVELS`, in units.

- `seasonal_naive` repeats the last `season` training weeks (default 4: week t + k gets the units
  of the week 4 weeks before it, cycling). The yearly season (52 weeks) is not available: after
  holding out 8 test weeks the history has 45 weeks. Four weeks (a month of a shop's reorders)
  is a stated choice, not tuned on any data; `season=1` is the last-value naive.
- `best_statistical` chooses per series, by MAE on a validation window of the last `validation`
  training weeks (fit on the weeks before it; never a test week), among statsforecast's
  AutoETS (additive or multiplicative error, no season), AutoARIMA (no season) and
  CrostonOptimized for smooth series, and AutoETS, CrostonOptimized, CrostonClassic, ADIDA and
  IMAPA for intermittent ones (ADI > 1.32 over the training weeks: ARIMA suits them poorly and is
  by far the slowest, ~0.12 s a series). The winner is refit on all training weeks to forecast the
  test weeks; if it fails (non-finite), the next best does; if all fail, the mean training week.
  Negative forecasts (ETS, ARIMA) are clipped at zero.
- Quantiles, for both: the point forecast plus the empirical quantiles of the same method's
  errors (actual - forecast) on the validation window, fit on the weeks before it (out-of-sample,
  all horizons pooled: `validation` errors a series), clipped at zero. The same rule for every
  method, including those (Croston, ADIDA, IMAPA) that have no prediction intervals of their own.
"""

from __future__ import annotations

import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from fedshop.eval.forecast import is_intermittent

LEVELS = (0.1, 0.25, 0.5, 0.75, 0.9)
SMOOTH_MODELS = ("AutoETS", "AutoARIMA", "CrostonOptimized")
INTERMITTENT_MODELS = ("AutoETS", "CrostonOptimized", "CrostonClassic", "ADIDA", "IMAPA")


@dataclass
class BaselineForecast:
    name: str
    point: np.ndarray  # (n, H) units
    quantiles: np.ndarray  # (n, H, Q) units, non-decreasing along Q
    levels: np.ndarray  # (Q,)
    seconds: float
    chosen: np.ndarray | None = None  # best_statistical: the model of each series
    notes: dict = field(default_factory=dict)


def seasonal_naive_point(history: np.ndarray, horizon: int, season: int = 4) -> np.ndarray:
    """Repeat each series' last `season` weeks over the horizon. history: (n, T)."""
    history = np.asarray(history, dtype=np.float64)
    last = history[:, -season:]
    return np.tile(last, (1, -(-horizon // season)))[:, :horizon]


def residual_quantiles(point: np.ndarray, errors: np.ndarray, levels=LEVELS) -> np.ndarray:
    """point (n, H) plus, per series, the quantiles of its errors (n, V), clipped at zero."""
    shift = np.quantile(np.asarray(errors, dtype=np.float64), levels, axis=1).T  # (n, Q)
    return np.maximum(np.asarray(point, dtype=np.float64)[:, :, None] + shift[:, None, :], 0.0)


def seasonal_naive(
    train: np.ndarray, horizon: int, levels=LEVELS, season: int = 4, validation: int | None = None
) -> BaselineForecast:
    start = time.perf_counter()
    train = np.asarray(train, dtype=np.float64)
    V = validation or horizon
    point = seasonal_naive_point(train, horizon, season)
    errors = train[:, -V:] - seasonal_naive_point(train[:, :-V], V, season)
    quantiles = residual_quantiles(point, errors, levels)
    return BaselineForecast(
        "seasonal_naive",
        point,
        quantiles,
        np.asarray(levels, dtype=np.float64),
        time.perf_counter() - start,
        notes={"season_weeks": season, "validation_weeks": V},
    )


def _model(name: str):
    from statsforecast import models

    if name in ("AutoETS", "AutoARIMA"):
        return getattr(models, name)(season_length=1)
    return getattr(models, name)()


def _forecast(name: str, y: np.ndarray, h: int) -> np.ndarray | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = np.asarray(_model(name).forecast(y=y, h=h)["mean"], dtype=np.float64)
    except Exception:  # a model that cannot fit this series (e.g. all zeros) is not a candidate
        return None
    return out if out.shape == (h,) and np.isfinite(out).all() else None


def _fit_series(args: tuple) -> tuple[str, np.ndarray, np.ndarray]:
    """(model, validation forecast, test forecast) of one series."""
    y, horizon, V, candidates = args
    fit, held = y[:-V], y[-V:]
    scored = []
    for rank, name in enumerate(candidates):
        f = _forecast(name, fit, V)
        if f is not None:
            scored.append((float(np.abs(held - f).mean()), rank, name, f))
    for _, _, name, f_val in sorted(scored, key=lambda s: s[:2]):
        f_test = _forecast(name, y, horizon)
        if f_test is not None:
            return name, f_val, f_test
    return "mean", np.full(V, fit.mean()), np.full(horizon, y.mean())


def _fit_chunk(chunk: list[tuple]) -> list[tuple]:
    return [_fit_series(args) for args in chunk]


def best_statistical(
    train: np.ndarray,
    horizon: int,
    levels=LEVELS,
    validation: int | None = None,
    workers: int = 2,
    smooth_models: tuple[str, ...] = SMOOTH_MODELS,
    intermittent_models: tuple[str, ...] = INTERMITTENT_MODELS,
) -> BaselineForecast:
    """Per series the statsforecast model with the lowest validation MAE, refit on all training
    weeks. Needs statsforecast (see the README for its install line)."""
    try:  # fail here, not in a worker
        import statsforecast.models  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"best_statistical needs statsforecast ({exc}); install it without its declared "
            "dependencies, which pin pandas < 3 (see the README)"
        ) from exc

    start = time.perf_counter()
    train = np.asarray(train, dtype=np.float64)
    V = validation or horizon
    sparse = is_intermittent(train)
    jobs = [
        (y, horizon, V, intermittent_models if s else smooth_models)
        for y, s in zip(train, sparse, strict=True)
    ]
    if workers > 1 and len(jobs) > 1:
        size = -(-len(jobs) // (workers * 8))
        chunks = [jobs[i : i + size] for i in range(0, len(jobs), size)]
        import multiprocessing

        # Fork where there is one: no re-import of the caller's main module (which spawn needs
        # guarded); the workers run only numpy and statsforecast, never torch.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            results = [r for part in pool.map(_fit_chunk, chunks) for r in part]
    else:
        results = _fit_chunk(jobs)
    chosen = np.array([r[0] for r in results], dtype=object)
    f_val = np.maximum(np.stack([r[1] for r in results]), 0.0)
    point = np.maximum(np.stack([r[2] for r in results]), 0.0)
    quantiles = residual_quantiles(point, train[:, -V:] - f_val, levels)
    names, counts = np.unique(chosen, return_counts=True)
    return BaselineForecast(
        "best_statistical",
        point,
        quantiles,
        np.asarray(levels, dtype=np.float64),
        time.perf_counter() - start,
        chosen=chosen,
        notes={
            "validation_weeks": V,
            "chosen": {str(n): int(c) for n, c in zip(names, counts, strict=True)},
            "intermittent_series": int(sparse.sum()),
            "workers": workers,
        },
    )


def run_baselines(
    train: np.ndarray, horizon: int, levels=LEVELS, workers: int = 2, statistical: bool = True
) -> dict[str, BaselineForecast]:
    """seasonal_naive and (unless `statistical` is False) best_statistical, by name."""
    out = {"seasonal_naive": seasonal_naive(train, horizon, levels)}
    if statistical:
        out["best_statistical"] = best_statistical(train, horizon, levels, workers=workers)
    return out
