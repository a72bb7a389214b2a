"""The vectorised cross-device round: every sampled client trained at once, same maths as the loop.

Clients are grouped; within a group each client gets private copies of just the item rows it touches
(not of the whole catalogue), and one backward pass over the sum of the clients' losses yields every
client's own gradient (their parameters are disjoint). Item updates are scatter-added into the
aggregate, so only touched rows are ever materialised: the sparse message. Two layouts:
- flat: pairs end to end, no padding, per-client dense weights gathered per pair like embedding rows;
  for models whose dense weights are vectors (MF, GMF);
- padded: buckets of similar-size clients, dense weights with a leading client dimension so batched
  matrix products apply each client's own layers; for any model (NeuMF needs it).
Index bookkeeping runs on the CPU; the training maths on the device of the model tables. FedProx's
proximal term (`LocalTraining.proximal_mu`) is summed over each client's own copies (`proximal_sum`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedshop.fl.local_round import LocalTraining, RoundInput, sgd_step
from fedshop.fl.wire import RowUpdate
from fedshop.messages import Aggregate, ClientMessage, Summation, mean_of
from fedshop.models.spec import ModelSpec, Params, stack_dense
from fedshop.privacy.noise import clip_per_client

# Upper bound on floats in one group's largest activation (pair slots × width). Measured on ML-1M (all
# 6,040 clients, CPU): 2^22 runs a round as fast as 2^24 with a quarter of the memory (270 vs 970 MB).
_BUCKET_FLOATS = 1 << 22
# A bucket closes when padding would exceed this fraction of its real pairs (measured: allowing more
# padding for small buckets, to save per-bucket overhead, made 100-client rounds slower, not faster).
_BUCKET_PADDING = 0.25


def along_rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`values` (one per row of `like`) shaped to broadcast over the rest of `like`."""
    return values.view(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True)
