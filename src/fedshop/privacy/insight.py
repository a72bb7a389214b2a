"""Cross-border insight: which products over-index in a storefront against the whole shop, from
counts each storefront releases under differential privacy.

What one storefront releases, once, with the Gaussian mechanism (`privacy/mechanisms.py`):
- N_s, its number of customers, and
- c_{s,i}, for every catalogue item, the number of its distinct customers who bought item i,
  where each customer counts for at most `max_items` items.

Sensitivity (add-or-remove-one customer, the adjacency the rest of FedShop's accounting uses): one
customer moves N_s by 1 and at most `max_items` item counts by 1 each, so the vector (N_s, c_{s,·})
moves by at most √(max_items + 1) in L2. Both parts are released as one vector with that
sensitivity and one σ: one `GaussianDpEvent`, whose ε at δ comes from dp-accounting. (Releasing
them apart at noise multipliers z₁, z₂ is, for the accountant, the same Gaussian at
z = (z₁⁻² + z₂⁻²)^-½; one σ for both is the simplest point of that trade-off.)

Contribution bounding. A customer who bought more than `max_items` items keeps a subset of exactly
`max_items` of them, the ones with the smallest keyed hash of (seed, customer id, item id). That is
a uniform random subset, so no item is favoured (keeping the first items by catalogue order would
undercount whatever sorts last, and catalogue order follows stock codes, i.e. product families), yet
it is a function of that customer's own record and a public seed only: adding or removing one
customer cannot change which items any other customer keeps, so the sensitivity bound holds for
every seed. (A random generator drawn customer after customer would not have that property: one
more customer shifts every later customer's draws.) The released counts therefore measure the
bounded data; the lift computed from them is the lift of the bounded counts, in which a heavy buyer
weighs `max_items` items' worth, not their whole history.

Everything after the release is computed from the released values and σ alone (and public
randomness), so it costs no further privacy (`over_indexing`):
- lift_{s,i} = (c_{s,i}/N_s) / (C_i/N), C_i and N the sums of the released values over storefronts;
- a 90% interval for it by the delta method on log(lift), from the known Gaussian noise;
- which items to show is chosen on one view of the release and measured on another, independent
  one (Gaussian data fission): otherwise the items shown are those whose noise happened to be
  high, and their intervals miss far more often than 10% of the time.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import dp_accounting as dpa
import numpy as np
from scipy import stats

from fedshop.errors import ConfigError, DataError
from fedshop.privacy.accounting import epsilon as accountant_epsilon
from fedshop.privacy.accounting import noise_for_target
from fedshop.privacy.mechanisms import gaussian_mechanism
from fedshop.seeding import NoiseStream

DEFAULT_MAX_ITEMS = 20
INTERVAL_LEVEL = 0.9
# Items are listed only where the noisy count clears t·σ, t chosen so that over the whole table
# (every storefront × every item) pure noise is expected to clear it this many times in all.
NOISE_ONLY_LISTINGS = 0.1
# Fission (see `over_indexing`): the share of the release's precision that chooses the items.
CHOOSING_SHARE = 0.8


@dataclass(frozen=True)
class Histories:
    """One storefront's customers and the catalogue items each bought (CSR rows)."""

    customer_ids: np.ndarray  # one id per row (strings)
    indptr: np.ndarray  # int64, len(customer_ids) + 1
    items: np.ndarray  # int64 catalogue indices

    def __post_init__(self) -> None:
        if len(self.indptr) != len(self.customer_ids) + 1 or self.indptr[0] != 0:
            raise DataError("purchase histories: indptr does not match the customers")
        if np.any(np.diff(self.indptr) < 0) or self.indptr[-1] != len(self.items):
            raise DataError("purchase histories: indptr is not a valid CSR row index")

    @property
    def n_customers(self) -> int:
        return len(self.customer_ids)

    def rows(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_customers), np.diff(self.indptr))


@dataclass(frozen=True)
class CountRelease:
    """One storefront's released counts and what they cost."""

    customers: float  # noisy N_s
    item_counts: np.ndarray  # noisy c_{s,i}, float64, one per catalogue item
    scale: float  # σ of the Gaussian noise on every value
    noise_multiplier: float  # z = σ / sensitivity
    sensitivity: float  # √(max_items + 1)
    max_items: int
    event: dpa.DpEvent  # what the accountant composes for this release


