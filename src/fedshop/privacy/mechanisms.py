"""Laplace and Gaussian mechanisms for the counts FedShop releases, each with its `DpEvent`.

Two kinds of counts leave the private data:
- item popularity (how many distinct shoppers bought each item), used for negative sampling, cold start
  and the popularity baseline;
- per-silo customer counts, shown in reports and used as aggregation weights.

Adjacency: add-or-remove-one *user* (shopper). Two datasets are neighbours when one has all the
interactions of one extra shopper. This matches the `ADD_OR_REMOVE_ONE` relation the accountants in
`fedshop.privacy.accounting` use for training, so every release here composes with training as is.

Contribution bounding: one shopper can buy many items, and each purchase adds 1 to a different item
count. Without a cap, adding one shopper changes the popularity vector by up to the catalogue size in
L1 norm (√catalogue in L2), so the noise would have to drown every count. `bound_contributions` keeps
at most k items per shopper, chosen uniformly at random (independently of the other shoppers' data), so
the popularity vector of distinct-user counts has L1 sensitivity k and L2 sensitivity √k. The silo
counts need no cap: each shopper lives in exactly one silo, so one shopper moves one count by 1
(L1 = L2 = 1).

Accounting: each release returns the event the caller must compose into its accountant,
`LaplaceDpEvent(b/Δ1)` or `GaussianDpEvent(σ/Δ2)` (dp-accounting expresses noise relative to the
sensitivity). No ε formula is written here: ε always comes from the library. In dp-accounting 0.6 *both*
accountants support `LaplaceDpEvent`: PLD exactly (ε at δ = 1e-12 is the pure ε = Δ1/b to the
discretisation), RDP through Mironov's (2017, Prop. 6) Rényi curve, which after conversion is slightly
loose (about +0.005 at δ = 1e-6, +0.02 at δ = 1e-12, additive). At δ = 0 both report ε = ∞ (they only
answer for δ > 0), so ask for a tiny δ to see the pure ε. `_check_supported` still turns an accountant
that cannot take the event into a `ConfigError` that names the PLD accountant, in case this changes.

Post-processing: anything computed from a released vector alone (rounding, clamping at zero,
normalising into sampling probabilities, ranking) costs no further privacy. The release functions can
clamp at zero on request (`clamp_at_zero=True`), which is such post-processing; by default the noisy
values are returned unclamped, which keeps them unbiased.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import dp_accounting as dpa
import numpy as np
import scipy.sparse as sp

from fedshop.errors import ConfigError
from fedshop.privacy.accounting import make_accountant, noise_for_epsilon

MECHANISMS = ("laplace", "gaussian")


@dataclass(frozen=True)
class NoisyRelease:
    values: np.ndarray  # the released (noisy) values, float64; same shape as the input
    event: dpa.DpEvent  # what the accountant must compose for this release
    mechanism: str  # "laplace" or "gaussian"
    scale: float  # Laplace b, or Gaussian σ
    sensitivity: float  # the L1 (laplace) or L2 (gaussian) sensitivity it was calibrated to


# ---------------------------------------------------------------------------------------- validation


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive finite number, got {value}")
    return value


def _delta(delta: float) -> float:
    delta = float(delta)
    if not 0 < delta < 1:
        raise ConfigError(f"δ must be in (0, 1) for the Gaussian mechanism, got {delta}")
    return delta


def _mechanism(name: str) -> str:
    if name not in MECHANISMS:
        raise ConfigError(f"mechanism must be one of {', '.join(MECHANISMS)}; got '{name}'")
    return name


def _as_values(values: np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ConfigError("values to release must be finite")
    return array


def _check_supported(event: dpa.DpEvent, accountant: str) -> None:
    """Fail now, with a hint, rather than when the caller composes the event later."""
    if not make_accountant(accountant).supports(event):
        hint = " (use the 'pld' accountant)" if accountant != "pld" else ""
        raise ConfigError(
            f"the '{accountant}' accountant cannot account a {type(event).__name__}{hint}"
        )


def _clamped(release: NoisyRelease, clamp_at_zero: bool) -> NoisyRelease:
    # Post-processing of the released vector only: no privacy cost, the event is unchanged.
    if not clamp_at_zero:
        return release
    return replace(release, values=np.maximum(release.values, 0.0))


# ---------------------------------------------------------------------------------------- mechanisms


def laplace_mechanism(
    values: np.ndarray, l1_sensitivity: float, epsilon: float, rng: np.random.Generator
) -> NoisyRelease:
    """ε-DP release of `values` (pure DP) with Laplace noise b = Δ1/ε on every coordinate."""
    sensitivity = _positive("L1 sensitivity", l1_sensitivity)
    epsilon = _positive("ε", epsilon)
    array = _as_values(values)
    scale = sensitivity / epsilon
    noisy = array + rng.laplace(0.0, scale, size=array.shape)
    # dp-accounting's Laplace "noise multiplier" is b/Δ1 = 1/ε.
    event = dpa.LaplaceDpEvent(scale / sensitivity)
    return NoisyRelease(noisy, event, "laplace", scale, sensitivity)


def gaussian_mechanism(
    values: np.ndarray,
    l2_sensitivity: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> NoisyRelease:
    """Release of `values` with Gaussian noise σ = z·Δ2 on every coordinate; ε(δ) from the event."""
    sensitivity = _positive("L2 sensitivity", l2_sensitivity)
    noise_multiplier = _positive("noise multiplier", noise_multiplier)
    array = _as_values(values)
    scale = noise_multiplier * sensitivity
    noisy = array + rng.normal(0.0, scale, size=array.shape)
    return NoisyRelease(
        noisy, dpa.GaussianDpEvent(noise_multiplier), "gaussian", scale, sensitivity
    )


def gaussian_for_epsilon(
    values: np.ndarray,
    l2_sensitivity: float,
    epsilon: float,
    delta: float,
    rng: np.random.Generator,
    accountant: str = "rdp",
) -> NoisyRelease:
    """(ε, δ)-DP Gaussian release, with the smallest z the named accountant certifies for one step.

    PLD is (near) exact for one Gaussian, so it needs less noise than RDP for the same (ε, δ)."""
    epsilon = _positive("ε", epsilon)
    delta = _delta(delta)
    make_accountant(accountant)  # a clear error for an unknown name before the search runs
    z = noise_for_epsilon(epsilon, delta, steps=1, kind=accountant)
    return gaussian_mechanism(values, l2_sensitivity, z, rng)


# --------------------------------------------------------------------------- contribution bounding


def bound_contributions(
    train: sp.spmatrix, max_items_per_user: int, rng: np.random.Generator
) -> sp.csr_matrix:
    """A binary users × items matrix where each user (row) keeps at most `max_items_per_user` of
    their distinct items (nonzero entries), chosen uniformly at random (users with fewer keep all)."""
    if isinstance(max_items_per_user, bool) or int(max_items_per_user) != max_items_per_user:
        raise ConfigError(f"max_items_per_user must be an integer, got {max_items_per_user!r}")
    k = int(max_items_per_user)
    if k < 1:
        raise ConfigError(f"max_items_per_user must be at least 1, got {k}")
    # Distinct items only: repeat purchases and quantities are the same one user, not more users.
    matrix = sp.csr_matrix(train, dtype=np.float64, copy=True)
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    n_users = matrix.shape[0]
    if n_users >= 2**31:
        raise ConfigError(f"too many users to bound in one matrix ({n_users})")
    rows = np.repeat(np.arange(n_users, dtype=np.int64), np.diff(matrix.indptr))
    # A uniform random k-subset of each row = the k smallest of i.i.d. uniform keys. Sorting by
    # (row, key) gives each entry its rank within its row without a Python loop over users; packing
    # both into one int64 makes it one argsort (about 10× faster than np.lexsort on millions of
    # entries). Ties between 32-bit keys in one row are ~1e-9 likely and only break by column order.
    keys = rng.integers(0, 2**32, size=matrix.nnz, dtype=np.int64)
    order = np.argsort((rows << 32) | keys, kind="stable")
    rank = np.arange(matrix.nnz) - matrix.indptr[rows[order]]
    keep = np.sort(order[rank < k])  # back in CSR order, so the result stays canonical
    data = np.ones(keep.size, dtype=np.float64)
    indptr = np.concatenate(([0], np.cumsum(np.bincount(rows[keep], minlength=n_users))))
    return sp.csr_matrix((data, matrix.indices[keep], indptr), shape=matrix.shape)


def bounded_item_counts(
    train: sp.csr_matrix, max_items_per_user: int, rng: np.random.Generator
) -> tuple[np.ndarray, float, float]:
    """Per-item counts of distinct users after `bound_contributions`, with the (L1, L2) sensitivity
    of that vector under add/remove-one-user: (k, √k), since one user adds 1 to at most k items."""
    bounded = bound_contributions(train, max_items_per_user, rng)
    counts = np.bincount(bounded.indices, minlength=bounded.shape[1]).astype(np.float64)
    k = int(max_items_per_user)
    return counts, float(k), math.sqrt(k)


# ------------------------------------------------------------------------------------ the releases


def release_item_popularity(
    train: sp.csr_matrix,
    epsilon: float,
    delta: float,
    mechanism: str,
    max_items_per_user: int,
    rng: np.random.Generator,
    accountant: str = "rdp",
    *,
    clamp_at_zero: bool = False,
) -> NoisyRelease:
    """Noisy per-item distinct-user counts: Laplace at pure ε (δ is ignored) or Gaussian at (ε, δ)."""
    _mechanism(mechanism)
    _positive("ε", epsilon)
    if mechanism == "gaussian":
        _delta(delta)
    make_accountant(accountant)  # validate the name before spending any randomness
    counts, l1, l2 = bounded_item_counts(train, max_items_per_user, rng)
    return _release(counts, l1, l2, epsilon, delta, mechanism, rng, accountant, clamp_at_zero)


def release_counts(
    counts: np.ndarray,
    epsilon: float,
    delta: float,
    mechanism: str,
    rng: np.random.Generator,
    accountant: str = "rdp",
    *,
    clamp_at_zero: bool = False,
) -> NoisyRelease:
    """Noisy per-silo user counts. Each user is in exactly one silo, so one user changes one count by
    1: L1 = L2 = 1. Laplace at pure ε (δ is ignored) or Gaussian at (ε, δ)."""
    _mechanism(mechanism)
    return _release(counts, 1.0, 1.0, epsilon, delta, mechanism, rng, accountant, clamp_at_zero)


def _release(
    values: np.ndarray,
    l1_sensitivity: float,
    l2_sensitivity: float,
    epsilon: float,
    delta: float,
    mechanism: str,
    rng: np.random.Generator,
    accountant: str,
    clamp_at_zero: bool,
) -> NoisyRelease:
    if _mechanism(mechanism) == "laplace":
        # Check the accountant before drawing any noise: a refused release must not be computed.
        _check_supported(dpa.LaplaceDpEvent(1.0 / _positive("ε", epsilon)), accountant)
        release = laplace_mechanism(values, l1_sensitivity, epsilon, rng)
    else:
        release = gaussian_for_epsilon(values, l2_sensitivity, epsilon, delta, rng, accountant)
    return _clamped(release, clamp_at_zero)
