"""A malicious storefront (issue 21): model poisoning by crafted updates, as reproducible experiments.

`[attack] kind` (off by default):
- sign-flip: the attacker trains honestly, then sends its update reversed and scaled by `scale`
  (pushing the model away from what its data says, as hard as it dares);
- scale: the attacker sends its honest update times `scale` (a model-replacement boost: its own
  data counts `scale` times);
- free-ride: the attacker gets the federated model without contributing to it. It sends pure
  Gaussian noise, each tensor of the norm its honest update would have had, while claiming its real
  weight and step count (a disguised free-rider, Lin et al. 2019): a zero update would be caught by
  any look at its norm. It still refits its own customers' vectors, as an honest silo does (it wants
  the model for them); the simulator computes its honest update only to size the noise.
The attacker knows its own data and the global model it is sent, as every silo does, and nothing of
the other silos. `attackers` silos are the attackers, drawn by the run seed. The attack happens
after the silo's own client stages (weighting, FedNova): it rewrites the message it sends, so every
server-side defence sees exactly what a real attacker would send.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from fedshop.config import AttackConfig
from fedshop.messages import ClientMessage
from fedshop.seeding import derive_seed, torch_generator


class PoisonedSilo:
    """A silo client whose every message is rewritten by the attack; otherwise the honest silo."""

    def __init__(self, honest, kind: str, scale: float, seed: int = 0) -> None:
        self.honest, self.kind, self.scale = honest, kind, scale
        if kind == "free-ride":
            self._noise = torch_generator(seed, "attack", "free-ride", honest.index)

    def __getattr__(self, name: str):
        return getattr(self.honest, name)

    def fit(self, shared, task) -> ClientMessage:
        sent = self.honest.fit(shared, task)
        if self.kind == "free-ride":
            return replace(sent, tensors=self._noise_like(sent.tensors))
        factor = -self.scale if self.kind == "sign-flip" else self.scale
        # FedNova's step count travels as a tensor too: the attacker leaves it honest, so the
        # server's rescaling does not give the attack away.
        tensors = {k: v if k.startswith("__") else v * factor for k, v in sent.tensors.items()}
        return replace(sent, tensors=tensors)

    def _noise_like(self, tensors: dict) -> dict:
        """Gaussian noise with each tensor's own norm (what a norm check sees stays honest)."""
        out = {}
        for k, v in tensors.items():
            if k.startswith("__"):
                out[k] = v
                continue
            noise = torch.randn(v.shape, generator=self._noise, dtype=v.dtype)
            out[k] = noise * (v.norm() / noise.norm().clamp_min(1e-12))
        return out


def attacker_silos(attack: AttackConfig, n_silos: int, seed: int) -> list[int]:
    """Which silos attack: `attack.attackers` of them, drawn by the run seed."""
    rng = np.random.default_rng(derive_seed(seed, "attack", "silos"))
    return sorted(rng.choice(n_silos, size=min(attack.attackers, n_silos), replace=False).tolist())


def poison(attack: AttackConfig, seed: int):
    """The hook `run_cross_silo` applies to its silo clients: the attackers' wrapped."""

    def hook(clients: list) -> list:
        if attack.kind == "none":
            return clients
        bad = set(attacker_silos(attack, len(clients), seed))
        return [PoisonedSilo(c, attack.kind, attack.scale, seed) if i in bad else c
                for i, c in enumerate(clients)]  # fmt: skip

    return hook
