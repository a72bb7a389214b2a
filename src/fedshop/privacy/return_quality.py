"""The merchandiser's quality view: which items are returned abnormally often, estimated across all
storefronts from per-item counts each storefront releases under differential privacy.

What one storefront releases, once, with the Gaussian mechanism (`privacy/mechanisms.py`): for every
catalogue item i, S_{s,i}, the number of its customers who bought i, and R_{s,i}, the number of those
who returned some of it within the label horizon (`data/returns.py`). The unit counted is a
(customer, item) pair, so a customer weighs at most 1 in each count however often they bought or
returned the item.

Contribution bounding (the protected unit is a customer of a storefront, as in `fedshop insight`):
each customer counts for at most `max_items` items (a uniform subset chosen by a keyed hash of the
customer's own record: `insight.bound_contributions`) and, among those, is counted as returning at
most `max_returned` (again a keyed-hash subset of their returned items). The release is the one
vector (w·S_{s,·}, R_{s,·}, a·ΣS_{s,·}, b·ΣR_{s,·}) — per-item counts and the storefront's two
totals — so one customer moves it by at most Δ = √(w²·max_items + max_returned + (a·max_items)² +
(b·max_returned)²) in L2, and one σ = z·Δ is added to every value: one `GaussianDpEvent(z)`, z found
by the accountant for the requested (ε, δ). Dividing back by the weights gives S with noise σ/w,
the totals with σ/a and σ/b: returns are rare, so most of the noise budget goes where it matters
(R), and the totals (whose sum over thousands of noisy items would be mostly noise) are released
once each. Every storefront pays (ε, δ) in its own ledger, written ahead of the release, and the
release is refused before any count is formed when a storefront's budget cannot afford it. (A
customer who shops in two storefronts is protected in each at (ε, δ); across both, it composes.)

Everything after the release is post-processing of the released values and σ alone:
- the shop's rate r̄: the precision-weighted ratio (below) of the storefronts' released totals;
- per item, a precision-weighted ratio r̂_i = Σ_s w_{s,i} R_{s,i} / Σ_s w_{s,i} S_{s,i} with
  w_{s,i} = S⁺_{s,i} / (S⁺_{s,i} r̄(1−r̄) + σ_{R,s}² + r̄² σ_{S,s}²), S⁺ = max(S, 0): a storefront
  whose count of the item is mostly noise gets little weight (a plain sum would give every small
  storefront's noise full weight; measured on Online Retail at ε = 1: 809 items measurable against
  8); `weighting="sum"` gives the plain sum;
- its variance by the delta method, sampling (returns as Binomial draws among the buyers) and
  release noise together, the weights taken as fixed:
      Var r̂_i ≈ Σ_s w² (S⁺_{s,i} r̂(1−r̂) + σ_{R,s}² + r̂² σ_{S,s}²) / (Σ_s w S_{s,i})²,
  and the `level` interval r̂_i ± z·√Var, clipped to [0, 1];
- an item is tested (and reported) when its weighted sold count clears `min_sold_sigmas` times its
  noise and it is among the `tested_items` best-selling such items by released sold counts (a
  family chosen without looking at the returns);
- it is **flagged** when the lower end of its `level` interval exceeds r̄·(1 + `margin`): a
  per-item screening test, one-sided at (1 − level)/2, so among m tested items whose rate is at or
  below the threshold at most m·(1 − level)/2 are flagged by chance (`expected_chance_flags_at_most`
  in the report); and **confirmed** when the one-sided test of "r_i ≤ r̄(1 + margin)" (p-value from
  the same normal approximation) is rejected by Benjamini-Hochberg at false discovery rate `fdr`
  over the tested items. r̄'s own noise is ignored (it is far smaller). The rates of flagged items
  are biased upward (they were picked for being high).

Rates are those of the bounded counts: a heavy buyer counts for at most `max_items` items.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field

import dp_accounting as dpa
import numpy as np
import pandas as pd
from scipy import stats

from fedshop.choices import ACCOUNTANTS
from fedshop.data.partition import slug
from fedshop.errors import ConfigError, DataError
from fedshop.privacy import insight
from fedshop.privacy.dp import UNITS
from fedshop.privacy.mechanisms import gaussian_mechanism
from fedshop.seeding import NoiseStream
from fedshop.storage.ledger import BudgetExceededError, Ledger

MECHANISM = (
    "Gaussian mechanism on each storefront's per-item (buyers, returners) vector, each customer "
    "counting for at most max_items items and at most max_returned returns"
)


@dataclass(frozen=True)
class QualitySettings:
    max_items: int = 100  # items one customer may count for, per storefront
    max_returned: int = 4  # returned items one customer may count for
    sold_weight: float = 0.1  # w: the sold counts' share of the noise budget (see the docstring)
    total_sold_weight: float = 0.005  # a: the weight of the storefront's total of S
    total_returned_weight: float = 0.2  # b: the weight of the storefront's total of R
    level: float = 0.9  # two-sided interval level of the reported intervals
    margin: float = 0.5  # flag: the rate is above overall rate × (1 + margin) ...
    fdr: float = 0.1  # ... by Benjamini-Hochberg at this false discovery rate over eligible items
    min_sold_sigmas: float = 3.0  # report an item when its sold count clears this many σ
    tested_items: int = 200  # test (and report) only this many items, the best-selling ones
    weighting: str = "precision"  # or "sum"
    periods: tuple[str, ...] = ("train", "test")  # the labelled lines of `data/returns.py`

    def __post_init__(self) -> None:
        if self.max_items < 1 or self.max_returned < 1:
            raise ConfigError("max_items and max_returned must be at least 1")
        for name in ("sold_weight", "total_sold_weight", "total_returned_weight"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0 < self.fdr < 1:
            raise ConfigError(f"fdr must be in (0, 1), got {self.fdr}")
        if not 0 < self.level < 1:
            raise ConfigError(f"level must be in (0, 1), got {self.level}")
        if self.margin < 0:
            raise ConfigError(f"margin must be at least 0, got {self.margin}")
        if self.weighting not in ("precision", "sum"):
            raise ConfigError(f"weighting {self.weighting!r}: expected 'precision' or 'sum'")

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of (w·S_{s,·}, R_{s,·}, a·ΣS, b·ΣR) under adding or removing one
        customer: they move max_items values of S and max_returned of R by 1, ΣS by up to
        max_items and ΣR by up to max_returned."""
        k, k_r = self.max_items, self.max_returned
        return math.sqrt(
            self.sold_weight**2 * k + k_r
            + (self.total_sold_weight * k) ** 2 + (self.total_returned_weight * k_r) ** 2
        )  # fmt: skip


