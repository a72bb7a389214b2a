"""The coordinating server: samples clients, turns a round's aggregate into a step of the shared model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fedshop.fl.local_round import poisson_sample
from fedshop.fl.server_opt import ServerOptimizer, make_server_optimizer
from fedshop.messages import AggregationPipeline, ClientMessage
from fedshop.models.spec import Params
from fedshop.seeding import RandomSource, torch_generator

if TYPE_CHECKING:
    from fedshop.config import FederatedConfig


@dataclass
class Sampler:
    """Which clients of `pool` take part in a round: a fixed number drawn uniformly without
    replacement (`per_round`), or each independently with probability `poisson_rate` (the sampling
    the DP accountant assumes, then from a secret `NoiseStream`). Everyone, in pool order, when that
    is all of them."""

    pool: torch.Tensor
    generator: RandomSource
    per_round: int = 0  # 0 (or more than the pool): everyone
    poisson_rate: float | None = None

    def sample(self) -> torch.Tensor:
        if self.poisson_rate is not None:
            return poisson_sample(self.pool, self.poisson_rate, self.generator)
        if self.per_round <= 0 or self.per_round >= len(self.pool):
            return self.pool
        chosen = torch.randperm(len(self.pool), generator=self.generator)[: self.per_round]
        return torch.sort(self.pool[chosen])[0]


class FederatedServer:
    def __init__(
        self,
        shared: Params,
        pipeline: AggregationPipeline,
        optimizer: ServerOptimizer,
        sampler: Sampler,
    ) -> None:
        self.shared = shared
        self.pipeline = pipeline
        self.optimizer = optimizer
        self.sampler = sampler
        self.round = 0

    def sample_clients(self) -> list[int]:
        return self.sampler.sample().tolist()

    def sampling_state(self) -> torch.Tensor:
        return self.sampler.generator.get_state()

    def load_sampling_state(self, state: torch.Tensor) -> None:
        self.sampler.generator.set_state(state)

    def apply(self, messages: Sequence[ClientMessage]) -> Params:
        """One step from messages summed here (the plain in-process aggregation)."""
        return self.step(self.pipeline.aggregate(messages))

    def step(self, delta: Params | None) -> Params:
        """Apply the round's mean update (None: a round that moved nothing) and count the round."""
        if delta is not None:
            device = next(iter(self.shared.values())).device
            delta = {k: v.to(device) for k, v in delta.items()}
            self.shared = self.optimizer.step(self.shared, delta)
        self.round += 1
        return self.shared


def silo_server(
    config: FederatedConfig, seed: int, shared: Params, n_silos: int, pipeline: AggregationPipeline
) -> FederatedServer:
    """A cross-silo server over silos 0 … n_silos − 1 as every runtime starts it: `silos_per_round`
    of them a round from the seed's sampling stream, and the configured server optimiser."""
    sampler = Sampler(
        torch.arange(n_silos), torch_generator(seed, "server", "sampling"), config.silos_per_round
    )
    return FederatedServer(shared, pipeline, make_server_optimizer(config), sampler)
