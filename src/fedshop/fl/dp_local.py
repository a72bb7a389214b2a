"""Record-level DP inside a silo: DP-SGD where the protected unit is one customer's whole history.

Each step the silo samples its customers independently with probability q (Poisson), computes every
sampled customer's own update of the shared parameters on all of their items (the cross-device round
maths, `fl/vectorised.py`, with one local step), clips each to L2 norm C, sums, adds N(0, (zC)²) to every
coordinate and divides by the expected count q·n. Only that noisy mean touches the silo's copy of the
shared model, through an Adam step (post-processing, so it costs nothing). Per-example clipping of single
purchases would protect one purchase, not a customer: a shopper with 200 purchases would move the
model by 200 C.

Customers' own vectors take a plain SGD step on their own loss when they are sampled. They are never
released: each serves only its customer (the "billboard" setting of joint DP).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import scipy.sparse as sp
import torch

from fedshop.fl.local_round import LocalTraining, draw_round, poisson_sample
from fedshop.fl.server_opt import FedAdam
from fedshop.fl.stages import mean_of
from fedshop.fl.vectorised import vectorised_sum
from fedshop.models.spec import ModelSpec, Params
from fedshop.privacy.dp import DpPlan
from fedshop.privacy.mechanisms import gaussian_mechanism
from fedshop.privacy.stages import add_gaussian_noise, fixed_denominator


@dataclass
class DpSgdState:
    """A silo's DP-SGD state across rounds: its Adam moments and random streams."""

    optimizer: FedAdam
    sampling: torch.Generator
    negatives: torch.Generator
    noise: torch.Generator

    STREAMS: ClassVar[tuple[str, ...]] = ("sampling", "negatives", "noise")

    @classmethod
    def start(cls, learning_rate: float, streams: dict[str, torch.Generator]) -> DpSgdState:
        """A silo's state before its first DP-SGD step: fresh Adam moments and its random streams
        (named as in `STREAMS`)."""
        return cls(optimizer=FedAdam(learning_rate, tau=1e-8), **streams)


def dp_sgd_steps(
    spec: ModelSpec,
    shared: Params,
    user_tables: Params,
    train: sp.csr_matrix,
    plan: DpPlan,
    training: LocalTraining,
    state: DpSgdState,
) -> Params:
    """`plan.steps_per_round` DP-SGD steps from `shared`; returns the new shared parameters and
    updates `user_tables` (the silo's private rows) in place."""
    customers = torch.arange(train.shape[0])
    one_step = LocalTraining(1, training.learning_rate, training.l2, training.negatives)
    for _ in range(plan.steps_per_round):
        sampled = poisson_sample(customers, plan.sampling_rate, state.sampling)
        batch = draw_round(train, sampled, 1, training.negatives, state.negatives)
        total, new_users = vectorised_sum(
            spec, shared, user_tables, batch, one_step, clip=plan.clip
        )
        for k, v in new_users.items():
            user_tables[k][sampled] = v
        total = add_gaussian_noise(plan.noise_std, state.noise)(total)
        total = fixed_denominator(plan.sampling_rate * len(customers))(total)
        shared = state.optimizer.step(shared, mean_of(total))
    return shared


def release_counts(counts: Sequence[int], plan: DpPlan, rng: np.random.Generator) -> np.ndarray:
    """Silos' customer counts with Gaussian noise (one customer is in one silo: L2 sensitivity 1),
    the plan's fixed release. Clamping is post-processing; a silo never weighs below one customer."""
    release = gaussian_mechanism(
        np.asarray(counts, dtype=np.float64), 1.0, plan.count_noise_multiplier, rng
    )
    return np.maximum(release.values, 1.0)
