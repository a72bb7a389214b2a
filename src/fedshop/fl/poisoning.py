"""A malicious storefront (issue 21): model and data poisoning, as reproducible experiments.

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
- fake-purchases (data poisoning): the attacker adds fake customers to its own data, `fake_fraction`
  of its customer count, each buying every one of `targets` items it wants to promote and its
  `fillers` best sellers, then follows the protocol exactly. Its targets are its own slow sellers:
  drawn by the seed among the less-sold half of the items its customers bought.
The attacker knows its own data and the global model it is sent, as every silo does, and nothing of
the other silos. `attackers` silos are the attackers, drawn by the run seed. The model attacks
happen after the silo's own client stages (weighting, FedNova): they rewrite the message it sends,
so every server-side defence sees exactly what a real attacker would send. The data attack sends
honest-looking updates of poisoned data, which no check of a message's form can tell apart.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import scipy.sparse as sp
import torch

from fedshop.config import AttackConfig, RunConfig
from fedshop.data.interactions import SiloData
from fedshop.eval.exposure import exposure
from fedshop.fl.client import SiloClient
from fedshop.messages import ClientMessage
from fedshop.models.spec import score_all
from fedshop.seeding import derive_seed, torch_generator


class _Wrapped:
    """A silo client that is the `honest` one except where a subclass says otherwise; what the
    runtime sets on it (a DP state) reaches the wrapped client, which trains."""

    _own = ("honest",)

    def __getattr__(self, name: str):
        return getattr(self.honest, name)

    def __setattr__(self, name: str, value) -> None:
        if name in self._own:
            object.__setattr__(self, name, value)
        else:
            setattr(self.honest, name, value)


class PoisonedSilo(_Wrapped):
    """A silo client whose every message is rewritten by the attack; otherwise the honest silo."""

    _own = ("honest", "kind", "scale", "_noise")

    def __init__(self, honest, kind: str, scale: float, seed: int = 0) -> None:
        self.honest, self.kind, self.scale = honest, kind, scale
        if kind == "free-ride":
            self._noise = torch_generator(seed, "attack", "free-ride", honest.index)

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


class FakePurchasesSilo(_Wrapped):
    """A storefront that trains on its customers and fake ones (`honest` is a client of that
    poisoned data); its name, customers and files are the genuine storefront's (`data`)."""

    _own = ("honest", "data", "targets")

    def __init__(self, honest: SiloClient, genuine: SiloData, targets: np.ndarray) -> None:
        self.honest, self.data, self.targets = honest, genuine, targets

    def private_state(self):
        # The fake customers' vectors never reach the run folder: it maps rows to real customers.
        genuine, user_tables = self.data.n_users, self.honest.spec.user_tables
        state = self.honest.private_state()
        return {k: v[:genuine] if k in user_tables else v for k, v in state.items()}


