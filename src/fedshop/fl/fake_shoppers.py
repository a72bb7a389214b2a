"""Fake shoppers promoting target items (issue 21): FedRecAttack and A-hum, as experiments.

The attacker registers `round(fake_fraction × genuine shoppers)` fake shoppers: extra clients in the
server's pool, sampled like everyone else. Each round, every sampled fake sends a crafted change of
the shared item table instead of an honest update. What every fake may send (the attacker's
constraints, so that one fake update looks like a shopper's):
- it moves at most `rows` item rows (every target's row, then the rows its loss moves most);
- its L2 norm is `norm` × the median norm of the round's genuine updates. The simulator hands the
  attacker that median (an attacker estimates it by training honest profiles of its own; the exact
  value is the assumption in the attacker's favour);
- it claims the median genuine shopper's example count as its weight in the FedAvg mean;
- with `camouflage` c > 0, a share c of its squared norm goes to random other rows in random
  directions (on half of its `rows`): fakes that know of the similarity defence look unalike;
- it sends nothing for the dense weights and never touches a genuine shopper's user vector.

Targets: `targets` items drawn by the run seed among the items that fewer training shoppers bought
than the median item (and at least one did): unpopular items a merchant wants to push.

The promotion loss, for a set of users U with scores s_ui = <u, q_i> + b_i and each user's current
top K = 10 non-target items N_u (Rong et al.'s loss with a softplus as the smooth step):

    L(U) = Σ_u Σ_{t ∈ T} Σ_{j ∈ N_u} softplus(s_uj − s_ut) / |U|

Its gradient with respect to the item rows and biases (targets pulled towards the users, the
items that beat them pushed away) is what the fakes send, negated, as their "change".

- fedrecattack (Rong et al., ICDE 2022): the attacker knows `known_fraction` of the genuine training
  interactions (public ones: reviews, ratings), drawn by the seed. Each round it fits one vector per
  known user to those interactions against the current global item table (BPR, item table frozen,
  warm-started from the last round), and the sampled fakes split the users between them: each fake
  sends the gradient of L over its share.
- a-hum (Rong et al., IJCAI 2022, hard-user mining): the attacker knows no genuine data. Each fake
  draws `hard_users` random user vectors (Gaussian, at the scale of the item vectors), makes them
  hard by `mining_steps` steps of gradient *ascent* on L (users to whom the targets rank low; each
  vector's norm kept), and sends the gradient of L over them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from fedshop.config import AttackConfig
from fedshop.fl.device_robust import ClientUpdates
from fedshop.models.spec import Params
from fedshop.seeding import derive_seed, torch_generator

TOP_K = 10  # the items a target has to overtake: each user's current top 10
_APPROX_STEPS = 20  # fedrecattack: Adam steps per round on the approximated user vectors
_APPROX_LR = 0.05
# a-hum: ascent step, relative to each vector's norm. Small: mined users stay near the prior;
# mined to the end they sit opposite the targets and pull the targets' vectors to nothing.
_MINING_LR = 0.02


def fake_count(attack: AttackConfig, genuine: int) -> int:
    """How many fake shoppers an attack registers (at least one)."""
    return max(1, round(attack.fake_fraction * genuine))


def choose_targets(train: sp.csr_matrix, count: int, seed: int) -> np.ndarray:
    """`count` target items drawn by `seed` among the items fewer training shoppers bought than the
    median item, and at least one did."""
    popularity = np.asarray((train > 0).sum(axis=0)).ravel()
    median = float(np.median(popularity))
    candidates = np.flatnonzero((popularity >= 1) & (popularity < median))
    if len(candidates) < count:
        raise ValueError(f"only {len(candidates)} items are below the median popularity")
    rng = np.random.default_rng(derive_seed(seed, "attack", "targets"))
    return np.sort(rng.choice(candidates, size=count, replace=False))


def known_interactions(train: sp.csr_matrix, fraction: float, seed: int) -> sp.csr_matrix:
    """The genuine training interactions the attacker knows: each with probability `fraction`."""
    coo = train.tocoo()
    rng = np.random.default_rng(derive_seed(seed, "attack", "known"))
    keep = rng.random(len(coo.row)) < fraction
    known = sp.csr_matrix(
        (np.ones(int(keep.sum()), np.float32), (coo.row[keep], coo.col[keep])), shape=train.shape
    )
    rows = np.flatnonzero(np.diff(known.indptr) > 0)
    return known[rows]


def promotion_gradients(
    users: torch.Tensor,
    group: torch.Tensor,
    groups: int,
    item_embedding: torch.Tensor,
    item_bias: torch.Tensor,
    targets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each group's gradient of L over its users, sparse: (group, item) keys, their embedding and
    bias gradients, and each key's group. Only targets and the users' top-K items have one."""
    n_items = item_embedding.shape[0]
    with torch.no_grad():
        scores = users @ item_embedding.T + item_bias
        scores[:, targets] = -torch.inf
        top = torch.topk(scores, min(TOP_K, n_items - len(targets)), dim=1).indices  # (U, K)
        s_top = scores.gather(1, top)
        s_tgt = users @ item_embedding[targets].T + item_bias[targets]  # (U, T)
        # d softplus(s_uj - s_ut) = sigmoid(s_uj - s_ut) (d s_uj - d s_ut)
        c = torch.sigmoid(s_top.unsqueeze(2) - s_tgt.unsqueeze(1)) / len(users)  # (U, K, T)
        on_top, on_target = c.sum(2), c.sum(1)  # (U, K), (U, T)
        U, K, T = len(users), top.shape[1], len(targets)
        item = torch.cat([top.reshape(-1), targets.repeat(U)])
        owner = torch.cat([group.repeat_interleave(K), group.repeat_interleave(T)])
        coeff = torch.cat([on_top.reshape(-1), -on_target.reshape(-1)])
        user_of = torch.cat(
            [torch.arange(U).repeat_interleave(K), torch.arange(U).repeat_interleave(T)]
        ).to(users.device)
        keys, slot = torch.unique(owner * n_items + item, return_inverse=True)
        grad_emb = torch.zeros(len(keys), users.shape[1], device=users.device)
        grad_emb.index_add_(0, slot, coeff.unsqueeze(1) * users[user_of])
        grad_bias = torch.zeros(len(keys), device=users.device).index_add_(0, slot, coeff)
    return keys % n_items, grad_emb, grad_bias, keys // n_items


