"""A malicious storefront (issue 21): model poisoning by crafted updates, as reproducible experiments.

`[attack] kind` (off by default):
- sign-flip: the attacker trains honestly, then sends its update reversed and scaled by `scale`
  (pushing the model away from what its data says, as hard as it dares);
- scale: the attacker sends its honest update times `scale` (a model-replacement boost: its own
  data counts `scale` times).
The attacker knows its own data and the global model it is sent, as every silo does, and nothing of
the other silos. `attackers` silos are the attackers, drawn by the run seed. The attack happens
after the silo's own client stages (weighting, FedNova): it rewrites the message it sends, so every
server-side defence sees exactly what a real attacker would send.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedshop.config import AttackConfig
from fedshop.messages import ClientMessage
from fedshop.seeding import derive_seed


class PoisonedSilo:
    """A silo client whose every message is rewritten by the attack; otherwise the honest silo."""

    def __init__(self, honest, kind: str, scale: float) -> None:
        self.honest, self.kind, self.scale = honest, kind, scale

    def __getattr__(self, name: str):
        return getattr(self.honest, name)

    def fit(self, shared, task) -> ClientMessage:
        sent = self.honest.fit(shared, task)
        factor = -self.scale if self.kind == "sign-flip" else self.scale
        # FedNova's step count travels as a tensor too: the attacker leaves it honest, so the
        # server's rescaling does not give the attack away.
        tensors = {k: v if k.startswith("__") else v * factor for k, v in sent.tensors.items()}
        return replace(sent, tensors=tensors)


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
        return [PoisonedSilo(c, attack.kind, attack.scale) if i in bad else c
                for i, c in enumerate(clients)]  # fmt: skip

    return hook
