"""Return risk (`--task returns`): will a purchase line be returned? Online Retail's cancellations
(invoices starting with "C") are the returns.

Labelling (`match_returns`, `label_lines`). Each cancellation line (customer c, stock code k,
quantity −q, time t, unit price p) is matched to c's own purchase lines of k placed at or before t,
in two passes: first the lines at the same unit price, most recent first, then lines at any other
price, most recent first. Its q units are taken from those lines' not-yet-returned units in that
order (a purchase line can absorb several partial returns; a large return can span several lines).
Cancellations are processed in time order, so a later cancellation never changes how an earlier one
was matched. What cannot be matched is counted, never guessed: no earlier purchase of k by c in the
data (the table starts on 2010-12-01; the purchase may be older), earlier purchases already fully
returned, units beyond what was bought. A purchase line's label is 1 when some or all of its units
were returned within `label_horizon_days` of its purchase, 0 otherwise: a fixed horizon, so every
label in the table means the same thing and is fully observed inside the data (see the split).

Split (temporal). Test: lines purchased from `split_date` on whose horizon ends inside the data;
train: lines whose horizon ends before `split_date` (purchased before split_date − horizon). So a
training label uses only cancellations dated before the split, and no label is censored. The lines in
the gap [split − horizon, split) and in the last `horizon` days of the data have no label of that
meaning: they are left out of the rows (counted in the report) but stay in the silo's history that
later rows' features count.

Silos: one per country (the invoice line's country, i.e. the storefront where it was placed);
countries with fewer than `min_silo_train_lines` training rows merge into one "Rest of world" silo,
decided on training rows only.

Features (`FEATURES`) are computed per silo from that silo's own lines and cancellations, each from
what was known before the line's purchase time t: a prior line's return status counts only once it is
known — at its return time when it was returned within the horizon, else at its purchase time +
horizon. Nothing pooled across silos; the stock-code and country vocabularies (the shop's public
catalogue) come from training rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fedshop.data import online_retail
from fedshop.data.partition import REST_OF_WORLD
from fedshop.data.tabular import TabularDataset, TabularPart, TabularSilo
from fedshop.errors import DataError

# Price equality for matching: prices in the table have at most 3 decimals.
PRICE_TOLERANCE = 1e-6
# Times are counted in minutes from this origin (the table's resolution is the minute).
_ORIGIN = pd.Timestamp("2010-01-01")
# Group keys are group * _SPAN + minute; _SPAN exceeds any minute (plus horizon) of the table.
_SPAN = np.int64(1) << 22

CATEGORICAL = ["stock_code", "country", "weekday", "hour"]
NUMERIC = [
    "log_quantity",
    "log_unit_price",
    "log_line_value",
    "log_invoice_lines",
    "log_invoice_value",
    "log_customer_prior_orders",
    "log_customer_prior_lines",
    "log_customer_known_lines",
    "customer_prior_return_rate",
    "log_customer_prior_cancellations",
    "log_days_since_first_order",
    "log_days_since_last_order",
    "new_customer",
    "log_customer_item_prior_lines",
    "log_item_prior_lines",
    "log_item_known_lines",
    "item_prior_return_rate",
]
FEATURES = {
    "stock_code": "the line's stock code (vocabulary: codes of training rows; 0 = unknown)",
    "country": "the line's country (vocabulary: countries of training rows; 0 = unknown)",
    "weekday": "day of week of the purchase (1 = Monday)",
    "hour": "hour of the purchase + 1",
    "log_quantity": "log1p(quantity)",
    "log_unit_price": "log1p(unit price)",
    "log_line_value": "log1p(quantity × unit price)",
    "log_invoice_lines": "log1p(lines in the same invoice)",
    "log_invoice_value": "log1p(value of the same invoice)",
    "log_customer_prior_orders": "log1p(the customer's earlier invoices in this silo)",
    "log_customer_prior_lines": "log1p(the customer's earlier lines in this silo)",
    "log_customer_known_lines": "log1p(of those, lines whose return status was known at t)",
    "customer_prior_return_rate": "returned / known among them (0 when none known)",
    "log_customer_prior_cancellations": "log1p(the customer's cancellation lines in this silo "
    "before t, matched or not)",
    "log_days_since_first_order": "log1p(days since the customer's first line in this silo)",
    "log_days_since_last_order": "log1p(days since the customer's previous invoice here)",
    "new_customer": "1 when the customer has no earlier invoice in this silo",
    "log_customer_item_prior_lines": "log1p(the customer's earlier lines of this stock code here)",
    "log_item_prior_lines": "log1p(earlier lines of this stock code in this silo)",
    "log_item_known_lines": "log1p(of those, lines whose return status was known at t)",
    "item_prior_return_rate": "returned / known among them (0 when none known)",
}


@dataclass(frozen=True)
class ReturnsSettings:
    split_date: str = "2011-09-01"  # test: purchases from this day on
    label_horizon_days: int = 30  # label: some of the line returned within this many days
    min_silo_train_lines: int = 500  # smaller countries merge into "Rest of world"
    max_silos: int = 0  # at most this many storefronts, the smallest countries merged (0: no limit)

    def __post_init__(self) -> None:
        if self.label_horizon_days < 1:
            raise DataError(f"label_horizon_days must be at least 1, got {self.label_horizon_days}")
        if self.min_silo_train_lines < 0:
            raise DataError("min_silo_train_lines must be at least 0")
        if self.max_silos < 0 or self.max_silos == 1:
            raise DataError(f"max_silos must be 0 (no limit) or at least 2, got {self.max_silos}")
        pd.Timestamp(self.split_date)  # raises on a malformed date

    @property
    def split(self) -> pd.Timestamp:
        return pd.Timestamp(self.split_date)

    @property
    def horizon(self) -> pd.Timedelta:
        return pd.Timedelta(days=self.label_horizon_days)


@dataclass
class Matching:
    """Per purchase line (aligned with the purchases given): units returned, first return time;
    per cancellation line its outcome; and the counts of each outcome."""

    returned_units: np.ndarray  # int64
    first_return: pd.Series  # datetime64, NaT where never returned
    outcome: pd.Series  # per cancellation line, one of MATCH_OUTCOMES
    counts: dict[str, int] = field(default_factory=dict)


MATCH_OUTCOMES = {
    "matched": "all units taken from earlier lines of the same customer and stock code",
    "partly_matched": "some units matched; the rest exceed what was bought and is not yet returned",
    "nothing_left": "earlier purchases exist but all their units were already returned",
    "no_earlier_purchase": "no purchase of that stock code by that customer at or before it "
    "(e.g. bought before 2010-12-01, where the table starts)",
}


def _minutes(times: pd.Series) -> np.ndarray:
    return ((times - _ORIGIN) // pd.Timedelta(minutes=1)).to_numpy(dtype=np.int64)


def match_returns(purchases: pd.DataFrame, returns: pd.DataFrame) -> Matching:
    """Match each cancellation line to its customer's earlier purchase lines of the same stock code
    (rule: module docstring). `purchases`, `returns`: `online_retail.clean` tables."""
    n = len(purchases)
    returned_units = np.zeros(n, dtype=np.int64)
    first_return = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    p_times = _minutes(purchases["InvoiceDate"])
    p_qty = purchases["Quantity"].to_numpy(dtype=np.int64)
    p_price = purchases["UnitPrice"].to_numpy(dtype=np.float64)
    wanted = set(zip(returns["CustomerID"], returns["StockCode"], strict=True))
    keys = list(zip(purchases["CustomerID"], purchases["StockCode"], strict=True))
    candidates: dict[tuple, list[int]] = {}
    for row, key in enumerate(keys):
        if key in wanted:
            candidates.setdefault(key, []).append(row)
    for rows in candidates.values():
        rows.sort(key=lambda r: (p_times[r], r))

    r_times = _minutes(returns["InvoiceDate"])
    order = np.lexsort((np.arange(len(returns)), r_times))
    outcome = np.empty(len(returns), dtype=object)
    counts = dict.fromkeys(MATCH_OUTCOMES, 0)
    counts.update(
        cancellation_lines=len(returns), units_cancelled=0, units_matched=0,
        matched_at_other_price=0, spanning_several_lines=0, ambiguous_most_recent_taken=0,
        customer_never_seen_before=0,
    )  # fmt: skip
    customers_seen: dict[int, int] = {}  # customer -> first purchase minute
    for customer, t in zip(purchases["CustomerID"], p_times, strict=True):
        customers_seen[customer] = min(customers_seen.get(customer, t), t)
    r_customer = returns["CustomerID"].to_numpy()
    r_code = returns["StockCode"].to_numpy()
    r_qty = -returns["Quantity"].to_numpy(dtype=np.int64)
    r_price = returns["UnitPrice"].to_numpy(dtype=np.float64)
    for j in order:
        t, q = r_times[j], int(r_qty[j])
        counts["units_cancelled"] += q
        earlier = [r for r in candidates.get((r_customer[j], r_code[j]), []) if p_times[r] <= t]
        if not earlier:
            outcome[j] = "no_earlier_purchase"
            counts["no_earlier_purchase"] += 1
            if customers_seen.get(r_customer[j], t + 1) > t:
                counts["customer_never_seen_before"] += 1
            continue
        open_rows = [r for r in reversed(earlier) if returned_units[r] < p_qty[r]]
        if not open_rows:
            outcome[j] = "nothing_left"
            counts["nothing_left"] += 1
            continue
        same = [r for r in open_rows if abs(p_price[r] - r_price[j]) <= PRICE_TOLERANCE]
        other = [r for r in open_rows if abs(p_price[r] - r_price[j]) > PRICE_TOLERANCE]
        if sum(1 for r in same if p_qty[r] - returned_units[r] >= q) > 1:
            counts["ambiguous_most_recent_taken"] += 1
        left, used, used_other = q, 0, False
        for r in same + other:
            if left == 0:
                break
            take = min(left, int(p_qty[r] - returned_units[r]))
            returned_units[r] += take
            first_return[r] = min(first_return[r], t)
            left -= take
            used += 1
            used_other |= r in other
        counts["units_matched"] += q - left
        counts["matched_at_other_price"] += int(used_other)
        counts["spanning_several_lines"] += int(used > 1)
        outcome[j] = "matched" if left == 0 else "partly_matched"
        counts[outcome[j]] += 1
    never = first_return == np.iinfo(np.int64).max
    first = pd.Series(pd.NaT, index=purchases.index, dtype="datetime64[ns]")
    first[~never] = _ORIGIN + pd.to_timedelta(first_return[~never], unit="min")
    counts["lines_with_a_return"] = int((~never).sum())
    return Matching(
        returned_units=returned_units,
        first_return=first,
        outcome=pd.Series(outcome, index=returns.index),
        counts=counts,
    )


def label_lines(
    purchases: pd.DataFrame, matching: Matching, settings: ReturnsSettings
) -> pd.DataFrame:
    """The purchases with, per line: `returned` (some of it returned within the horizon),
    `known_at` (when that became known: the return time, else purchase time + horizon) and
    `period` ("train", "test", or "unlabelled" for the gap before the split and the data's tail)."""
    end = purchases["InvoiceDate"].max()
    delay = matching.first_return - purchases["InvoiceDate"]
    returned = (delay <= settings.horizon).fillna(False).to_numpy(dtype=bool)
    horizon_end = purchases["InvoiceDate"] + settings.horizon
    known_at = horizon_end.where(~returned, matching.first_return)
    period = np.where(
        horizon_end < settings.split,
        "train",
        np.where((purchases["InvoiceDate"] >= settings.split) & (horizon_end <= end), "test", ""),
    )
    return purchases.assign(
        returned=returned,
        returned_units=matching.returned_units,
        known_at=known_at,
        period=pd.Series(period, index=purchases.index).replace("", "unlabelled"),
    )


def assign_silos(
    lines: pd.DataFrame, settings: ReturnsSettings
) -> tuple[pd.Series, list[str], list[str]]:
    """Per line its silo name; silo names (largest by training rows first); merged countries.
    Decided on training rows only."""
    train = lines.loc[lines["period"] == "train", "Country"].value_counts()
    own = train[train >= settings.min_silo_train_lines]
    if settings.max_silos:  # the largest countries keep their own; one silo for the rest
        own = own.sort_values(ascending=False, kind="stable").head(settings.max_silos - 1)
    small = sorted(set(lines["Country"]) - set(own.index))
    silo = lines["Country"].where(~lines["Country"].isin(small), REST_OF_WORLD)
    sizes = silo[lines["period"] == "train"].value_counts()
    names = sorted(set(silo), key=lambda name: (-sizes.get(name, 0), name))
    return silo, names, small


def _count_before(
    event_group: np.ndarray,
    event_minute: np.ndarray,
    query_group: np.ndarray,
    query_minute: np.ndarray,
) -> np.ndarray:
    """Per query, the events of its group strictly before its minute."""
    events = np.sort(event_group * _SPAN + event_minute)
    return np.searchsorted(
        events, query_group * _SPAN + query_minute, side="left"
    ) - np.searchsorted(events, query_group * _SPAN, side="left")


def _rate(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)


def silo_features(lines: pd.DataFrame, cancellations: pd.DataFrame) -> pd.DataFrame:
    """The numeric features of one silo's lines (all periods, each from that silo's rows before its
    own purchase time only); `cancellations`: the silo's own cancellation lines."""
    t = _minutes(lines["InvoiceDate"])
    day = 24 * 60
    customer = pd.factorize(lines["CustomerID"])[0].astype(np.int64)
    item = pd.factorize(lines["StockCode"])[0].astype(np.int64)
    pair = lines.groupby(["CustomerID", "StockCode"], sort=False).ngroup().to_numpy(np.int64)
    known = _minutes(lines["known_at"])
    returned = lines["returned"].to_numpy(dtype=bool)
    value = lines["Quantity"].to_numpy(np.float64) * lines["UnitPrice"].to_numpy(np.float64)
    invoice = lines.groupby("InvoiceNo")["InvoiceNo"].transform("size").to_numpy(np.float64)
    invoice_value = pd.Series(value, index=lines.index).groupby(lines["InvoiceNo"]).transform("sum")

    # Invoice level: one row per (customer, invoice).
    inv = pd.DataFrame({"c": customer, "inv": lines["InvoiceNo"].to_numpy(), "t": t})
    inv = inv.groupby(["c", "inv"], sort=False)["t"].min().reset_index()
    prior_orders = _count_before(inv["c"].to_numpy(), inv["t"].to_numpy(), customer, t)
    # The previous invoice's minute: the largest invoice minute of the customer strictly before t.
    inv_keys = np.sort(inv["c"].to_numpy() * _SPAN + inv["t"].to_numpy())
    at = np.searchsorted(inv_keys, customer * _SPAN + t, side="left") - 1
    previous = np.where(prior_orders > 0, inv_keys[np.maximum(at, 0)] - customer * _SPAN, t)
    first = pd.Series(t).groupby(customer).transform("min").to_numpy()

    cust_prior = _count_before(customer, t, customer, t)
    cust_known = _count_before(customer, known, customer, t)
    cust_returned = _count_before(customer[returned], known[returned], customer, t)
    item_prior = _count_before(item, t, item, t)
    item_known = _count_before(item, known, item, t)
    item_returned = _count_before(item[returned], known[returned], item, t)
    pair_prior = _count_before(pair, t, pair, t)
    ids = {c: i for i, c in enumerate(pd.unique(lines["CustomerID"]))}
    c_cust = cancellations["CustomerID"].map(ids)
    seen = c_cust.notna().to_numpy()
    prior_cancellations = _count_before(
        c_cust[seen].to_numpy(np.int64), _minutes(cancellations["InvoiceDate"])[seen], customer, t
    )
    out = {
        "log_quantity": np.log1p(lines["Quantity"].to_numpy(np.float64)),
        "log_unit_price": np.log1p(lines["UnitPrice"].to_numpy(np.float64)),
        "log_line_value": np.log1p(value),
        "log_invoice_lines": np.log1p(invoice),
        "log_invoice_value": np.log1p(invoice_value.to_numpy(np.float64)),
        "log_customer_prior_orders": np.log1p(prior_orders),
        "log_customer_prior_lines": np.log1p(cust_prior),
        "log_customer_known_lines": np.log1p(cust_known),
        "customer_prior_return_rate": _rate(cust_returned, cust_known),
        "log_customer_prior_cancellations": np.log1p(prior_cancellations),
        "log_days_since_first_order": np.log1p(np.maximum(t - first, 0) / day),
        "log_days_since_last_order": np.log1p((t - previous) / day),
        "new_customer": (prior_orders == 0).astype(np.float64),
        "log_customer_item_prior_lines": np.log1p(pair_prior),
        "log_item_prior_lines": np.log1p(item_prior),
        "log_item_known_lines": np.log1p(item_known),
        "item_prior_return_rate": _rate(item_returned, item_known),
    }
    return pd.DataFrame(out, index=lines.index)[NUMERIC]


def _codes(values: pd.Series, vocabulary: list) -> np.ndarray:
    """1-based codes into `vocabulary`, 0 for anything outside it."""
    index = {v: i + 1 for i, v in enumerate(vocabulary)}
    return values.map(index).fillna(0).to_numpy(dtype=np.int64)


def labelled_lines(
    cleaned: online_retail.CleanedRetail, settings: ReturnsSettings
) -> tuple[pd.DataFrame, Matching]:
    """Every purchase line with its label, period, silo and the matching behind it."""
    if cleaned.purchases.empty:
        raise DataError("no purchases left after cleaning")
    matching = match_returns(cleaned.purchases, cleaned.returns)
    lines = label_lines(cleaned.purchases, matching, settings)
    silo, _, _ = assign_silos(lines, settings)
    return lines.assign(silo=silo), matching


def build_returns_dataset(
    cleaned: online_retail.CleanedRetail,
    settings: ReturnsSettings | None = None,
    labelled: tuple[pd.DataFrame, Matching] | None = None,
) -> TabularDataset:
    """The returns table: one row per labelled purchase line, silos by country (module docstring).
    `labelled`: what `labelled_lines(cleaned, settings)` returned, when the caller already has it."""
    settings = settings or ReturnsSettings()
    lines, matching = labelled if labelled is not None else labelled_lines(cleaned, settings)
    silo, names, merged = assign_silos(lines, settings)
    lines = lines.assign(silo=silo)
    train_lines = lines[lines["period"] == "train"]
    if train_lines.empty or not (lines["period"] == "test").any():
        raise DataError(
            f"split {settings.split_date} with a {settings.label_horizon_days}-day horizon leaves "
            "no training or no test rows"
        )
    codes = sorted(train_lines["StockCode"].unique())
    countries = sorted(train_lines["Country"].unique())
    cancel_country = cleaned.returns["Country"]
    cancel_silo = cancel_country.where(~cancel_country.isin(merged), REST_OF_WORLD)

    silos, table = [], []
    for index, name in enumerate(names):
        own = lines[lines["silo"] == name]
        numeric = silo_features(own, cleaned.returns[cancel_silo == name])
        when = own["InvoiceDate"]
        categorical = np.stack(
            [
                _codes(own["StockCode"], codes),
                _codes(own["Country"], countries),
                when.dt.day_of_week.to_numpy(np.int64) + 1,
                when.dt.hour.to_numpy(np.int64) + 1,
            ],
            axis=1,
        )
        target = own["returned"].to_numpy(np.float32)
        parts = {}
        for period in ("train", "test"):
            rows = np.flatnonzero((own["period"] == period).to_numpy())
            parts[period] = TabularPart(
                categorical[rows], numeric.to_numpy(np.float32)[rows], target[rows]
            )
        silos.append(TabularSilo(index, name, parts["train"], parts["test"]))
        table.append(
            {
                "silo": name,
                "train_rows": len(parts["train"]),
                "test_rows": len(parts["test"]),
                "train_return_rate": float(parts["train"].target.mean())
                if len(parts["train"])
                else None,
                "test_return_rate": float(parts["test"].target.mean())
                if len(parts["test"])
                else None,
                "customers": int(own["CustomerID"].nunique()),
            }
        )
    train_target = np.concatenate([s.train.target for s in silos])
    test_target = np.concatenate([s.test.target for s in silos])
    storefronts_per_customer = lines.groupby("CustomerID")["silo"].nunique()
    report = {
        "dataset": "online-retail",
        "task": "returns",
        "source": cleaned.source,
        "cleaning_rules": online_retail.CLEANING_RULES,
        "cleaning": cleaned.counts,
        "label_rule": (
            "1 when some or all of the purchase line's units were cancelled by the same customer "
            f"within {settings.label_horizon_days} days; cancellations matched to the customer's "
            "own earlier lines of the same stock code, same unit price first, most recent first"
        ),
        "matching_outcomes": MATCH_OUTCOMES,
        "matching": matching.counts,
        "split_rule": (
            f"temporal: train = purchases whose {settings.label_horizon_days}-day horizon ends "
            f"before {settings.split_date} (their labels use only earlier cancellations); test = "
            f"purchases from {settings.split_date} whose horizon ends inside the data"
        ),
        "split_date": settings.split_date,
        "label_horizon_days": settings.label_horizon_days,
        "train_window": [
            str(train_lines["InvoiceDate"].min()),
            str(train_lines["InvoiceDate"].max()),
        ],
        "test_window": [
            str(lines.loc[lines["period"] == "test", "InvoiceDate"].min()),
            str(lines.loc[lines["period"] == "test", "InvoiceDate"].max()),
        ],
        "rows": {
            "train": len(train_target),
            "test": len(test_target),
            "unlabelled_gap_before_split": int(
                ((lines["period"] == "unlabelled") & (lines["InvoiceDate"] < settings.split)).sum()
            ),
            "unlabelled_tail": int(
                ((lines["period"] == "unlabelled") & (lines["InvoiceDate"] >= settings.split)).sum()
            ),
        },
        "return_rate": {"train": float(train_target.mean()), "test": float(test_target.mean())},
        "silo_rule": (
            "one silo per invoice-line country; countries with fewer than "
            f"{settings.min_silo_train_lines} training rows merge into '{REST_OF_WORLD}'"
        ),
        "silos": table,
        "merged_into_rest_of_world": merged,
        "customers_in_several_silos": int((storefronts_per_customer > 1).sum()),
        "features": FEATURES,
        "vocabularies": {"stock_code": len(codes), "country": len(countries)},
    }
    return TabularDataset(
        name="online-retail-returns",
        kind="binary",
        silos=silos,
        categorical_names=list(CATEGORICAL),
        cardinalities=[len(codes) + 1, len(countries) + 1, 8, 25],
        numeric_names=list(NUMERIC),
        report=report,
    )