def promotion_loss(users, item_embedding, item_bias, targets) -> torch.Tensor:
    """L over `users` (differentiable in the users), for a-hum's mining."""
    scores = users @ item_embedding.T + item_bias
    masked = scores.detach().clone()
    masked[:, targets] = -torch.inf
    top = torch.topk(masked, TOP_K, dim=1).indices
    s_top = scores.gather(1, top)
    s_tgt = scores[:, targets]
    return F.softplus(s_top.unsqueeze(2) - s_tgt.unsqueeze(1)).sum() / len(users)


@dataclass
class FakeShoppers:
    """The attacker: its fake client ids, its targets, what it knows, and its crafting."""

    attack: AttackConfig
    targets: torch.Tensor
    first_id: int  # fake client ids are first_id, first_id + 1, …
    count: int
    claimed_examples: float
    seed: int
    known: sp.csr_matrix | None = None  # fedrecattack: the known interactions (known users × items)
    approx: torch.Tensor | None = None  # fedrecattack: the approximated user vectors
    shared_shape: tuple[int, int] = (0, 0)
    _adam: dict = field(default_factory=dict)

    @property
    def ids(self) -> torch.Tensor:
        return torch.arange(self.first_id, self.first_id + self.count)

    @classmethod
    def register(cls, attack: AttackConfig, train: sp.csr_matrix, seed: int) -> FakeShoppers:
        genuine = np.diff(train.indptr)
        active = genuine[genuine > 0]
        known = None
        if attack.kind == "fedrecattack":
            known = known_interactions(train, attack.known_fraction, seed)
        return cls(
            attack=attack,
            targets=torch.from_numpy(choose_targets(train, attack.targets, seed)),
            first_id=train.shape[0],
            count=fake_count(attack, len(active)),
            claimed_examples=float(np.median(active)),
            seed=seed,
            known=known,
        )

    # ---- the crafted round --------------------------------------------------------------------

    def __call__(
        self, round_number: int, fakes: torch.Tensor, shared: Params, typical_norm: float
    ) -> ClientUpdates:
        """The sampled fakes' updates (`fakes`: their client ids) for this round's shared model."""
        V, b = shared["item_embedding"].detach(), shared["item_bias"].detach()
        self.shared_shape = tuple(V.shape)
        targets = self.targets.to(V.device)
        n = len(fakes)
        g = torch_generator(self.seed, "attack", "round", round_number)
        if self.attack.kind == "fedrecattack":
            users = self._approximate_users(V, b, g)
            group = torch.randperm(len(users), generator=g).to(V.device) % n
        else:
            users = self._hard_users(V, b, targets, n, g)
            group = torch.arange(n, device=V.device).repeat_interleave(self.attack.hard_users)
        rows, grad_emb, grad_bias, owner = promotion_gradients(users, group, n, V, b, targets)
        rows, emb, bias, owner = self._constrain(rows, -grad_emb, -grad_bias, owner, n, targets)
        budget = self.attack.norm * typical_norm
        share = 1.0 - self.attack.camouflage
        # Each fake's change scaled to exactly its norm budget (its share of it, with camouflage).
        squared = torch.zeros(n, device=V.device, dtype=torch.float64)
        squared.index_add_(0, owner, emb.double().pow(2).sum(1) + bias.double().pow(2))
        scale = (math.sqrt(share) * budget / squared.sqrt().clamp_min(1e-30)).float()
        emb, bias = emb * scale[owner].unsqueeze(1), bias * scale[owner]
        if self.attack.camouflage > 0:
            rows, emb, bias, owner = self._camouflage(rows, emb, bias, owner, n, budget, g)
        return ClientUpdates(
            rows=rows,
            owner=owner,
            items={"item_embedding": emb, "item_bias": bias},
            dense={},
            weights=torch.full((n,), self.claimed_examples, device=V.device),
            clients=fakes.to(V.device),
        )

    def _camouflage(self, rows, emb, bias, owner, n, budget, g):
        """Each fake also moves random other rows in random directions, with `camouflage` of its
        squared norm budget: an attacker who knows of the similarity defence makes its fakes look
        unlike each other (on the rows the crafted part left free, within `rows`)."""
        used = torch.bincount(owner, minlength=n)
        free = (self.attack.rows - used).clamp_min(0).cpu()
        n_items, dim = self.shared_shape
        extra_owner = torch.repeat_interleave(torch.arange(n), free)
        extra_rows = torch.randint(n_items, (len(extra_owner),), generator=g)
        noise = torch.randn(len(extra_owner), dim + 1, generator=g)
        squared = torch.zeros(n, dtype=torch.float64).index_add_(
            0, extra_owner, noise.double().pow(2).sum(1)
        )
        scale = math.sqrt(self.attack.camouflage) * budget / squared.sqrt().clamp_min(1e-30)
        noise = (noise * scale[extra_owner].unsqueeze(1).float()).to(emb.device)
        return (
            torch.cat([rows, extra_rows.to(rows.device)]),
            torch.cat([emb, noise[:, :dim]]),
            torch.cat([bias, noise[:, dim]]),
            torch.cat([owner, extra_owner.to(owner.device)]),
        )

    def _constrain(self, rows, emb, bias, owner, n, targets):
        """At most `rows` rows per fake: every target's, then its largest other changes."""
        is_target = torch.isin(rows, targets)
        size = emb.pow(2).sum(1) + bias.pow(2)
        size = torch.where(is_target, torch.full_like(size, math.inf), size)
        order = torch.argsort(size, descending=True, stable=True)
        order = order[torch.argsort(owner[order], stable=True)]
        counts = torch.bincount(owner, minlength=n)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order), device=order.device) - starts[owner[order]]
        # With camouflage, half of the rows are left for it.
        limit = self.attack.rows if self.attack.camouflage == 0 else self.attack.rows // 2
        keep = rank < max(limit, len(targets))
        return rows[keep], emb[keep], bias[keep], owner[keep]

    def _approximate_users(self, V, b, g) -> torch.Tensor:
        """FedRecAttack: the known users' vectors fitted to their known items (BPR, V frozen)."""
        known = self.known
        if self.approx is None:
            self.approx = torch.randn(known.shape[0], V.shape[1], generator=g).to(V.device) * 0.01
            self._adam = {
                "m": torch.zeros_like(self.approx),
                "v": torch.zeros_like(self.approx),
                "t": 0,
            }
        coo = known.tocoo()
        user = torch.from_numpy(coo.row.astype(np.int64)).to(V.device)
        pos = torch.from_numpy(coo.col.astype(np.int64)).to(V.device)
        u = self.approx
        for _ in range(_APPROX_STEPS):
            neg = torch.randint(V.shape[0], (len(pos),), generator=g).to(V.device)
            u = u.detach().requires_grad_(True)
            diff = (u[user] * (V[pos] - V[neg])).sum(1) + b[pos] - b[neg]
            loss = -F.logsigmoid(diff).sum() / known.shape[0] + 0.01 * u.pow(2).sum(1).mean()
            (grad,) = torch.autograd.grad(loss, u)
            adam = self._adam
            adam["t"] += 1
            adam["m"] = 0.9 * adam["m"] + 0.1 * grad
            adam["v"] = 0.999 * adam["v"] + 0.001 * grad * grad
            m_hat = adam["m"] / (1 - 0.9 ** adam["t"])
            v_hat = adam["v"] / (1 - 0.999 ** adam["t"])
            u = u.detach() - _APPROX_LR * m_hat / (v_hat.sqrt() + 1e-8)
        self.approx = u.detach()
        return self.approx

    def _hard_users(self, V, b, targets, n, g) -> torch.Tensor:
        """A-hum: random user vectors made hard by gradient ascent on L, each norm kept."""
        count = n * self.attack.hard_users
        # The attacker knows no user, only the shared model. Users lie near the items they like, and
        # the shared item biases say which items are liked: vectors are drawn around the mean of
        # the item vectors with the top tenth of the biases, with their spread per coordinate.
        liked = V[torch.topk(b, max(1, len(b) // 10)).indices]
        mean, std = liked.mean(0), liked.std(0)
        users = torch.randn(count, V.shape[1], generator=g).to(V.device) * std + mean
        norms = users.norm(dim=1, keepdim=True)
        for _ in range(self.attack.mining_steps):
            users = users.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(promotion_loss(users, V, b, targets), users)
            step = grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-30)
            users = users.detach() + _MINING_LR * norms * step
            users = users / users.norm(dim=1, keepdim=True).clamp_min(1e-30) * norms
        return users.detach()
