"""Weekly demand per (stock code, country) from UCI Online Retail, as a federated quantile table.

The countries are the silos: each keeps its own sales series. How the table is built:

- Weeks are 7-day periods counted from the first day of the data (Wednesday 2010-12-01), so the
  first week is complete. The data ends on Friday 2011-12-09 midday: the last week (2011-12-07 to
  12-13) holds under three days of trade and is dropped, leaving 53 complete weeks.
- Units are the cleaned purchases' quantities (`online_retail.clean`). A purchase line that a
  cancellation in the same week mirrors exactly (same customer, stock code and quantity) is removed
  with it: such pairs are mistyped orders (the 74,215 units of 23166 on 2011-01-18), not demand.
  Only same-week pairs are matched, so a later week's cancellation never changes an earlier week.
- The last `horizon` weeks are the test weeks; the ones before are the training weeks.
- A series is kept when it sold in at least `min_sales_weeks` training weeks. A country keeps its
  silo when it has at least `min_series_per_country` kept series; the smaller ones merge into one
  silo "Other" when together they reach that count, else their series are dropped (all counted in
  the report). Every choice looks at training weeks only.

Rows (one per series and forecast origin t, a week index; the target is weeks t+1 .. t+H):
- training rows: every origin with `lags` weeks of history (t >= lags - 1) whose H target weeks are
  all training weeks (t + H <= last training week);
- test rows: one per series, origin = the last training week, target = the H test weeks.
Numeric features, all from the series' own training weeks: the last `lags` weeks' units / scale
(oldest first), sin and cos of the origin's week of year, log1p(scale), and the fraction of zero weeks
in the window. scale = mean units over the training weeks (> 0 since the series sold). Categorical:
stock code (vocabulary of the kept series, 0 = unknown) and country. Target: units / scale.
`extra` holds `series` (the row of `WeeklyDemand.units`) and `scale`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fedshop.config import DataConfig
from fedshop.data import online_retail
from fedshop.data.tabular import TabularDataset, TabularPart, TabularSilo
from fedshop.errors import DataError

OTHER = "Other"


@dataclass(frozen=True)
class DemandSettings:
    horizon: int = 8  # test weeks, and the weeks each row forecasts
    lags: int = 8  # weeks of history in a row's features
    min_sales_weeks: int = 6  # training weeks with a sale for a series to be kept
    min_series_per_country: int = 10  # kept series for a country to be its own silo
    start: str = "2010-12-01"  # weeks are 7-day periods from this day
    drop_mirrored_cancellations: bool = True

    def __post_init__(self) -> None:
        if self.horizon < 1 or self.lags < 1 or self.min_sales_weeks < 1:
            raise DataError("demand: horizon, lags and min_sales_weeks must be >= 1")


@dataclass
class WeeklyDemand:
    """Units sold per kept series (rows) and complete week (columns); the first `n_train` weeks
    are training weeks, the rest the test weeks."""

    units: np.ndarray  # float64 (n_series, n_weeks)
    stock_codes: np.ndarray  # str (n_series,)
    countries: np.ndarray  # str (n_series,)
    silo: np.ndarray  # int64 (n_series,): index into silo_names
    silo_names: list[str]
    week_starts: pd.DatetimeIndex  # (n_weeks,)
    n_train: int
    report: dict = field(default_factory=dict)

    @property
    def train(self) -> np.ndarray:
        return self.units[:, : self.n_train]

    @property
    def test(self) -> np.ndarray:
        return self.units[:, self.n_train :]

    @property
    def series_country(self) -> np.ndarray:
        """The silo name of each series (what per-country metrics group by)."""
        return np.asarray(self.silo_names, dtype=object)[self.silo]


def numeric_names(settings: DemandSettings) -> list[str]:
    lags = [f"units_lag{k}" for k in range(settings.lags, 0, -1)]  # oldest first, lag1 last
    return [*lags, "week_sin", "week_cos", "log1p_scale", "zero_fraction"]


def weekly_frame(
    cleaned: online_retail.CleanedRetail, settings: DemandSettings
) -> tuple[pd.DataFrame, pd.DatetimeIndex, dict]:
    """Units per (StockCode, Country, week) over the complete weeks, and what was removed."""
    start = pd.Timestamp(settings.start)
    purchases = cleaned.purchases
    report: dict = {}

    def week_of(dates: pd.Series) -> np.ndarray:
        return ((dates.dt.normalize() - start).dt.days // 7).to_numpy()

    lines = purchases[["CustomerID", "StockCode", "Country", "Quantity"]].assign(
        week=week_of(purchases["InvoiceDate"]), date=purchases["InvoiceDate"]
    )
    if settings.drop_mirrored_cancellations and len(cleaned.returns):
        returns = cleaned.returns
        key = ["CustomerID", "StockCode", "Quantity", "week"]
        cancels = (
            pd.DataFrame(
                {
                    "CustomerID": returns["CustomerID"].to_numpy(),
                    "StockCode": returns["StockCode"].to_numpy(),
                    "Quantity": -returns["Quantity"].to_numpy(),
                    "week": week_of(returns["InvoiceDate"]),
                }
            )
            .groupby(key)
            .size()
            .rename("n_cancel")
        )
        # Within a key, the latest purchases are the ones the cancellations undo.
        lines = lines.sort_values("date", kind="stable")
        rank = lines.groupby(key).cumcount(ascending=False)
        n_cancel = lines.join(cancels, on=key)["n_cancel"].fillna(0).to_numpy()
        mirrored = rank.to_numpy() < n_cancel
        report["mirrored_cancellation_lines"] = int(mirrored.sum())
        report["mirrored_cancellation_units"] = int(lines.loc[mirrored, "Quantity"].sum())
        lines = lines[~mirrored]
    last_day = purchases["InvoiceDate"].max().normalize()
    n_weeks = int((last_day - start).days + 1) // 7  # complete weeks only
    partial = lines["week"] >= n_weeks
    report["partial_week_dropped"] = {
        "from": str((start + pd.Timedelta(weeks=n_weeks)).date()),
        "to_last_day": str(last_day.date()),
        "lines": int(partial.sum()),
        "units": int(lines.loc[partial, "Quantity"].sum()),
    }
    before = lines["week"] < 0
    report["lines_before_start"] = int(before.sum())
    lines = lines[~partial & ~before]
    weekly = lines.groupby(["StockCode", "Country", "week"], sort=True)["Quantity"].sum()
    week_starts = pd.date_range(start, periods=n_weeks, freq="7D")
    return weekly.reset_index(), week_starts, report


def build_weekly(cleaned: online_retail.CleanedRetail, settings: DemandSettings) -> WeeklyDemand:
    """The kept series as a (series x weeks) matrix, with what each rule dropped in `report`."""
    weekly, week_starts, report = weekly_frame(cleaned, settings)
    n_weeks = len(week_starts)
    n_train = n_weeks - settings.horizon
    if n_train < settings.lags + settings.horizon:
        raise DataError(f"demand: {n_weeks} weeks leave too few training weeks")
    train = weekly[weekly["week"] < n_train]
    sales_weeks = train.groupby(["StockCode", "Country"]).size()
    all_series = weekly.groupby(["StockCode", "Country"]).size()
    kept = sales_weeks[sales_weeks >= settings.min_sales_weeks].index
    report["series_all"] = len(all_series)
    report["series_no_training_sale"] = len(all_series) - len(sales_weeks)
    report["series_too_few_sales_weeks"] = int((sales_weeks < settings.min_sales_weeks).sum())

    per_country = pd.Series(kept.get_level_values("Country")).value_counts()
    big = per_country[per_country >= settings.min_series_per_country]
    small = per_country[per_country < settings.min_series_per_country]
    merged = int(small.sum()) >= settings.min_series_per_country
    report["countries_own_silo"] = {c: int(n) for c, n in big.sort_index().items()}
    report["countries_merged_into_other" if merged else "countries_dropped"] = {
        c: int(n) for c, n in small.sort_index().items()
    }
    report["series_dropped_small_countries"] = 0 if merged else int(small.sum())
    silo_names = sorted(big.index, key=lambda c: (-big[c], c)) + ([OTHER] if merged else [])
    silo_of = {c: silo_names.index(c) for c in big.index}
    if merged:
        silo_of.update({c: len(silo_names) - 1 for c in small.index})

    keys = pd.DataFrame(
        {"StockCode": kept.get_level_values(0), "Country": kept.get_level_values(1)}
    )
    keys = keys[keys["Country"].isin(silo_of)]
    keys = keys.assign(silo=keys["Country"].map(silo_of)).sort_values(["silo", "StockCode"])
    keys = keys.reset_index(drop=True)
    row_of = pd.Series(keys.index, index=pd.MultiIndex.from_frame(keys[["StockCode", "Country"]]))
    sold = weekly.join(row_of.rename("row"), on=["StockCode", "Country"]).dropna(subset=["row"])
    units = np.zeros((len(keys), n_weeks))
    units[sold["row"].astype(int).to_numpy(), sold["week"].to_numpy()] = sold["Quantity"]
    report.update(
        series_kept=len(keys),
        silos={name: int((keys["silo"] == i).sum()) for i, name in enumerate(silo_names)},
        weeks=n_weeks,
        train_weeks=n_train,
        test_weeks=settings.horizon,
        first_week=str(week_starts[0].date()),
        first_test_week=str(week_starts[n_train].date()),
        last_week_end=str((week_starts[-1] + pd.Timedelta(days=6)).date()),
        units_kept_train=float(units[:, :n_train].sum()),
        units_kept_test=float(units[:, n_train:].sum()),
    )
    return WeeklyDemand(
        units=units,
        stock_codes=keys["StockCode"].to_numpy(dtype=object),
        countries=keys["Country"].to_numpy(dtype=object),
        silo=keys["silo"].to_numpy(dtype=np.int64),
        silo_names=silo_names,
        week_starts=week_starts,
        n_train=n_train,
        report=report,
    )


def validation_view(weekly: WeeklyDemand, settings: DemandSettings) -> WeeklyDemand:
    """The training weeks alone, their last `horizon` weeks held out in place of the test weeks:
    where settings are chosen without looking at the test weeks. Series without a sale before the
    validation weeks are left out (their scale would be 0)."""
    T = weekly.n_train - settings.horizon
    keep = weekly.units[:, :T].sum(axis=1) > 0
    report = {
        "validation_of": weekly.report.get("first_test_week"),
        "series_left_out": int((~keep).sum()),
    }
    return WeeklyDemand(
        units=weekly.train[keep],
        stock_codes=weekly.stock_codes[keep],
        countries=weekly.countries[keep],
        silo=weekly.silo[keep],
        silo_names=weekly.silo_names,
        week_starts=weekly.week_starts[: weekly.n_train],
        n_train=T,
        report=report,
    )


def _rows(
    weekly: WeeklyDemand, series: np.ndarray, origins: np.ndarray, settings: DemandSettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features and targets of rows (series[i], origins[i]); scale from the training weeks."""
    L, H = settings.lags, settings.horizon
    train = weekly.train
    scale = train.mean(axis=1)[series]
    window = weekly.units[series[:, None], origins[:, None] + np.arange(-L + 1, 1)]
    target = weekly.units[series[:, None], origins[:, None] + np.arange(1, H + 1)]
    week_of_year = weekly.week_starts[origins].isocalendar().week.to_numpy(dtype=np.float64)
    angle = 2 * np.pi * week_of_year / 52.0
    numeric = np.column_stack(
        [
            window / scale[:, None],
            np.sin(angle),
            np.cos(angle),
            np.log1p(scale),
            (window == 0).mean(axis=1),
        ]
    )
    return numeric, target / scale[:, None], scale


