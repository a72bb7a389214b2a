"""The Gaussian mechanism for the counts FedShop releases, with its `DpEvent`.

What it releases today: each silo's customer count under record-level DP (`privacy/dp.py`,
`release_silo_counts`), used as the silo's weight in the federated mean. Each customer is in exactly
one silo, so adding or removing one customer moves one count by 1: L2 sensitivity 1.

Adjacency: add-or-remove-one *user*, the `ADD_OR_REMOVE_ONE` relation the accountants in
`fedshop.privacy.accounting` use for training, so the release composes with training as is.

Accounting: the release returns the event the caller composes, `GaussianDpEvent(σ/Δ2)`
(dp-accounting expresses noise relative to the sensitivity). No ε formula is written here: ε always
comes from the library. Anything computed from the released vector alone (rounding, clamping)
costs no further privacy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dp_accounting as dpa
import numpy as np
import torch

from fedshop.errors import ConfigError
from fedshop.seeding import NoiseStream


@dataclass(frozen=True)
class NoisyRelease:
    values: np.ndarray  # the released (noisy) values, float64; same shape as the input
    event: dpa.DpEvent  # what the accountant must compose for this release
    scale: float  # Gaussian σ
    sensitivity: float  # the L2 sensitivity it was calibrated to


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive finite number, got {value}")
    return value


def gaussian_mechanism(
    values: np.ndarray,
    l2_sensitivity: float,
    noise_multiplier: float,
    rng: np.random.Generator | NoiseStream,
) -> NoisyRelease:
    """Release of `values` with Gaussian noise σ = z·Δ2 on every coordinate; ε(δ) from the event.
    A run's releases draw from a secret `NoiseStream`; a numpy Generator is predictable."""
    sensitivity = _positive("L2 sensitivity", l2_sensitivity)
    noise_multiplier = _positive("noise multiplier", noise_multiplier)
    array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ConfigError("values to release must be finite")
    scale = noise_multiplier * sensitivity
    if isinstance(rng, NoiseStream):
        noisy = array + scale * rng.normal(array.shape, torch.float64).numpy()
    else:
        noisy = array + rng.normal(0.0, scale, size=array.shape)
    return NoisyRelease(noisy, dpa.GaussianDpEvent(noise_multiplier), scale, sensitivity)
