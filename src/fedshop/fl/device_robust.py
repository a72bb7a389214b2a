"""A cross-device server that inspects every shopper's own update (issue 21): defences as stages.

Without a defence or an attack the vectorised round streams each group's updates straight into the
sum (`fl/vectorised.py`). With either, `ScreenedRound` keeps every sampled client's own update for the
round (`ClientUpdates`: the item rows it moved, their changes, its dense deltas, its weight), lets the
fake shoppers of an `[attack]` add theirs (`fl/fake_shoppers.py`), runs the server stages of
`[federated] robust` on them, and only then sums:

- norm-bound: every client's whole update scaled to L2 norm ≤ `robust_bound` (the generic defence);
- row-bound (recommendation-specific): every item row a client moves is clipped to `row_bound` × the
  median norm of all row changes of the round, and only the client's `max_rows` largest row changes
  are kept: a shopper cannot move one product far, nor many products at all;
- similarity (recommendation-specific, after FoolsGold, Fung et al. 2020): fake shoppers run by one
  attacker push the same few item rows the same way, honest shoppers move their own items. Every
  client's update is count-sketched (a fixed random projection of its item-row and dense changes),
  and a client whose update has cosine similarity above `similarity_threshold` with another client's
  update of the same round is left out of the sum (both of a pair: fakes come in groups). Unlike
  FoolsGold it looks at one round, not the clients' histories, and drops instead of reweighting.

Every stage reads each client's update in plaintext, on the server. So **none of them works under
secure aggregation**, which shows the server only the sum, and the config refuses the combination.
Client-side clipping (DP-FedAvg's `ClipUpdate`) does not bind a fake shopper, who simply does not
run it: only what the server checks binds an attacker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fedshop.config import RunConfig
from fedshop.fl.local_round import LocalTraining, RoundInput
from fedshop.fl.vectorised import (
    along_rows,
    build_bucket,
    build_chunk,
    plan_buckets,
    plan_chunks,
    train_bucket,
    train_chunk,
)
from fedshop.messages import Aggregate
from fedshop.models.spec import ModelSpec, Params
from fedshop.privacy.noise import clip_per_client
from fedshop.seeding import torch_generator

log = logging.getLogger("fedshop.rounds")

_SKETCH = 1024  # count-sketch width of the similarity detector
_SKETCH_ROWS = 1 << 16  # rows sketched at a time (bounds the index tensors' memory)
_SIMILARITY_BLOCK = 2048  # clients compared at a time


@dataclass
class ClientUpdates:
    """Every client's own (unweighted) update of one round, before the sum.

    Row r is client `owner[r]`'s change of catalogue item `rows[r]`; a client's dense deltas are row
    c of each `dense` tensor; `weights[c]` is its weight in the mean (its example count)."""

    rows: torch.Tensor  # (R,)
    owner: torch.Tensor  # (R,) position of the owning client in the round
    items: Params  # name -> (R, ...)
    dense: Params  # name -> (C, ...)
    weights: torch.Tensor  # (C,)
    clients: torch.Tensor  # (C,) client ids

    @property
    def count(self) -> int:
        return len(self.clients)

    def row_norms(self) -> torch.Tensor:
        squared = sum(d.double().pow(2).reshape(len(d), -1).sum(1) for d in self.items.values())
        return torch.as_tensor(squared).sqrt()

    def norms(self) -> torch.Tensor:
        """Each client's update norm (its item rows and its dense deltas together)."""
        squared = torch.zeros(self.count, dtype=torch.float64, device=self.owner.device)
        squared.index_add_(0, self.owner, self.row_norms().pow(2))
        for delta in self.dense.values():
            squared += delta.double().pow(2).reshape(self.count, -1).sum(1)
        return squared.sqrt()

    def then(self, other: ClientUpdates) -> ClientUpdates:
        """These clients followed by `other`'s."""
        return ClientUpdates(
            rows=torch.cat([self.rows, other.rows]),
            owner=torch.cat([self.owner, other.owner + self.count]),
            items={k: torch.cat([v, other.items[k]]) for k, v in self.items.items()},
            dense={k: torch.cat([v, other.dense[k]]) for k, v in self.dense.items()},
            weights=torch.cat([self.weights, other.weights]),
            clients=torch.cat([self.clients, other.clients]),
        )

    def keep_rows(self, keep: torch.Tensor) -> ClientUpdates:
        return ClientUpdates(
            self.rows[keep],
            self.owner[keep],
            {k: v[keep] for k, v in self.items.items()},
            self.dense,
            self.weights,
            self.clients,
        )

    def keep_clients(self, keep: torch.Tensor) -> ClientUpdates:
        """Only the clients marked in `keep` (a boolean per client), renumbered."""
        position = torch.cumsum(keep.long(), 0) - 1
        rows = keep[self.owner]
        return ClientUpdates(
            self.rows[rows],
            position[self.owner[rows]],
            {k: v[rows] for k, v in self.items.items()},
            {k: v[keep] for k, v in self.dense.items()},
            self.weights[keep],
            self.clients[keep],
        )

    def total(self, shared: Params) -> Aggregate:
        """The weighted sum the server steps on (sparse: only moved rows are added)."""
        sums = {k: torch.zeros_like(v) for k, v in shared.items()}
        row_weight = self.weights[self.owner]
        for k, delta in self.items.items():
            sums[k].index_add_(0, self.rows, delta * along_rows(row_weight, delta))
        for k, delta in self.dense.items():
            sums[k] += (delta * along_rows(self.weights, delta)).sum(0).reshape(shared[k].shape)
        return Aggregate(sums, float(self.weights.sum()), self.count)