@dataclass(frozen=True)
class Pairs:
    """One storefront's (customer, item) pairs: who bought what and whether they returned it."""

    customer_ids: np.ndarray  # str, one per pair
    items: np.ndarray  # int64 catalogue indices
    returned: np.ndarray  # bool

    def histories(self, mask: np.ndarray | None = None) -> insight.Histories:
        ids = self.customer_ids if mask is None else self.customer_ids[mask]
        items = self.items if mask is None else self.items[mask]
        order = np.argsort(ids, kind="stable")
        customers, starts = np.unique(ids[order], return_index=True)
        indptr = np.append(starts, len(ids)).astype(np.int64)
        return insight.Histories(customers, indptr, items[order].astype(np.int64))


def pairs_of(lines: pd.DataFrame, item_index: dict[str, int]) -> Pairs:
    """A storefront's lines (CustomerID, StockCode, returned) as distinct (customer, item) pairs."""
    grouped = lines.groupby(["CustomerID", "StockCode"], sort=True)["returned"].any().reset_index()
    return Pairs(
        customer_ids=grouped["CustomerID"].astype(str).to_numpy(),
        items=grouped["StockCode"].map(item_index).to_numpy(dtype=np.int64),
        returned=grouped["returned"].to_numpy(dtype=bool),
    )


