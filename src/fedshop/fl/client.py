"""A silo: owns its customers' data and its private parameters; sends only shared-parameter updates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import torch

from fedshop.config import ModelConfig, RunConfig, TrainConfig
from fedshop.data.interactions import SiloData
from fedshop.eval.metrics import MetricSums, evaluate
from fedshop.fl.local_round import LocalTraining
from fedshop.messages import AggregationPipeline, ClientMessage
from fedshop.models.spec import Params, get_model, score_all
from fedshop.models.train import train_bpr
from fedshop.seeding import torch_generator

if TYPE_CHECKING:  # the DP modules (and their accountant) load only for DP runs
    from fedshop.fl.dp_local import DpSgd, DpSgdState
    from fedshop.privacy.dp import DpPlan
    from fedshop.storage.audit import Signer


@dataclass(frozen=True)
class LocalTask:
    """What a silo does with the shared model each round."""

    epochs: int  # local epochs of BPR training
    reconstruction_epochs: int = 0  # first refit the private parameters alone (FedRecon)
    # Record-level DP: DP-SGD over the silo's customers replaces the epochs.
    dp: DpSgd | None = None
    # FedProx's μ: μ/2·‖w − w_global‖² on the shared parameters in the local loss (0: off).
    proximal_mu: float = 0.0

    @classmethod
    def of_run(cls, config: RunConfig, plan: DpPlan | None = None) -> LocalTask:
        """Each silo's work in a round of `config`: local epochs, or the DP plan's DP-SGD."""
        dp = None
        if plan is not None:
            from fedshop.fl.dp_local import DpSgd

            dp = DpSgd(plan.noise_multiplier, plan.clip, plan.sampling_rate, plan.steps_per_round)
        fed = config.federated
        return cls(fed.local_epochs, fed.reconstruction_epochs, dp, fed.proximal_mu)


@dataclass
class SiloDp:
    """A silo's record-level DP state: its DP-SGD streams and moments, and its customer count as
    released once with noise (its weight in the mean, never the true count)."""

    state: DpSgdState
    released_count: float


class SiloState:
    """What a silo carries from one round to the next: its private parameters (`_private`) and its
    random stream (`_generator`); both kinds of silo client (recommendation, fit) keep these, and
    both sign what they receive with the silo's own audit key (`signer`, fl/audit.py), if it has
    one."""

    _private: Params
    _generator: torch.Generator
    signer: Signer | None = None  # the silo's own audit key (fl/audit.py), if it has one

    def state_dict(self) -> dict:
        """For a silo that runs as a fresh process each round or restarts."""
        return {"private": self.private_state(), "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._private = {k: v.clone() for k, v in state["private"].items()}
        self._generator.set_state(state["generator"])

    def private_state(self) -> dict[str, torch.Tensor]:
        """For the silo's own storage (its run-folder entry), never for the server."""
        return {k: v.clone() for k, v in self._private.items()}

    def acknowledge(self, run: str, round_number: int, shared: Params) -> str | None:
        """This silo's signature on the hash of the global model it received for `round_number`
        (0: the final model), for the run's audit log; None without a key."""
        from fedshop.fl.audit import acknowledge

        return acknowledge(self.signer, run, round_number, shared)


class SiloClient(SiloState):
    def __init__(
        self,
        index: int,
        data: SiloData,
        model: ModelConfig,
        train: TrainConfig,
        pipeline: AggregationPipeline,
        seed: int,
        client_learning_rate: float = 2.0,
    ) -> None:
        self.index = index
        self.data = data
        self.train_config = train
        self.pipeline = pipeline
        self.spec = get_model(model.name)
        # Private state: user embeddings and the silo's item-bias offsets. Never part of a message.
        self._private = self.spec.init_private(
            data.n_users, data.train.shape[1], model, torch_generator(seed, "silo", index, "users")
        )
        self._generator = torch_generator(seed, "silo", index, "train")
        self.client_learning_rate = client_learning_rate
        self.dp: SiloDp | None = None  # set for record-level DP runs

    @property
    def name(self) -> str:
        return self.data.name

    def fit(self, global_shared: Params, task: LocalTask) -> ClientMessage:
        """Train locally from the global shared parameters; return the (staged) update to send.

        With `task.reconstruction_epochs`, the private parameters are first refitted against the
        frozen global parameters (Federated Reconstruction, Singhal et al. 2021); only the training
        that follows produces the update. With `task.dp` that training is DP-SGD over the silo's
        customers (`fl/dp_local.py`), the message carries the DP event of the noise added, and its
        weight is the silo's released (noisy) customer count.
        """
        self.personalise(global_shared, task.reconstruction_epochs)
        if task.dp is None:
            result = train_bpr(
                global_shared, self._private, self.data.train, task.epochs,
                self.train_config, self._generator, spec=self.spec, proximal_mu=task.proximal_mu,
            )  # fmt: skip
            self._private = result.private
            local, steps, examples, event = result.shared, result.steps, self.data.n_train, None
        else:
            from fedshop.fl.dp_local import dp_sgd_steps

            if self.dp is None:
                raise RuntimeError(f"silo {self.name} has no DP state for a DP round")
            training = LocalTraining(
                1, self.client_learning_rate, self.train_config.l2, self.train_config.negatives
            )
            local, event = dp_sgd_steps(
                self.spec, global_shared, self._private, self.data.train, task.dp, training,
                self.dp.state,
            )  # fmt: skip
            steps, examples = task.dp.steps, self.dp.released_count
        delta = {k: local[k] - global_shared[k] for k in global_shared}
        message = ClientMessage(
            tensors=delta, weight=1.0, num_examples=examples, local_steps=steps, dp_event=event
        )
        return self.pipeline.on_client(message)

    def personalise(self, global_shared: Params, epochs: int) -> None:
        """Refit the private parameters against fixed shared parameters; nothing is sent."""
        if epochs <= 0:
            return
        result = train_bpr(
            global_shared, self._private, self.data.train, epochs,
            self.train_config, self._generator, update_shared=False, spec=self.spec,
        )  # fmt: skip
        self._private = result.private

    def evaluate(
        self, global_shared: Params, split: str = "test", customers: np.ndarray | None = None
    ) -> MetricSums:
        """Evaluate this silo's customers locally; only metric sums would leave the silo. With
        `customers` (local rows), only those of them that have held-out items."""
        private = self._private
        heldout = self.data.heldout(split)
        if customers is not None:
            keep = np.zeros(heldout.shape[0], dtype=np.float32)
            keep[customers] = 1.0
            heldout = (sp.diags(keep) @ heldout).tocsr()
            heldout.eliminate_zeros()
        return evaluate(
            lambda rows: score_all(self.spec, global_shared, private, torch.from_numpy(rows)),
            self.data.train,
            heldout,
            negatives=self.data.eval_negatives,
        )
