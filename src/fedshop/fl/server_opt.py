"""Server optimisers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

The mean client update Δ is treated as a pseudo-gradient step: FedAvg applies it, FedAvgM adds server
momentum, FedAdam adapts a per-coordinate step size, FedYogi likewise with Yogi's additive
second-moment update (Algorithm 2 of the paper).
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
            self.v[k] = self._second_moment(k, d)
            out[k] = params[k] + self.learning_rate * self.m[k] / (self.v[k].sqrt() + self.tau)
        return out

    def _second_moment(self, key: str, d: torch.Tensor) -> torch.Tensor:
        """Adam's: v ← β2·v + (1 − β2)·Δ², from v = 0."""
        v = self.v.get(key, torch.zeros_like(d))
        return self.beta2 * v + (1 - self.beta2) * d * d


class FedYogi(FedAdam):
    """FedAdam with Yogi's second moment (Reddi et al. 2021, Algorithm 2):
    v ← v − (1 − β2)·Δ²·sign(v − Δ²). v moves towards Δ² by (1 − β2)·Δ² whatever its own size
    (FedAdam's change, (1 − β2)·(Δ² − v), grows with v), so when updates turn small v shrinks
    slowly and the effective step size η/(√v + τ) grows more slowly than FedAdam's.

    v starts at τ² (the paper's initialisation v₋₁ ≥ τ², at its smallest), m at 0: the first step is
    η·(1 − β1)·Δ / (√v + τ) with v = τ² + (1 − β2)·Δ² wherever Δ² > τ². FedAdam here starts v at 0."""

    def _second_moment(self, key: str, d: torch.Tensor) -> torch.Tensor:
        v = self.v.get(key)
        if v is None:
            v = torch.full_like(d, self.tau**2)
        square = d * d
        return v - (1 - self.beta2) * square * torch.sign(v - square)


class WeightDecayed:
    """Decoupled weight decay after the server step (as AdamW): every matrix (item embeddings, dense
    layers; not biases) shrinks by a factor (1 - decay) per round. Under DP it stops the noise that
    each round adds to rows nobody trains from piling up."""

    def __init__(self, inner: FedAvg | FedAvgM | FedAdam | FedYogi, decay: float) -> None:
        self.inner, self.decay = inner, decay

    def state_dict(self) -> Tensors:
        return self.inner.state_dict()

    def load_state_dict(self, state: Tensors) -> None:
        self.inner.load_state_dict(state)

    def step(self, params: Tensors, delta: Tensors) -> Tensors:
        out = self.inner.step(params, delta)
        return {k: v * (1 - self.decay) if v.dim() >= 2 else v for k, v in out.items()}


ServerOptimizer = FedAvg | FedAvgM | FedAdam | FedYogi | WeightDecayed


def _prefixed(state: Tensors, prefix: str) -> Tensors:
    return {k[len(prefix) :]: v.clone() for k, v in state.items() if k.startswith(prefix)}


def make_server_optimizer(config: FederatedConfig) -> ServerOptimizer:
    optimizer: ServerOptimizer = SERVER_OPTIMIZERS.get(config.server_optimizer).from_config(config)
    if config.server_weight_decay > 0:
        optimizer = WeightDecayed(optimizer, config.server_weight_decay)
    return optimizer