def _hash64(texts: Sequence[str], salt: str) -> np.ndarray:
    return np.array(
        [
            int.from_bytes(
                hashlib.blake2b(f"{salt}\x1f{t}".encode(), digest_size=8).digest(), "big"
            )
            for t in texts
        ],
        dtype=np.uint64,
    )


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection on 64-bit words that spreads every input bit."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def bound_contributions(
    histories: Histories, item_ids: Sequence[str], max_items: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, items) of each customer's distinct items, at most `max_items` per customer: those with
    the smallest keyed hash of (seed, customer id, item id), a uniform subset that depends on that
    customer's record alone (see the module docstring)."""
    if max_items < 1:
        raise ConfigError(f"max_items must be at least 1, got {max_items}")
    n_items = len(item_ids)
    items = np.asarray(histories.items, dtype=np.int64)
    if items.size and (items.min() < 0 or items.max() >= n_items):
        raise DataError(f"purchase histories name items outside the catalogue of {n_items}")
    rows = histories.rows()
    # Distinct (customer, item) pairs: a customer counts once per item however often they bought it.
    pairs = np.unique(rows * n_items + items)
    rows, items = pairs // n_items, pairs % n_items
    customer_keys = _hash64([str(c) for c in histories.customer_ids], f"insight-bounding\x1f{seed}")
    item_keys = _hash64([str(i) for i in item_ids], "insight-item")
    priority = _mix64(customer_keys[rows] ^ _mix64(item_keys[items]))
    order = np.lexsort((priority, rows))  # by customer, then by priority
    rows, items = rows[order], items[order]
    starts = np.searchsorted(rows, rows, side="left")
    keep = np.arange(len(rows)) - starts < max_items
    return rows[keep], items[keep]


def item_customer_counts(
    histories: Histories, item_ids: Sequence[str], max_items: int, seed: int
) -> np.ndarray:
    """c_{s,i} before noise: distinct customers per item, each customer counting for at most
    `max_items` items."""
    _, items = bound_contributions(histories, item_ids, max_items, seed)
    return np.bincount(items, minlength=len(item_ids)).astype(np.float64)


def sensitivity(max_items: int) -> float:
    """L2 sensitivity of (N_s, c_{s,·}) under adding or removing one customer."""
    return math.sqrt(max_items + 1)


def gaussian_event(noise_multiplier: float) -> dpa.DpEvent:
    """What one storefront's release is, for the accountant: one Gaussian at z = σ/sensitivity."""
    return dpa.GaussianDpEvent(noise_multiplier)


@functools.lru_cache(maxsize=64)
def noise_multiplier_for(epsilon: float, delta: float, accountant: str) -> float:
    """The smallest z whose one Gaussian release costs at most (ε, δ), by the accountant's search
    (no ε formula of ours). Cached: a PLD search takes seconds, and its answer never changes."""
    return noise_for_target(epsilon, delta, gaussian_event, accountant)


def event_epsilon(event: dpa.DpEvent, delta: float, accountant: str) -> float:
    return accountant_epsilon(event, delta, accountant)


def release_counts(
    histories: Histories,
    item_ids: Sequence[str],
    max_items: int,
    noise_multiplier: float,
    rng: NoiseStream | np.random.Generator,
    seed: int = 0,
) -> CountRelease:
    """One storefront's release: (N_s, c_{s,·}) plus N(0, σ²) on every value, σ = z·√(max_items+1).
    `rng` is the storefront's secret `NoiseStream` (a numpy Generator only where the noise need not
    be secret: simulations); `seed` picks the bounding subsets (public, see the module docstring)."""
    counts = item_customer_counts(histories, item_ids, max_items, seed)
    values = np.concatenate([[float(histories.n_customers)], counts])
    release = gaussian_mechanism(values, sensitivity(max_items), noise_multiplier, rng)
    return CountRelease(
        customers=float(release.values[0]),
        item_counts=release.values[1:],
        scale=release.scale,
        noise_multiplier=noise_multiplier,
        sensitivity=release.sensitivity,
        max_items=max_items,
        event=release.event,
    )


