"""A silo: owns its customers' data and their user embeddings; sends only shared-parameter updates."""

from __future__ import annotations

import torch

from fedshop.config import ModelConfig, TrainConfig
from fedshop.data.interactions import SiloData
from fedshop.eval.metrics import MetricSums, evaluate
from fedshop.fl.stages import AggregationPipeline, ClientMessage
from fedshop.models.mf import SHARED_PARAMETERS, Params, init_user_embedding, score_all
from fedshop.models.train import train_bpr
from fedshop.seeding import torch_generator


class SiloClient:
    def __init__(
        self,
        index: int,
        data: SiloData,
        model: ModelConfig,
        train: TrainConfig,
        pipeline: AggregationPipeline,
        seed: int,
    ) -> None:
        self.index = index
        self.data = data
        self.train_config = train
        self.pipeline = pipeline
        # Private state: never part of a ClientMessage.
        self._user_embedding = init_user_embedding(
            data.n_users, model.dim, model.init_std, torch_generator(seed, "silo", index, "users")
        )
        self._generator = torch_generator(seed, "silo", index, "train")

    @property
    def name(self) -> str:
        return self.data.name

    def fit(self, global_shared: Params, epochs: int) -> ClientMessage:
        """Train locally from the global shared parameters; return the (staged) update to send."""
        result = train_bpr(
            global_shared,
            self._user_embedding,
            self.data.train,
            epochs,
            self.train_config,
            self._generator,
        )
        self._user_embedding = result.user_embedding
        delta = {k: result.shared[k] - global_shared[k] for k in SHARED_PARAMETERS}
        message = ClientMessage(tensors=delta, weight=1.0, num_examples=self.data.n_train)
        return self.pipeline.on_client(message)

    def personalise(self, global_shared: Params, epochs: int) -> None:
        """Refit this silo's user embeddings against fixed shared parameters; nothing is sent."""
        if epochs <= 0:
            return
        result = train_bpr(
            global_shared,
            self._user_embedding,
            self.data.train,
            epochs,
            self.train_config,
            self._generator,
            update_shared=False,
        )
        self._user_embedding = result.user_embedding

    def evaluate(self, global_shared: Params, split: str = "test") -> MetricSums:
        """Evaluate this silo's customers locally; only metric sums would leave the silo."""
        users = self._user_embedding
        return evaluate(
            lambda rows: score_all(users[rows], global_shared),
            self.data.train,
            self.data.heldout(split),
        )

    def private_state(self) -> dict[str, torch.Tensor]:
        """For the silo's own storage (its run-folder entry), never for the server."""
        return {"user_embedding": self._user_embedding.clone()}