def collect_updates(
    spec: ModelSpec,
    shared: Params,
    user_tables: Params,
    batch: RoundInput,
    training: LocalTraining,
) -> tuple[ClientUpdates, Params]:
    """`vectorised_sum`'s training, group by group, keeping each client's own update instead of
    adding it to the sum; and the clients' new user rows in client order."""
    n_items = shared[spec.item_tables[0]].shape[0]
    device = shared[spec.item_tables[0]].device
    width = max([v.shape[-1] for v in shared.values() if v.dim() == 2] + [1])
    sizes = torch.tensor([len(p) for p in batch.positives])
    clients = batch.clients.to(device)
    C = len(batch.clients)
    new_users = {k: torch.empty(C, v.shape[1], device=device) for k, v in user_tables.items()}
    dense = {k: torch.zeros(C, *v.shape, device=device) for k, v in spec.dense_of(shared).items()}
    flat = all(v.dim() <= 1 for v in spec.dense_of(shared).values())
    plan, build, train = (
        (plan_chunks, build_chunk, train_chunk)
        if flat
        else (plan_buckets, build_bucket, train_bucket)
    )
    rows, owners, items = [], [], {k: [] for k in spec.item_tables}
    if C:
        for members in plan(sizes, width, batch.negatives[0].shape[-1]):
            bucket = build(batch, members, n_items).to(device)
            update = train(spec, shared, user_tables, clients, bucket, training)
            for k, v in update.users.items():
                new_users[k][bucket.members] = v
            rows.append(bucket.rows)
            owners.append(bucket.members[bucket.row_owner])
            for k, delta in update.item_deltas.items():
                items[k].append(delta)
            for k, delta in update.dense_deltas.items():
                dense[k][bucket.members] = delta.reshape(len(bucket.members), *dense[k].shape[1:])
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    updates = ClientUpdates(
        rows=torch.cat(rows) if rows else empty,
        owner=torch.cat(owners) if owners else empty,
        items={
            k: torch.cat(v) if v else torch.zeros(0, *shared[k].shape[1:], device=device)
            for k, v in items.items()
        },
        dense=dense,
        weights=batch.num_examples.to(device),
        clients=batch.clients.to(device),
    )
    return updates, new_users


# ---- the defences: server stages on every client's own update ----------------------------------


@dataclass(frozen=True)
class DeviceNormBound:
    """Every client's whole update scaled to L2 norm ≤ `bound` (the weights unchanged)."""

    bound: float

    def __call__(self, updates: ClientUpdates) -> ClientUpdates:
        clip_per_client(updates.items, updates.owner, updates.dense, updates.count, self.bound)
        return updates


@dataclass(frozen=True)
class RowBound:
    """Each row change clipped to `multiple` × the round's median row-change norm; each client keeps
    only its `max_rows` largest row changes."""

    multiple: float
    max_rows: int

    def __call__(self, updates: ClientUpdates) -> ClientUpdates:
        if len(updates.rows) == 0:
            return updates
        norms = updates.row_norms()
        # Largest first within each client: sort by norm, then (stably) by owner.
        order = torch.argsort(norms, descending=True, stable=True)
        order = order[torch.argsort(updates.owner[order], stable=True)]
        counts = torch.bincount(updates.owner, minlength=updates.count)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order), device=order.device) - starts[updates.owner[order]]
        bound = self.multiple * float(norms.median())
        scale = torch.where(norms > bound, bound / norms.clamp_min(1e-30), torch.ones_like(norms))
        for delta in updates.items.values():
            delta *= along_rows(scale.to(delta.dtype), delta)
        return updates.keep_rows(rank < self.max_rows)


