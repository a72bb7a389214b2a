"""Server optimisers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

The mean client update Δ is treated as a pseudo-gradient step: FedAvg applies it, FedAvgM adds server
momentum, FedAdam adapts a per-coordinate step size.
"""

from __future__ import annotations

import torch

from fedshop.choices import SERVER_OPTIMIZERS
from fedshop.config import FederatedConfig
from fedshop.messages import Tensors


class FedAvg:
    def __init__(self, learning_rate: float = 1.0) -> None:
        self.learning_rate = learning_rate

    @classmethod
    def from_config(cls, config: FederatedConfig) -> FedAvg:
        return cls(config.server_learning_rate)

    # What a checkpoint keeps between rounds: name -> tensors ("m/item_embedding", ...).
    def state_dict(self) -> Tensors:
        return {}

    def load_state_dict(self, state: Tensors) -> None:
        pass

    def step(self, params: Tensors, delta: Tensors) -> Tensors:
        return {k: params[k] + self.learning_rate * delta[k] for k in params}


class FedAvgM:
    def __init__(self, learning_rate: float = 1.0, momentum: float = 0.9) -> None:
        self.learning_rate, self.momentum = learning_rate, momentum
        self.velocity: Tensors = {}

    @classmethod
    def from_config(cls, config: FederatedConfig) -> FedAvgM:
        return cls(config.server_learning_rate, config.server_momentum)

    def state_dict(self) -> Tensors:
        return {f"velocity/{k}": v for k, v in self.velocity.items()}

    def load_state_dict(self, state: Tensors) -> None:
        self.velocity = _prefixed(state, "velocity/")

    def step(self, params: Tensors, delta: Tensors) -> Tensors:
        for k, d in delta.items():
            self.velocity[k] = self.momentum * self.velocity.get(k, torch.zeros_like(d)) + d
        return {k: params[k] + self.learning_rate * self.velocity[k] for k in params}


class FedAdam:
    def __init__(
        self,
        learning_rate: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        self.learning_rate, self.beta1, self.beta2, self.tau = learning_rate, beta1, beta2, tau
        self.m: Tensors = {}
        self.v: Tensors = {}

    @classmethod
    def from_config(cls, config: FederatedConfig) -> FedAdam:
        return cls(
            config.server_learning_rate, beta1=config.server_momentum, tau=config.server_epsilon
        )

    def state_dict(self) -> Tensors:
        return {
            **{f"m/{k}": t for k, t in self.m.items()},
            **{f"v/{k}": t for k, t in self.v.items()},
        }

    def load_state_dict(self, state: Tensors) -> None:
        self.m, self.v = _prefixed(state, "m/"), _prefixed(state, "v/")

    def step(self, params: Tensors, delta: Tensors) -> Tensors:
        out = {}
        for k, d in delta.items():
            self.m[k] = self.beta1 * self.m.get(k, torch.zeros_like(d)) + (1 - self.beta1) * d
            self.v[k] = self.beta2 * self.v.get(k, torch.zeros_like(d)) + (1 - self.beta2) * d * d
            out[k] = params[k] + self.learning_rate * self.m[k] / (self.v[k].sqrt() + self.tau)
        return out


class WeightDecayed:
    """Decoupled weight decay after the server step (as AdamW): every matrix (item embeddings, dense
    layers; not biases) shrinks by a factor (1 - decay) per round. Under DP it stops the noise that
    each round adds to rows nobody trains from piling up."""

    def __init__(self, inner: FedAvg | FedAvgM | FedAdam, decay: float) -> None:
        self.inner, self.decay = inner, decay

    def state_dict(self) -> Tensors:
        return self.inner.state_dict()

    def load_state_dict(self, state: Tensors) -> None:
        self.inner.load_state_dict(state)

    def step(self, params: Tensors, delta: Tensors) -> Tensors:
        out = self.inner.step(params, delta)
        return {k: v * (1 - self.decay) if v.dim() >= 2 else v for k, v in out.items()}


ServerOptimizer = FedAvg | FedAvgM | FedAdam | WeightDecayed


def _prefixed(state: Tensors, prefix: str) -> Tensors:
    return {k[len(prefix) :]: v.clone() for k, v in state.items() if k.startswith(prefix)}


def make_server_optimizer(config: FederatedConfig) -> ServerOptimizer:
    optimizer: ServerOptimizer = SERVER_OPTIMIZERS.get(config.server_optimizer).from_config(config)
    if config.server_weight_decay > 0:
        optimizer = WeightDecayed(optimizer, config.server_weight_decay)
    return optimizer