def build_table(weekly: WeeklyDemand, settings: DemandSettings) -> TabularDataset:
    """One quantile table, a silo per country (see the module docstring for the rows)."""
    if not (weekly.train.mean(axis=1) > 0).all():
        raise DataError("demand: a kept series has no training sale")
    L, H, T = settings.lags, settings.horizon, weekly.n_train
    codes = sorted(set(weekly.stock_codes))
    code_id = {c: i + 1 for i, c in enumerate(codes)}  # 0 = unknown
    countries = sorted(set(weekly.countries))
    country_id = {c: i + 1 for i, c in enumerate(countries)}
    categorical = np.column_stack(
        [
            [code_id[c] for c in weekly.stock_codes],
            [country_id[c] for c in weekly.countries],
        ]
    ).astype(np.int64)
    train_origins = np.arange(L - 1, T - H)  # the target weeks t+1 .. t+H all lie before T
    silos = []
    for index, name in enumerate(weekly.silo_names):
        series = np.flatnonzero(weekly.silo == index)
        parts = []
        for origins in (train_origins, np.array([T - 1])):
            s = np.repeat(series, len(origins))
            o = np.tile(origins, len(series))
            numeric, target, scale = _rows(weekly, s, o, settings)
            parts.append(
                TabularPart(categorical[s], numeric, target, {"series": s, "scale": scale})
            )
        silos.append(TabularSilo(index, name, parts[0], parts[1]))
    report = dict(weekly.report)
    report.update(
        settings={k: getattr(settings, k) for k in settings.__dataclass_fields__},
        train_origins=len(train_origins),
        train_rows=sum(len(s.train) for s in silos),
        test_rows=sum(len(s.test) for s in silos),
        stock_code_vocabulary=len(codes),
    )
    return TabularDataset(
        name="online-retail-demand",
        kind="quantile",
        silos=silos,
        categorical_names=["stock_code", "country"],
        cardinalities=[len(codes) + 1, len(countries) + 1],
        numeric_names=numeric_names(settings),
        horizon=H,
        report=report,
    )