class Bucket:
    """Clients of similar size, their pairs padded to a common length, and the item rows they touch.

    Local item rows are not padded: row r is a private copy of catalogue item `rows[r]` belonging to
    client `row_owner[r]`, so a client that touches 30 items holds 30 rows whatever its neighbours do.
    """

    members: torch.Tensor  # (C,) positions in the round's client list
    rows: torch.Tensor  # (R,) catalogue item behind each local row, grouped by client
    row_owner: torch.Tensor  # (R,) bucket position of the client owning the row
    positives: torch.Tensor  # (C, P) local row of each positive (0 for padding)
    negatives: torch.Tensor  # (epochs, C, P * negatives) local rows
    pair_mask: torch.Tensor  # (C, P)
    n_pairs: torch.Tensor  # (C,) real positives per client

    def to(self, device: torch.device) -> Bucket:
        return Bucket(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def plan_buckets(sizes: torch.Tensor, width: int, negatives: int) -> list[torch.Tensor]:
    """Group client positions (sorted by size) so that padding and memory stay bounded."""
    order = torch.argsort(sizes, stable=True).tolist()
    sizes_list = sizes.tolist()
    buckets, current, real = [], [], 0
    for position in order:
        size = max(sizes_list[position], 1)
        slots = (len(current) + 1) * size  # the new client is the largest so far
        too_padded = slots > (1 + _BUCKET_PADDING) * (real + size)
        too_big = slots * (1 + negatives) * width > _BUCKET_FLOATS
        if current and (too_padded or too_big):
            buckets.append(torch.tensor(current))
            current, real = [], 0
        current.append(position)
        real += size
    if current:
        buckets.append(torch.tensor(current))
    return buckets


def build_bucket(batch: RoundInput, members: torch.Tensor, n_items: int) -> Bucket:
    unique, owner_pos, n_pairs, local_pos, local_neg = _touched_rows(batch, members, n_items)
    C, P = len(members), int(n_pairs.max())
    epochs, T, n_neg = local_neg.shape
    slot_pos = torch.arange(T) - (torch.cumsum(n_pairs, 0) - n_pairs)[owner_pos]
    pos_local = torch.zeros(C, P, dtype=torch.int64)
    pair_mask = torch.zeros(C, P, dtype=torch.bool)
    pos_local[owner_pos, slot_pos] = local_pos
    pair_mask[owner_pos, slot_pos] = True
    neg_local = torch.zeros(epochs, C, P, n_neg, dtype=torch.int64)
    neg_local[:, owner_pos, slot_pos] = local_neg
    return Bucket(
        members=members,
        rows=unique % n_items,
        row_owner=unique // n_items,
        positives=pos_local,
        negatives=neg_local.reshape(epochs, C, P * n_neg),
        pair_mask=pair_mask,
        n_pairs=n_pairs,
    )


@dataclass(frozen=True)
class FlatChunk:
    """Clients whose pairs are laid end to end, no padding: the layout for models whose per-client
    dense weights are vectors (MF, GMF), which can be gathered per pair like embedding rows."""

    members: torch.Tensor  # (C,) positions in the round's client list
    rows: torch.Tensor  # (R,) catalogue item behind each local row
    row_owner: torch.Tensor  # (R,) chunk position of the client owning the row
    owner: torch.Tensor  # (T,) chunk position of the client owning each pair
    positives: torch.Tensor  # (T,) local row of each positive
    negatives: torch.Tensor  # (epochs, T, negatives) local rows
    n_pairs: torch.Tensor  # (C,) positives per client

    def to(self, device: torch.device) -> FlatChunk:
        return FlatChunk(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def plan_chunks(sizes: torch.Tensor, width: int, negatives: int) -> list[torch.Tensor]:
    """Consecutive clients, as many as fit the memory bound (there is no padding to limit)."""
    chunks, start, slots = [], 0, 0
    per_pair = (1 + negatives) * width
    for position, size in enumerate(sizes.tolist()):
        if position > start and (slots + size) * per_pair > _BUCKET_FLOATS:
            chunks.append(torch.arange(start, position))
            start, slots = position, 0
        slots += size
    chunks.append(torch.arange(start, len(sizes)))
    return chunks


def _touched_rows(batch: RoundInput, members: torch.Tensor, n_items: int):
    """Every item each member touches this round, as unique (client, item) keys, and where each
    positive and negative points in that list of local rows."""
    positives = [batch.positives[i] for i in members.tolist()]
    negatives = [batch.negatives[i] for i in members.tolist()]
    C = len(members)
    epochs, _, n_neg = negatives[0].shape
    n_pairs = torch.tensor([len(p) for p in positives])
    owner = torch.repeat_interleave(torch.arange(C), n_pairs)
    flat_pos = torch.cat(positives)
    flat_neg = torch.cat([n.reshape(epochs, -1) for n in negatives], dim=1)  # (E, total * n_neg)
    owner_neg = torch.repeat_interleave(torch.arange(C), n_pairs * n_neg)
    keys = torch.cat([owner * n_items + flat_pos, (owner_neg * n_items + flat_neg).reshape(-1)])
    unique, local = torch.unique(keys, return_inverse=True)
    T = len(flat_pos)
    return unique, owner, n_pairs, local[:T], local[T:].view(epochs, T, n_neg)


def build_chunk(batch: RoundInput, members: torch.Tensor, n_items: int) -> FlatChunk:
    unique, owner, n_pairs, positives, negatives = _touched_rows(batch, members, n_items)
    return FlatChunk(
        members=members,
        rows=unique % n_items,
        row_owner=unique // n_items,
        owner=owner,
        positives=positives,
        negatives=negatives,
        n_pairs=n_pairs,
    )


def train_chunk(
    spec: ModelSpec,
    shared: Params,
    user_tables: Params,
    clients: torch.Tensor,
    chunk: FlatChunk,
    training: LocalTraining,
) -> BucketUpdate:
    """`train_bucket` for the flat layout: the same per-client losses, summed with index_add."""
    C, T = len(chunk.members), len(chunk.owner)
    n_neg = chunk.negatives.shape[-1]
    dense0 = spec.dense_of(shared)
    item0 = {name: shared[name].index_select(0, chunk.rows) for name in spec.item_tables}
    items = {k: v.clone().requires_grad_(training.update_shared) for k, v in item0.items()}
    dense = {
        k: v.reshape(1, -1).expand(C, -1).clone().requires_grad_(training.update_shared)
        for k, v in dense0.items()
    }
    users = {
        k: v[clients[chunk.members]].clone().requires_grad_(True) for k, v in user_tables.items()
    }
    params = list(users.values()) + (
        list(items.values()) + list(dense.values()) if training.update_shared else []
    )
    n_pairs = chunk.n_pairs.to(torch.float32)
    prox = training.update_shared and training.proximal_mu > 0

    def per_client(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(C, device=values.device).index_add(0, chunk.owner, values) / n_pairs

    for epoch in range(training.epochs):
        negatives = chunk.negatives[epoch].reshape(-1)
        u = {k: v.index_select(0, chunk.owner) for k, v in users.items()}
        w = {k: v.index_select(0, chunk.owner) for k, v in dense.items()}
        v_pos = {k: v.index_select(0, chunk.positives) for k, v in items.items()}
        v_neg = {
            k: v.index_select(0, negatives).view(T, n_neg, *v.shape[1:]) for k, v in items.items()
        }
        pos_score = spec.pair_scores(u, v_pos, w)  # (T,)
        neg_score = spec.pair_scores(
            {k: v.unsqueeze(1) for k, v in u.items()},
            v_neg,
            {k: v.unsqueeze(1) for k, v in w.items()},
        )  # (T, n_neg)
        pair_loss = -F.logsigmoid(pos_score.unsqueeze(-1) - neg_score).mean(-1)
        penalty = sum(v.pow(2).sum(-1) for v in users.values())
        for name in spec.item_tables:
            if item0[name].dim() == 2:
                norms = v_pos[name].pow(2).sum(-1) + v_neg[name].pow(2).sum(-1).mean(-1)
                penalty = penalty + per_client(norms)
        total = (per_client(pair_loss) + training.l2 * penalty).sum()
        if prox:
            total = total + proximal_sum(items, item0, dense, dense0, training.proximal_mu)
        sgd_step(params, total, training.learning_rate)
    with torch.no_grad():
        item_deltas = {k: items[k] - item0[k] for k in items}
        dense_deltas = {k: dense[k] - dense0[k].reshape(1, -1) for k in dense}
    return BucketUpdate(
        item_deltas=item_deltas if training.update_shared else {},
        dense_deltas=dense_deltas if training.update_shared else {},
        users={k: v.detach() for k, v in users.items()},
    )


def proximal_sum(
    items: Params, item0: Params, dense: Params, dense0: Params, mu: float
) -> torch.Tensor:
    """Σ over a group's clients of FedProx's μ/2·‖w_c − w_global‖²: each client's private copies of
    its touched item rows against the global rows, and its own dense copy (leading client
    dimension) against the global weights. Rows a client does not touch never leave the global
    value in the reference loop, so they add nothing there either."""
    rows = {k: items[k] - item0[k] for k in items}
    copies = {k: dense[k] - dense0[k].reshape(1, *dense[k].shape[1:]) for k in dense}
    return mu / 2 * sum(d.pow(2).sum() for d in (*rows.values(), *copies.values()))


@dataclass
class BucketUpdate:
    """What the clients of one bucket send: deltas of their touched rows and of the dense weights."""

    item_deltas: Params  # name -> (R, ...) change of each local row (see `Bucket.row_owner`)
    dense_deltas: Params  # name -> (C, ...)
    users: Params  # name -> (C, dim) the clients' new private rows (stay on the client)


def train_bucket(
    spec: ModelSpec,
    shared: Params,
    user_tables: Params,
    clients: torch.Tensor,
    bucket: Bucket,
    training: LocalTraining,
) -> BucketUpdate:
    C = len(bucket.members)
    dense0 = spec.dense_of(shared)
    # Private copies of the touched rows; gathers are index_select, whose backward is an index_add.
    item0 = {name: shared[name].index_select(0, bucket.rows) for name in spec.item_tables}
    items = {k: v.clone().requires_grad_(training.update_shared) for k, v in item0.items()}
    dense = {k: v.requires_grad_(training.update_shared) for k, v in stack_dense(dense0, C).items()}
    users = {
        k: v[clients[bucket.members]].clone().unsqueeze(1).requires_grad_(True)
        for k, v in user_tables.items()
    }
    params = list(users.values()) + (
        list(items.values()) + list(dense.values()) if training.update_shared else []
    )
    positives = bucket.positives.reshape(-1)
    mask = bucket.pair_mask.to(torch.float32)
    n_pairs = bucket.n_pairs.to(torch.float32)
    P = bucket.positives.shape[1]
    n_neg = bucket.negatives.shape[-1] // P
    prox = training.update_shared and training.proximal_mu > 0

    def gather(table: torch.Tensor, index: torch.Tensor, per_client: int) -> torch.Tensor:
        return table.index_select(0, index).view(C, per_client, *table.shape[1:])

    for epoch in range(training.epochs):
        negatives = bucket.negatives[epoch].reshape(-1)
        v_pos = {k: gather(v, positives, P) for k, v in items.items()}
        v_neg = {k: gather(v, negatives, P * n_neg) for k, v in items.items()}
        pos_score = spec.pair_scores(users, v_pos, dense)  # (C, P)
        neg_score = spec.pair_scores(users, v_neg, dense).view(C, P, n_neg)
        pair_loss = -F.logsigmoid(pos_score.unsqueeze(-1) - neg_score).mean(-1)
        loss_per_client = (pair_loss * mask).sum(1) / n_pairs
        penalty = sum(u.pow(2).sum(-1).squeeze(1) for u in users.values())
        for name in spec.item_tables:
            if item0[name].dim() == 2:
                pos_norm = (v_pos[name].pow(2).sum(-1) * mask).sum(1) / n_pairs
                neg_norm = v_neg[name].pow(2).sum(-1).view(C, P, n_neg).mean(-1)
                penalty = penalty + pos_norm + (neg_norm * mask).sum(1) / n_pairs
        total = (loss_per_client + training.l2 * penalty).sum()
        if prox:
            total = total + proximal_sum(items, item0, dense, dense0, training.proximal_mu)
        sgd_step(params, total, training.learning_rate)
    with torch.no_grad():
        item_deltas = {k: items[k] - item0[k] for k in items}
        dense_deltas = {k: dense[k] - dense0[k].reshape(1, *dense[k].shape[1:]) for k in dense}
    return BucketUpdate(
        item_deltas=item_deltas if training.update_shared else {},
        dense_deltas=dense_deltas if training.update_shared else {},
        users={k: v.detach().squeeze(1) for k, v in users.items()},
    )


def vectorised_round(
    spec: ModelSpec,
    shared: Params,
    user_tables: Params,
    batch: RoundInput,
    training: LocalTraining,
    layout: str = "auto",
) -> tuple[Params, Params]:
    """The same round as `reference_round`, trained group by group. Returns (example-weighted mean
    update of the shared parameters, new user rows of the round's clients in client order)."""
    total, new_users = vectorised_sum(spec, shared, user_tables, batch, training, layout)
    return (mean_of(total) if training.update_shared else {}), new_users


def vectorised_sum(
    spec: ModelSpec,
    shared: Params,
    user_tables: Params,
    batch: RoundInput,
    training: LocalTraining,
    layout: str = "auto",
    clip: float | None = None,
    summation: Summation | None = None,
) -> tuple[Aggregate, Params]:
    """Train the round's clients group by group; return the weighted sum of their shared-parameter
    updates (sparse: only touched rows are added) and their new user rows in client order.

    Without `clip` each update is weighted by the client's example count (FedAvg). With `clip` it is
    the DP-FedAvg client stage instead: each client's whole update is scaled to L2 norm ≤ clip and
    weighs 1 (`privacy.noise.ClipUpdate`, computed for the group at once).

    layout "flat" (pairs end to end, no padding) needs every dense weight to be a vector (MF, GMF);
    "padded" (buckets of similar-size clients) works for any model; "auto" takes flat when it can.

    With a `summation` (secure aggregation) each client's weighted update becomes its own dense
    message over the whole catalogue and the summation adds them up: a sparse message would tell
    the server which items the shopper touched, which is what secure aggregation hides.
    """
    weights = _weights(batch, clip, shared)
    sums = {k: torch.zeros_like(v) for k, v in shared.items()}
    groups = train_groups(spec, shared, user_tables, batch, training, layout, clip)
    new_users = next(groups)
    if len(batch.clients) == 0:  # Poisson sampling can pick nobody
        return Aggregate(sums, 0.0, 0), new_users
    messages: list[ClientMessage] = []
    sizes = torch.tensor([len(p) for p in batch.positives])
    for bucket, update, w in groups:
        if summation is not None:
            messages += dense_messages(
                update, bucket, w, shared, sizes[bucket.members.cpu()], training.epochs
            )
            continue
        row_weight = w[bucket.row_owner]
        for k, delta in update.item_deltas.items():
            # The sparse sum: only the rows these clients touched are added.
            sums[k].index_add_(0, bucket.rows, delta * along_rows(row_weight, delta))
        for k, delta in update.dense_deltas.items():
            sums[k] += (delta * along_rows(w, delta)).sum(0).reshape(shared[k].shape)
    if summation is not None and training.update_shared:
        return summation(messages), new_users
    return Aggregate(sums, float(weights.sum()), len(batch.clients)), new_users


def _weights(batch: RoundInput, clip: float | None, shared: Params) -> torch.Tensor:
    """Each client's weight in the sum: its example count (FedAvg), or 1 under clipping (DP)."""
    device = next(iter(shared.values())).device
    return (batch.num_examples if clip is None else torch.ones(len(batch.clients))).to(device)


def train_groups(
    spec: ModelSpec,
    shared: Params,
    user_tables: Params,
    batch: RoundInput,
    training: LocalTraining,
    layout: str = "auto",
    clip: float | None = None,
):
    """The round's clients trained group by group (see `vectorised_sum` for the layouts and
    `clip`). Yields first the new user rows of the round's clients in client order (filled in as
    the groups train), then for each group that updates shared parameters: its bucket, its update
    (clipped under `clip`) and its clients' weights."""
    n_items = shared[spec.item_tables[0]].shape[0]
    device = shared[spec.item_tables[0]].device
    width = max([v.shape[-1] for v in shared.values() if v.dim() == 2] + [1])
    sizes = torch.tensor([len(p) for p in batch.positives])
    weights = _weights(batch, clip, shared)
    clients = batch.clients.to(device)
    new_users = {
        k: torch.empty(len(batch.clients), v.shape[1], device=device)
        for k, v in user_tables.items()
    }
    can_flat = all(v.dim() <= 1 for v in spec.dense_of(shared).values())
    if layout == "flat" and not can_flat:
        raise ValueError(f"{spec.name} has per-client weight matrices: it needs the padded layout")
    flat = layout == "flat" or (layout == "auto" and can_flat)
    plan, build, train = (
        (plan_chunks, build_chunk, train_chunk)
        if flat
        else (plan_buckets, build_bucket, train_bucket)
    )
    yield new_users
    if len(batch.clients) == 0:
        return
    for members in plan(sizes, width, batch.negatives[0].shape[-1]):
        # Index bookkeeping runs on the CPU; the training maths on the model's device.
        bucket = build(batch, members, n_items).to(device)
        members = bucket.members
        update = train(spec, shared, user_tables, clients, bucket, training)
        for k, v in update.users.items():
            new_users[k][members] = v
        if not training.update_shared:
            continue
        if clip is not None:
            clip_per_client(
                update.item_deltas, bucket.row_owner, update.dense_deltas, len(members), clip
            )
        yield bucket, update, weights[members]


def dense_messages(
    update: BucketUpdate,
    bucket: Bucket | FlatChunk,
    weights: torch.Tensor,
    shared: Params,
    num_examples: torch.Tensor,
    local_steps: int,
) -> list[ClientMessage]:
    """Each client of a group as its own message: its weighted update scattered into tables of the
    full shared shape, zero where it touched nothing."""
    # Local rows are grouped by client in client order: each client's rows are one slice.
    sizes = torch.bincount(bucket.row_owner, minlength=len(bucket.members)).tolist()
    rows = torch.split(bucket.rows, sizes)
    deltas = {k: torch.split(delta, sizes) for k, delta in update.item_deltas.items()}
    messages = []
    for c in range(len(bucket.members)):
        w = weights[c]
        tensors = {
            k: torch.zeros_like(shared[k]).index_add_(0, rows[c], per_client[c] * w)
            for k, per_client in deltas.items()
        }
        for k, delta in update.dense_deltas.items():
            tensors[k] = (delta[c] * w).reshape(shared[k].shape)
        messages.append(ClientMessage(tensors, float(w), float(num_examples[c]), local_steps))
    return messages


def row_updates(
    update: BucketUpdate, bucket: Bucket | FlatChunk, weights: torch.Tensor
) -> list[RowUpdate]:
    """Each client of a group as its own weighted update of just the rows it touched (catalogue
    rows `bucket.rows`, grouped by client in client order) and its dense weights."""
    sizes = torch.bincount(bucket.row_owner, minlength=len(bucket.members)).tolist()
    rows = torch.split(bucket.rows, sizes)
    deltas = {k: torch.split(delta, sizes) for k, delta in update.item_deltas.items()}
    out = []
    for c in range(len(bucket.members)):
        w = weights[c]
        tensors = {k: per_client[c] * w for k, per_client in deltas.items()}
        for k, delta in update.dense_deltas.items():
            tensors[k] = delta[c] * w
        # The flat layout keeps a client's rows sorted already; the padded one too (torch.unique).
        out.append(RowUpdate(rows[c], tensors))
    return out
