"""Record-level DP inside a silo: DP-SGD where the protected unit is one customer's whole history.

Each step the silo samples its customers independently with probability q (Poisson), computes every
sampled customer's own update of the shared parameters on all of their items (the cross-device round
maths, `fl/vectorised.py`, with one local step), clips each to L2 norm C, sums, adds N(0, (zC)²) to every
coordinate (`privacy.noise.GaussianNoise`) and divides by the expected count q·n. Only that noisy mean
touches the silo's copy of the shared model, through an Adam step (post-processing, so it costs
nothing). Per-example clipping of single purchases would protect one purchase, not a customer: a
shopper with 200 purchases would move the model by 200 C.

Customers' own vectors take a plain SGD step on their own loss when they are sampled. They are never
released: each serves only its customer (the "billboard" setting of joint DP).

Who is sampled and the noise come from secret `NoiseStream`s (`seeding.py`): the run seed is public,
and noise derived from it could be subtracted. The negatives hide nothing (the clip bounds a
customer's update whichever items are drawn) and follow the run seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import dp_accounting as dpa
import scipy.sparse as sp
import torch

from fedshop.config import RunConfig
from fedshop.fl.local_round import LocalTraining, draw_round, poisson_sample
from fedshop.fl.server_opt import FedAdam
from fedshop.fl.vectorised import vectorised_sum
from fedshop.messages import AggregationPipeline, mean_of
from fedshop.models.spec import ModelSpec, Params
from fedshop.privacy.accounting import gaussian_step, together
from fedshop.privacy.noise import GaussianNoise, fixed_denominator
from fedshop.seeding import NoiseStream, RandomSource, torch_generator


@dataclass(frozen=True)
class DpSgd:
    """One round of a silo's DP-SGD: `steps` noisy steps at sampling rate q, clip C, multiplier z."""

    noise_multiplier: float
    clip: float
    sampling_rate: float
    steps: int

    @property
    def dp_event(self) -> dpa.DpEvent:
        """What one round adds, declared before it runs."""
        return together([gaussian_step(self.noise_multiplier, self.sampling_rate)] * self.steps)


@dataclass
class DpSgdState:
    """A silo's DP-SGD state across rounds: its Adam moments and random streams."""

    optimizer: FedAdam
    sampling: RandomSource  # which customers take part in a step (secret: amplification needs it)
    negatives: torch.Generator
    noise: RandomSource

    STREAMS: ClassVar[tuple[str, ...]] = ("sampling", "negatives", "noise")

    @classmethod
    def start(cls, learning_rate: float, streams: dict[str, RandomSource]) -> DpSgdState:
        """A silo's state before its first DP-SGD step: fresh Adam moments and its random streams
        (named as in `STREAMS`)."""
        return cls(optimizer=FedAdam(learning_rate, tau=1e-8), **streams)

    @classmethod
    def of_run(cls, config: RunConfig, silo: int) -> DpSgdState:
        """Silo `silo`'s state at the start of `config`'s run: secret sampling and noise (from
        [privacy] noise_seed when the user gave one), negatives from the run seed."""
        noise_seed = config.privacy.known_noise_seed
        return cls.start(
            dp_learning_rate(config),
            {
                "sampling": NoiseStream.of(noise_seed, "silo", silo, "dp", "sampling"),
                "negatives": torch_generator(config.seed, "silo", silo, "dp", "negatives"),
                "noise": NoiseStream.of(noise_seed, "silo", silo, "dp", "noise"),
            },
        )


def dp_learning_rate(config: RunConfig) -> float:
    """The learning rate of DP-SGD's shared-model Adam: the task's own (a fit run trains at the fit
    model's rate, set in [fit], not [train])."""
    return config.fit.learning_rate if config.task == "fit" else config.train.learning_rate


def dp_sgd_steps(
    spec: ModelSpec,
    shared: Params,
    user_tables: Params,
    train: sp.csr_matrix,
    dp: DpSgd,
    training: LocalTraining,
    state: DpSgdState,
) -> tuple[Params, dpa.DpEvent]:
    """`dp.steps` DP-SGD steps from `shared`; returns the new shared parameters and the DP event of
    the noise drawn, and updates `user_tables` (the silo's private rows) in place."""
    customers = torch.arange(train.shape[0])
    one_step = LocalTraining(1, training.learning_rate, training.l2, training.negatives)
    noise = GaussianNoise(dp.noise_multiplier, dp.clip, state.noise, dp.sampling_rate)
    step = AggregationPipeline(
        client_stages=(),  # the clip is fused into the vectorised sum
        server_stages=(noise, fixed_denominator(dp.sampling_rate * len(customers))),
    )
    drawn = []
    for _ in range(dp.steps):
        sampled = poisson_sample(customers, dp.sampling_rate, state.sampling)
        batch = draw_round(train, sampled, 1, training.negatives, state.negatives)
        total, new_users = vectorised_sum(spec, shared, user_tables, batch, one_step, clip=dp.clip)
        for k, v in new_users.items():
            user_tables[k][sampled] = v
        total = step.server_side(total)
        drawn += total.dp_events
        shared = state.optimizer.step(shared, mean_of(total))
    return shared, together(drawn)