def load_demand(
    settings: DemandSettings | None = None,
    data: DataConfig | None = None,
    cleaned: online_retail.CleanedRetail | None = None,
) -> tuple[TabularDataset, WeeklyDemand]:
    """The demand table and the weekly matrix it was built from."""
    settings = settings or DemandSettings()
    if cleaned is None:
        from fedshop.data.datasets import load_cleaned_retail

        cleaned = load_cleaned_retail(data)
    weekly = build_weekly(cleaned, settings)
    weekly.report["source"] = cleaned.source
    table = build_table(weekly, settings)
    return table, weekly


def predictions_in_units(table: TabularDataset, predictions: list[np.ndarray]) -> np.ndarray:
    """Per-silo predictions for the test rows (each (n_rows, H) or (n_rows, H, Q), scaled like the
    target) as units in the rows of `WeeklyDemand.units`: (n_series, H[, Q])."""
    if len(predictions) != table.n_silos:
        raise DataError(f"{len(predictions)} prediction arrays for {table.n_silos} silos")
    n_series = sum(len(s.test) for s in table.silos)
    out = None
    for silo, pred in zip(table.silos, predictions, strict=True):
        pred = np.asarray(pred, dtype=np.float64)
        if len(pred) != len(silo.test):
            raise DataError(f"{silo.name}: {len(pred)} predictions for {len(silo.test)} rows")
        if out is None:
            out = np.full((n_series, *pred.shape[1:]), np.nan)
        scale = silo.test.extra["scale"].reshape(-1, *([1] * (pred.ndim - 1)))
        out[silo.test.extra["series"]] = pred * scale
    return out