# --- Post-processing: from the released values and σ only ---------------------------------------


def lifts(customers: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """lift_{s,i} = (c_{s,i} / N_s) / (C_i / N), C_i and N the sums over storefronts.
    `customers`: (S,), `counts`: (S, I). Where C_i ≤ 0 the lift is +inf (nothing to compare with)."""
    customers = np.asarray(customers, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    share_here = counts / customers[..., :, None]
    share_shop = counts.sum(axis=-2, keepdims=True) / customers.sum(axis=-1)[..., None, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = share_here / share_shop
    return np.where(share_shop > 0, out, np.inf)


def listing_threshold(cells: int, expected_noise_only: float = NOISE_ONLY_LISTINGS) -> float:
    """t such that `cells` values of pure N(0, σ²) noise clear t·σ `expected_noise_only` times in
    all (a Bonferroni-style bound for a table of storefronts × items)."""
    return float(stats.norm.isf(expected_noise_only / max(cells, 1)))


def lift_intervals(
    customers: np.ndarray,
    counts: np.ndarray,
    scale: np.ndarray,
    cells: Sequence[tuple[int, int]],
    level: float = INTERVAL_LEVEL,
) -> np.ndarray:
    """A `level` interval for the lift of each (storefront s, item i) in `cells`, by the delta
    method on the log scale: log L = log c_{s,i} − log N_s − log C_i + log N, each term's noise
    Gaussian with the known σ, c_{s,i} inside C_i and N_s inside N (hence the covariances), so

        Var(log L) ≈ σ_s²/c² + σ_s²/N_s² + σ_C²/C² + σ_C²/N² − 2σ_s²/(c·C) − 2σ_s²/(N_s·N),

    σ_C² = Σ_s σ_s² (the noise of a sum over storefronts), and the interval is
    L·exp(±z·√Var). Deterministic, closed form; on the log scale because a ratio of noisy counts is
    skewed. It holds where every count in the ratio is well above its noise, which the listing
    threshold ensures (`over_indexing`); measured coverage on real counts: tests/test_insight.py.
    Where a count in the ratio is not positive the lift is not measured: (0, inf). The interval
    covers the noise of the release only: the counts are a census of the storefront's customers,
    not a sample. Returns (len(cells), 2)."""
    customers = np.asarray(customers, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    var_s = np.asarray(scale, dtype=np.float64) ** 2
    var_total = var_s.sum()
    total_customers = customers.sum()
    z = float(stats.norm.isf((1 - level) / 2))
    out = np.empty((len(cells), 2))
    for k, (s, i) in enumerate(cells):
        c, n_s, total = counts[s, i], customers[s], counts[:, i].sum()
        if min(c, n_s, total, total_customers) <= 0:
            out[k] = (0.0, math.inf)
            continue
        variance = var_s[s] * (
            1 / c**2 + 1 / n_s**2 - 2 / (c * total) - 2 / (n_s * total_customers)
        ) + var_total * (1 / total**2 + 1 / total_customers**2)
        lift = (c / n_s) / (total / total_customers)
        half = min(z * math.sqrt(max(variance, 0.0)), 700.0)  # exp(710) overflows a float
        out[k] = (lift * math.exp(-half), lift * math.exp(half))
    return out


def fission(
    values: np.ndarray, scale: np.ndarray | float, share: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split one Gaussian release X = x + N(0, σ²) into two *independent* Gaussian views of x
    (data fission, Leiner, Duan, Wasserman & Ramdas, JASA 2023): with fresh W ~ N(0, σ²) and
    τ² = 1/share − 1,  X + τW ~ N(x, σ²/share)  and  X − W/τ ~ N(x, σ²/(1 − share)),  independent
    of each other. Returns (first, second, σ of first, σ of second). W may be public: this is
    post-processing of the release."""
    if not 0 < share < 1:
        raise ValueError(f"share must be in (0, 1), got {share}")
    tau = math.sqrt(1 / share - 1)
    scale = np.asarray(scale, dtype=np.float64)
    fresh = scale * rng.standard_normal(np.shape(values))
    return (
        values + tau * fresh,
        values - fresh / tau,
        scale / math.sqrt(share),
        scale / math.sqrt(1 - share),
    )


@dataclass(frozen=True)
class OverIndexed:
    silo: int
    item: int
    count: float  # c_{s,i} as measured (the measuring view of the release)
    lift: float  # measured lift; ≤ 0 or inf where a count in it is not positive
    interval: tuple[float, float]  # INTERVAL_LEVEL interval from the measuring view; hi may be inf
    chosen_lift: float  # the lift in the choosing view, by whose interval the list is ordered


def candidates(
    customers: np.ndarray, counts: np.ndarray, scale: np.ndarray, threshold: float
) -> np.ndarray:
    """(S, I) mask of the cells whose lift is > 1 and where every count it divides or multiplies
    clears threshold·(its σ): c_{s,i} ≥ t·σ_s, N_s ≥ t·σ_s, C_i ≥ t·σ_C and N ≥ t·σ_C, σ_C the
    noise of a sum over storefronts. Below that a count is mostly noise, and a ratio of it means
    nothing."""
    total_scale = math.sqrt(float((scale**2).sum()))
    return (
        (counts >= threshold * scale[:, None])
        & (customers >= threshold * scale)[:, None]
        & (counts.sum(axis=0) >= threshold * total_scale)[None, :]
        & (customers.sum() >= threshold * total_scale)
        & (lifts(customers, counts) > 1)
    )


def over_indexing(
    customers: np.ndarray,
    counts: np.ndarray,
    scale: np.ndarray,
    top: int,
    threshold: float | None = None,
    level: float = INTERVAL_LEVEL,
    choosing_share: float = CHOOSING_SHARE,
    seed: int = 0,
) -> list[list[OverIndexed]]:
    """Per storefront, up to `top` over-indexing items with a lift and its interval.

    Choosing which items to show from the same noisy values that measure them overstates them:
    the items that clear a threshold, or come first in a ranking, are mostly those whose noise
    was high (measured on Online Retail: a third to a half of such 90% intervals missed the true
    lift). So the release is split by `fission` into two independent views: the choosing view
    (`choosing_share` of the precision) picks the candidates (`candidates`, threshold t defaulting
    to `listing_threshold` of the table) and orders them by the lower end of their interval in
    that view; the measuring view, untouched by the choice, gives the count, the lift and the
    interval that are reported. Costs no privacy: post-processing with public randomness."""
    customers = np.asarray(customers, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    if threshold is None:
        threshold = listing_threshold(counts.size)
    rng = np.random.default_rng(seed)
    choose_customers, measure_customers, choose_scale, measure_scale = fission(
        customers, scale, choosing_share, rng
    )
    choose_counts, measure_counts, _, _ = fission(counts, scale[:, None], choosing_share, rng)
    mask = candidates(choose_customers, choose_counts, choose_scale, threshold)
    cells = [(int(s), int(i)) for s, i in zip(*np.nonzero(mask), strict=True)]
    order = lift_intervals(choose_customers, choose_counts, choose_scale, cells, level)[:, 0]
    chosen_lifts = lifts(choose_customers, choose_counts)
    listed: list[list[tuple[float, int, int]]] = [[] for _ in customers]
    for (s, i), low in zip(cells, order, strict=True):
        listed[s].append((-low, i, s))
    picked = [sorted(entries)[:top] for entries in listed]
    flat = [(s, i) for entries in picked for _, i, s in entries]
    intervals = lift_intervals(measure_customers, measure_counts, measure_scale, flat, level)
    measured = lifts(measure_customers, measure_counts)
    result: list[list[OverIndexed]] = [[] for _ in customers]
    for (s, i), (low, high) in zip(flat, intervals, strict=True):
        result[s].append(
            OverIndexed(
                silo=s, item=i, count=float(measure_counts[s, i]), lift=float(measured[s, i]),
                interval=(float(low), float(high)), chosen_lift=float(chosen_lifts[s, i]),
            )
        )  # fmt: skip
    return result