def bounded_counts(
    pairs: Pairs, item_ids: list[str], settings: QualitySettings, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(S, R) before noise: per item, bounded buyers and bounded returners (module docstring)."""
    n_items = len(item_ids)
    histories = pairs.histories()
    rows, items = insight.bound_contributions(histories, item_ids, settings.max_items, seed)
    keys = pd.MultiIndex.from_arrays([histories.customer_ids[rows], items])
    returned_keys = pd.MultiIndex.from_arrays([pairs.customer_ids, pairs.items])[pairs.returned]
    kept_returned = keys.isin(returned_keys)
    sold = np.bincount(items, minlength=n_items).astype(np.float64)
    if not kept_returned.any():
        return sold, np.zeros(n_items)
    returners = Pairs(
        histories.customer_ids[rows][kept_returned],
        items[kept_returned],
        np.ones(int(kept_returned.sum()), dtype=bool),
    )
    _, returned_items = insight.bound_contributions(
        returners.histories(), item_ids, settings.max_returned, seed + 1
    )
    return sold, np.bincount(returned_items, minlength=n_items).astype(np.float64)


@dataclass(frozen=True)
class QualityRelease:
    """What leaves one storefront: noisy counts, their noise, and the accountant's event."""

    sold: np.ndarray  # noisy S_{s,·}
    returned: np.ndarray  # noisy R_{s,·}
    total_sold: float  # noisy ΣS
    total_returned: float  # noisy ΣR
    scales: dict[str, float]  # σ of each: sold σ/w, returned σ, total_sold σ/a, total_returned σ/b
    noise_multiplier: float
    sensitivity: float
    event: dpa.DpEvent


def release_quality_counts(
    pairs: Pairs,
    item_ids: list[str],
    settings: QualitySettings,
    noise_multiplier: float,
    rng: NoiseStream | np.random.Generator,
    seed: int = 0,
) -> QualityRelease:
    """One storefront's release: (w·S, R, a·ΣS, b·ΣR) + N(0, σ²) on every value, σ = z·Δ.
    `rng`: the storefront's secret `NoiseStream` (a numpy Generator only in simulations); `seed`
    picks the bounding subsets (public)."""
    sold, returned = bounded_counts(pairs, item_ids, settings, seed)
    w, a, b = settings.sold_weight, settings.total_sold_weight, settings.total_returned_weight
    values = np.concatenate([w * sold, returned, [a * sold.sum(), b * returned.sum()]])
    release = gaussian_mechanism(values, settings.sensitivity, noise_multiplier, rng)
    n, sigma = len(item_ids), release.scale
    return QualityRelease(
        sold=release.values[:n] / w,
        returned=release.values[n : 2 * n],
        total_sold=float(release.values[2 * n] / a),
        total_returned=float(release.values[2 * n + 1] / b),
        scales={
            "sold": sigma / w,
            "returned": sigma,
            "total_sold": sigma / a,
            "total_returned": sigma / b,
        },
        noise_multiplier=noise_multiplier,
        sensitivity=release.sensitivity,
        event=release.event,
    )


# --- Post-processing: from the released values and σ only ---------------------------------------


def weighted_ratio(
    sold: np.ndarray,
    returned: np.ndarray,
    var_sold: np.ndarray,
    var_returned: np.ndarray,
    prior_rate: float,
    weighting: str = "precision",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per column of (S, ·) noisy counts: (rate, its variance, Σ w S, noise σ of Σ w S) of the
    weighted ratio Σ_s w R / Σ_s w S, w from `prior_rate` (module docstring)."""
    positive = np.maximum(sold, 0.0)
    if weighting == "sum":
        weight = np.ones_like(sold)
    else:
        p = prior_rate
        weight = positive / (positive * p * (1 - p) + var_returned + p**2 * var_sold)
    total_sold = (weight * sold).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.clip((weight * returned).sum(axis=0) / total_sold, 0.0, 1.0)
        variance = (
            weight**2 * (positive * rate * (1 - rate) + var_returned + rate**2 * var_sold)
        ).sum(axis=0) / total_sold**2
    return rate, variance, total_sold, np.sqrt((weight**2 * var_sold).sum(axis=0))


def overall_rate(
    total_sold: np.ndarray,
    total_returned: np.ndarray,
    total_sold_scale: np.ndarray,
    total_returned_scale: np.ndarray,
) -> float:
    """The shop's rate from the storefronts' released totals: the precision-weighted ratio, its
    weights from the plain ratio of the sums."""
    sold = np.asarray(total_sold, dtype=np.float64)[:, None]
    returned = np.asarray(total_returned, dtype=np.float64)[:, None]
    var_s = (np.asarray(total_sold_scale, dtype=np.float64) ** 2)[:, None]
    var_r = (np.asarray(total_returned_scale, dtype=np.float64) ** 2)[:, None]
    plain = float(np.clip(returned.sum() / max(sold.sum(), 1e-12), 1e-6, 1 - 1e-6))
    rate, _, _, _ = weighted_ratio(sold, returned, var_s, var_r, plain)
    return float(rate[0]) if np.isfinite(rate[0]) else plain


def benjamini_hochberg(p_values: np.ndarray, fdr: float) -> np.ndarray:
    """Which hypotheses BH rejects at false discovery rate `fdr` (nan p-values: never)."""
    p = np.where(np.isfinite(p_values), p_values, np.inf)
    m = int(np.isfinite(p_values).sum())
    order = np.argsort(p, kind="stable")
    passing = np.flatnonzero(p[order] <= fdr * np.arange(1, len(p) + 1) / max(m, 1))
    out = np.zeros(len(p), dtype=bool)
    if len(passing):
        out[order[: passing[-1] + 1]] = True
    return out


@dataclass(frozen=True)
class RateEstimates:
    overall: float  # r̄
    sold: np.ndarray  # per item Σ_s w S (weighted; the plain sum under "sum")
    rate: np.ndarray  # r̂_i (nan where not eligible)
    low: np.ndarray  # `level` interval
    high: np.ndarray
    p_value: np.ndarray  # one-sided, of "rate ≤ threshold" (nan where not eligible)
    # r̂(1−r̂)/Var: buyers a noise-free sample would need for the same precision
    effective_buyers: np.ndarray
    eligible: np.ndarray  # bool: tested and reported
    flagged: np.ndarray  # bool: low > threshold (per-item screening)
    confirmed: np.ndarray  # bool: rejected by Benjamini-Hochberg at `fdr`
    threshold: float  # r̄ (1 + margin)


def estimate_rates(
    sold: np.ndarray,
    returned: np.ndarray,
    sold_scale: np.ndarray,
    returned_scale: np.ndarray,
    overall: float,
    settings: QualitySettings,
) -> RateEstimates:
    """Per item the combined return rate, its interval and the flag (module docstring).
    `sold`, `returned`: (S, I) released counts; scales: (S,) their noise σ; `overall`: r̄."""
    sold = np.asarray(sold, dtype=np.float64)
    returned = np.asarray(returned, dtype=np.float64)
    var_s = (np.asarray(sold_scale, dtype=np.float64) ** 2)[:, None]
    var_r = (np.asarray(returned_scale, dtype=np.float64) ** 2)[:, None]
    rate, variance, total_sold, noise_of_sold = weighted_ratio(
        sold, returned, var_s, var_r, overall, settings.weighting
    )
    eligible = (total_sold > 0) & (total_sold >= settings.min_sold_sigmas * noise_of_sold)
    # The family tested: the best-selling eligible items by the released sold counts (chosen
    # without looking at the returns, so the tests stay valid).
    ranked = np.argsort(-np.where(eligible, total_sold, -np.inf), kind="stable")
    eligible[ranked[settings.tested_items :]] = False
    sd = np.sqrt(np.maximum(variance, 0.0))
    z = float(stats.norm.isf((1 - settings.level) / 2))
    threshold = overall * (1 + settings.margin)
    with np.errstate(divide="ignore", invalid="ignore"):
        p_value = np.where(eligible, stats.norm.sf((rate - threshold) / sd), np.nan)
    nan = np.full(len(rate), np.nan)
    low = np.where(eligible, np.clip(rate - z * sd, 0.0, 1.0), nan)
    return RateEstimates(
        overall=overall,
        sold=total_sold,
        rate=np.where(eligible, rate, nan),
        low=low,
        high=np.where(eligible, np.clip(rate + z * sd, 0.0, 1.0), nan),
        p_value=p_value,
        effective_buyers=np.where(eligible, rate * (1 - rate) / np.maximum(sd**2, 1e-300), nan),
        eligible=eligible,
        flagged=eligible & (np.nan_to_num(low, nan=0.0) > threshold),
        confirmed=benjamini_hochberg(p_value, settings.fdr),
        threshold=threshold,
    )


# --- The entry point ----------------------------------------------------------------------------


@dataclass
class QualityView:
    # tested items: item_id, name, effective_buyers, rate, low, high, p_value, flagged, confirmed
    items: pd.DataFrame
    overall_rate: float
    threshold: float
    epsilon: float  # the accountant's ε per storefront
    delta: float
    noise_multiplier: float
    storefronts: list[str]
    releases: list[QualityRelease]  # what left each storefront, in `storefronts` order
    report: dict = field(default_factory=dict)

    @property
    def flagged(self) -> pd.DataFrame:
        return self.items[self.items["flagged"]].sort_values("low", ascending=False)


def _check_budgets(
    ledger: Ledger, storefronts: list[str], dataset: str, epsilon: float, delta: float
) -> None:
    for name in storefronts:
        try:
            ledger.check(name, dataset, epsilon, delta)
        except BudgetExceededError as exc:
            message = str(exc).replace("the run plans", "the quality view needs")
            raise BudgetExceededError(f"{message}; nothing was released") from None


def quality_view(
    lines: pd.DataFrame,
    epsilon: float = 1.0,
    delta: float | None = None,
    ledger: Ledger | None = None,
    noise_seed: int | None = None,
    settings: QualitySettings | None = None,
    accountant: str = "pld",
    dataset: str = "online-retail",
    seed: int = 0,
) -> QualityView:
    """Release every storefront's per-item (buyers, returners) counts under (ε, δ), paid in `ledger`
    (each storefront's budget on `dataset`; None: nothing is recorded), and estimate every item's
    return rate across storefronts.

    `lines`: labelled purchase lines with columns silo, CustomerID, StockCode, Description,
    returned, period (`data.returns.labelled_lines`). `delta` defaults to 1/(10 n), n the customers
    of all storefronts. `noise_seed` None: each storefront's noise is secret (`NoiseStream`); an
    integer makes it reproducible, and then predictable. `seed` picks the bounding subsets (public).
    Raises BudgetExceededError before any count is formed when a storefront cannot afford it."""
    settings = settings or QualitySettings()
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ConfigError(f"epsilon must be greater than 0, got {epsilon}")
    ACCOUNTANTS.check(accountant, "accountant")
    missing = {"silo", "CustomerID", "StockCode", "Description", "returned", "period"} - set(lines)
    if missing:
        raise DataError(f"lines lack column(s) {', '.join(sorted(missing))}")
    lines = lines[lines["period"].isin(settings.periods)]
    if lines.empty:
        raise DataError(f"no labelled lines in periods {settings.periods}")
    population = int(lines["CustomerID"].nunique())
    if delta is None:
        delta = 1.0 / (10 * population)
    if not 0 < delta < 1.0 / population:
        raise ConfigError(f"delta must be in (0, 1/n = {1 / population:.3g}), got {delta:g}")
    storefronts = sorted(lines["silo"].unique(), key=lambda s: (-(lines["silo"] == s).sum(), s))
    item_ids = sorted(lines["StockCode"].unique())
    item_index = {code: i for i, code in enumerate(item_ids)}

    noise_multiplier = insight.noise_multiplier_for(epsilon, delta, accountant)
    event = insight.gaussian_event(noise_multiplier)
    spent = insight.event_epsilon(event, delta, accountant)
    if ledger is not None:
        _check_budgets(ledger, storefronts, dataset, spent, delta)
    run_id = f"return-quality-{uuid.uuid4().hex}"
    releases = []
    for name in storefronts:
        if ledger is not None:  # write-ahead: paid before the counts exist
            ledger.record(run_id, name, dataset, 0, spent, delta, UNITS["record"], accountant)
        pairs = pairs_of(lines[lines["silo"] == name], item_index)
        release = release_quality_counts(
            pairs, item_ids, settings, noise_multiplier,
            NoiseStream.of(noise_seed, "return-quality", slug(name)), seed=seed,
        )  # fmt: skip
        if release.event != event:
            raise ValueError("the release's noise is not the one the ledger was charged for")
        releases.append(release)

    overall = overall_rate(
        np.array([r.total_sold for r in releases]),
        np.array([r.total_returned for r in releases]),
        np.array([r.scales["total_sold"] for r in releases]),
        np.array([r.scales["total_returned"] for r in releases]),
    )
    estimates = estimate_rates(
        np.stack([r.sold for r in releases]),
        np.stack([r.returned for r in releases]),
        np.array([r.scales["sold"] for r in releases]),
        np.array([r.scales["returned"] for r in releases]),
        overall,
        settings,
    )
    names = lines.groupby("StockCode")["Description"].agg(lambda s: s.value_counts().index[0])
    keep = np.flatnonzero(estimates.eligible)
    items = pd.DataFrame(
        {
            "item_id": [item_ids[i] for i in keep],
            "name": [names[item_ids[i]] for i in keep],
            "effective_buyers": estimates.effective_buyers[keep],
            "p_value": estimates.p_value[keep],
            "rate": estimates.rate[keep],
            "low": estimates.low[keep],
            "high": estimates.high[keep],
            "flagged": estimates.flagged[keep],
            "confirmed": estimates.confirmed[keep],
        }
    )
    report = {
        "mechanism": MECHANISM,
        "unit": UNITS["record"],
        "epsilon": spent,
        "epsilon_requested": epsilon,
        "delta": delta,
        "delta_population": population,
        "accountant": accountant,
        "noise_multiplier": noise_multiplier,
        "sensitivity": settings.sensitivity,
        "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
        "sigma": releases[0].scales,
        "noise_seed_known": noise_seed is not None,
        "ledger_run_id": run_id if ledger is not None else None,
        "overall_rate": estimates.overall,
        "flag_threshold": estimates.threshold,
        "tested_items": len(keep),
        "flagged_items": int(estimates.flagged.sum()),
        "expected_chance_flags_at_most": len(keep) * (1 - settings.level) / 2,
        "confirmed_items": int(estimates.confirmed.sum()),
        "flag_rule": (
            f"flagged: the lower end of the item's {settings.level:g} interval is above "
            f"{1 + settings.margin:g} × the overall rate (per item); confirmed: the one-sided test "
            f"of the same, Benjamini-Hochberg at false discovery rate {settings.fdr:g} over the "
            f"{len(keep)} tested items"
        ),
    }
    return QualityView(
        items=items,
        overall_rate=estimates.overall,
        threshold=estimates.threshold,
        epsilon=spent,
        delta=delta,
        noise_multiplier=noise_multiplier,
        storefronts=storefronts,
        releases=releases,
        report=report,
    )