@dataclass
class SimilarityFilter:
    """Clients whose update has cosine similarity above `threshold` with another client's update of
    the round are left out (count-sketched updates, a fixed projection drawn from the run seed)."""

    threshold: float
    n_items: int
    seed: int
    width: int = _SKETCH
    last_dropped: list[int] = field(default_factory=list)
    _hashes: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def _hash(self, name: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(bucket, sign) of every coordinate of a table of `shape`, fixed for the run."""
        if name not in self._hashes:
            g = torch_generator(self.seed, "similarity", "sketch", name)
            bucket = torch.randint(self.width, shape, generator=g)
            sign = torch.randint(2, shape, generator=g).float() * 2 - 1
            self._hashes[name] = (bucket, sign)
        return self._hashes[name]

    def sketches(self, updates: ClientUpdates) -> torch.Tensor:
        """(clients × width) count sketches of the clients' updates."""
        device = updates.owner.device
        out = torch.zeros(updates.count * self.width, device=device)
        for name, delta in updates.items.items():
            flat = delta.reshape(len(delta), -1)
            bucket, sign = self._hash(name, (self.n_items, flat.shape[1]))
            bucket, sign = bucket.to(device), sign.to(device)
            for start in range(0, len(flat), _SKETCH_ROWS):
                part = slice(start, start + _SKETCH_ROWS)
                items, owner = updates.rows[part], updates.owner[part]
                index = owner.view(-1, 1) * self.width + bucket[items]
                out.index_add_(0, index.reshape(-1), (sign[items] * flat[part]).reshape(-1))
        for name, delta in updates.dense.items():
            flat = delta.reshape(updates.count, -1)
            bucket, sign = self._hash(name, (flat.shape[1],))
            index = torch.arange(updates.count, device=device).view(-1, 1) * self.width + bucket.to(
                device
            )
            out.index_add_(0, index.reshape(-1), (sign.to(device) * flat).reshape(-1))
        return out.view(updates.count, self.width)

    def most_similar(self, updates: ClientUpdates) -> torch.Tensor:
        """Each client's largest cosine similarity with another client of the round."""
        sketch = self.sketches(updates)
        unit = sketch / sketch.norm(dim=1, keepdim=True).clamp_min(1e-30)
        best = torch.full((updates.count,), -1.0, device=unit.device)
        for start in range(0, updates.count, _SIMILARITY_BLOCK):
            block = unit[start : start + _SIMILARITY_BLOCK] @ unit.T
            own = torch.arange(len(block), device=unit.device)
            block[own, own + start] = -1.0
            best[start : start + len(block)] = block.max(1).values
        return best

    def __call__(self, updates: ClientUpdates) -> ClientUpdates:
        if updates.count < 2:
            self.last_dropped = []
            return updates
        keep = self.most_similar(updates) <= self.threshold
        self.last_dropped = updates.clients[~keep].tolist()
        return updates.keep_clients(keep)


DeviceStage = Callable[[ClientUpdates], ClientUpdates]


def device_defences(config: RunConfig, n_items: int) -> tuple[DeviceStage, ...]:
    """The server stages of `[federated] robust` for a cross-device run (none for "none")."""
    fed = config.federated
    rules: dict[str, Callable[[], tuple[DeviceStage, ...]]] = {
        "none": lambda: (),
        "norm-bound": lambda: (DeviceNormBound(fed.robust_bound),),
        "row-bound": lambda: (RowBound(fed.row_bound, fed.max_rows),),
        "similarity": lambda: (SimilarityFilter(fed.similarity_threshold, n_items, config.seed),),
    }
    return rules[fed.robust]()


# The fake shoppers' crafted updates for the sampled fake client ids, given the round's shared
# model and the genuine updates' median norm (see fl/fake_shoppers.py).
Crafter = Callable[[int, torch.Tensor, Params, float], ClientUpdates]


@dataclass
class ScreenedRound:
    """A cross-device round whose sum is made from every client's own update: the genuine shoppers'
    (trained by the vectorised simulator), the fake shoppers' (crafted), then the defences."""

    stages: Sequence[DeviceStage]
    n_genuine: int  # client ids at or above this are fake shoppers
    craft: Crafter | None = None
    last_kept: list[int] = field(default_factory=list)
    # Per round: the median norm of the genuine updates (the fakes' norm budget is a multiple of it).
    median_norms: list[float] = field(default_factory=list)

    def run(
        self,
        round_number: int,
        spec: ModelSpec,
        shared: Params,
        user_tables: Params,
        batch: RoundInput,
        fakes: torch.Tensor,
        training: LocalTraining,
    ) -> tuple[Aggregate, Params, list[int]]:
        """(the round's sum, the genuine clients' new user rows, the clients in the sum)."""
        updates, new_users = collect_updates(spec, shared, user_tables, batch, training)
        norms = updates.norms()
        typical = float(norms.median()) if len(norms) else 1.0
        self.median_norms.append(typical)
        if self.craft is not None and len(fakes):
            updates = updates.then(self.craft(round_number, fakes, shared, typical))
        for stage in self.stages:
            updates = stage(updates)
        self.last_kept = updates.clients.tolist()
        dropped = updates.count < len(batch.clients) + len(fakes)
        if dropped:
            fake = int((updates.clients >= self.n_genuine).sum())
            log.info(
                "round %d: %d of %d clients kept by the defence (%d of %d fakes)",
                round_number,
                updates.count,
                len(batch.clients) + len(fakes),
                fake,
                len(fakes),
            )
        return updates.total(shared), new_users, self.last_kept
