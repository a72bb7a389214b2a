"""The coordinating server: samples silos, aggregates their messages, steps the shared model."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedshop.fl.server_opt import ServerOptimizer
from fedshop.fl.stages import Aggregate, AggregationPipeline, ClientMessage
from fedshop.models.mf import Params


class FederatedServer:
    def __init__(
        self,
        shared: Params,
        pipeline: AggregationPipeline,
        optimizer: ServerOptimizer,
        n_clients: int,
        clients_per_round: int,
        generator: torch.Generator,
    ) -> None:
        self.shared = shared
        self.pipeline = pipeline
        self.optimizer = optimizer
        self.n_clients = n_clients
        # 0 (or more than there are) means everyone takes part in every round.
        self.clients_per_round = (
            n_clients if clients_per_round <= 0 else min(clients_per_round, n_clients)
        )
        self._generator = generator
        self.round = 0

    def sample_clients(self) -> list[int]:
        """Uniform sampling without replacement of a fixed number of clients per round."""
        if self.clients_per_round == self.n_clients:
            return list(range(self.n_clients))
        chosen = torch.randperm(self.n_clients, generator=self._generator)[: self.clients_per_round]
        return sorted(chosen.tolist())

    def sampling_state(self) -> torch.Tensor:
        return self._generator.get_state()

    def load_sampling_state(self, state: torch.Tensor) -> None:
        self._generator.set_state(state)

    def apply(self, messages: Sequence[ClientMessage]) -> Params:
        return self._step(self.pipeline.aggregate(messages))

    def apply_sum(self, aggregate: Aggregate) -> Params:
        """Apply a round whose messages were summed elsewhere (a deployed secure sum)."""
        return self._step(self.pipeline.finish(aggregate))

    def _step(self, delta: Params) -> Params:
        self.shared = self.optimizer.step(self.shared, delta)
        self.round += 1
        return self.shared