def attack_targets(train: sp.csr_matrix, count: int, seed: int) -> np.ndarray:
    """The items a storefront promotes, from its own sales only (all it knows): drawn by the seed
    among the less-sold half of the items its customers bought."""
    buyers = np.asarray((train > 0).sum(axis=0)).ravel()
    sold = np.flatnonzero(buyers > 0)
    slow = sold[np.argsort(buyers[sold], kind="stable")][: max(count, len(sold) // 2)]
    rng = np.random.default_rng(derive_seed(seed, "attack", "targets"))
    return np.sort(rng.choice(slow, size=min(count, len(slow)), replace=False))


def best_sellers(train: sp.csr_matrix, count: int) -> np.ndarray:
    buyers = np.asarray((train > 0).sum(axis=0)).ravel()
    return np.sort(np.argsort(-buyers, kind="stable")[:count])


def with_fake_customers(silo: SiloData, items: np.ndarray, count: int) -> SiloData:
    """`silo` with `count` fake customers appended, each with every one of `items` in training and
    nothing held out (so they are never evaluated); their global index is -1."""
    n_items = silo.train.shape[1]
    fake = sp.csr_matrix(
        (
            np.ones(count * len(items), dtype=silo.train.dtype),
            np.tile(items, count),
            np.arange(0, count * len(items) + 1, len(items)),
        ),
        shape=(count, n_items),
    )
    empty = sp.csr_matrix((count, n_items), dtype=silo.test.dtype)
    negatives = silo.eval_negatives
    if negatives is not None:
        negatives = np.vstack([negatives, np.full((count, negatives.shape[1]), -1)])
    return replace(
        silo,
        users=np.concatenate([silo.users, np.full(count, -1, dtype=silo.users.dtype)]),
        train=sp.vstack([silo.train, fake]).tocsr(),
        test=sp.vstack([silo.test, empty]).tocsr(),
        validation=None if silo.validation is None else sp.vstack([silo.validation, empty]).tocsr(),
        eval_negatives=negatives,
    )


def fake_purchases(client: SiloClient, config: RunConfig) -> FakePurchasesSilo:
    """The storefront `client` turned attacker: the same silo, training with fake customers."""
    attack, data = config.attack, client.data
    targets = attack_targets(data.train, attack.targets, config.seed)
    items = np.union1d(targets, best_sellers(data.train, attack.fillers))
    count = max(1, round(attack.fake_fraction * data.n_users))
    poisoned = SiloClient(
        client.index, with_fake_customers(data, items, count), config.model, config.train,
        client.pipeline, config.seed, client.client_learning_rate,
    )  # fmt: skip
    poisoned.signer = client.signer  # the storefront's own audit key: it still signs what it gets
    return FakePurchasesSilo(poisoned, data, targets)


def attacker_silos(attack: AttackConfig, n_silos: int, seed: int) -> list[int]:
    """Which silos attack: `attack.attackers` of them, drawn by the run seed."""
    rng = np.random.default_rng(derive_seed(seed, "attack", "silos"))
    return sorted(rng.choice(n_silos, size=min(attack.attackers, n_silos), replace=False).tolist())


def poison(config: RunConfig):
    """The hook `run_cross_silo` applies to its silo clients: the attackers' replaced."""
    attack = config.attack

    def turned(client: SiloClient):
        if attack.kind == "fake-purchases":
            return fake_purchases(client, config)
        return PoisonedSilo(client, attack.kind, attack.scale, config.seed)

    def hook(clients: list) -> list:
        if attack.kind == "none":
            return clients
        bad = set(attacker_silos(attack, len(clients), config.seed))
        return [turned(c) if i in bad else c for i, c in enumerate(clients)]

    return hook


def attack_outcome(clients: list, shared, k: int = 10) -> dict | None:
    """metrics.json "attack" of a cross-silo run: who attacked and, for a promotion, the exposure
    (ER@k) of the targets among the honest storefronts' customers, each scored by its own silo."""
    attackers = [c for c in clients if isinstance(c, PoisonedSilo | FakePurchasesSilo)]
    if not attackers:
        return None
    outcome: dict = {"attackers": [c.name for c in attackers]}
    promoted = [c.targets for c in attackers if isinstance(c, FakePurchasesSilo)]
    if not promoted:
        return outcome
    targets = np.unique(np.concatenate(promoted))
    per_silo = {}
    for client in clients:
        if client in attackers:
            continue
        private = client.private_state()
        per_silo[client.name] = exposure(
            lambda rows, c=client, p=private: score_all(c.spec, shared, p, torch.from_numpy(rows)),
            client.data.train,
            targets,
            k,
        )
    exposed = sum(e.exposed for e in per_silo.values())
    shoppers = sum(e.shoppers for e in per_silo.values())
    return {
        **outcome,
        "targets": targets.tolist(),
        f"er@{k}": exposed / shoppers if shoppers else float("nan"),
        "exposed_shoppers": exposed,
        "shoppers": shoppers,
        "per_silo": {
            name: {f"er@{k}": e.ratio, "shoppers": e.shoppers} for name, e in per_silo.items()
        },
    }
