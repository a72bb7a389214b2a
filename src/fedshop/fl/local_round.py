"""One cross-device round, defined once: what each client computes, and a plain reference loop.

Local training, per client and round: `epochs` plain-SGD steps, each on the full batch of the client's
positives with fresh negatives (items the client never bought), loss = mean BPR + L2 on the touched
embedding rows, exactly the per-batch loss of `models.train.train_bpr`; with `proximal_mu` > 0 also
FedProx's μ/2·‖w − w_global‖² on the client's copy of the shared parameters.

`reference_round` runs it one client at a time, each with a full copy of the shared model, and sends
every update as a `ClientMessage` through the ordinary aggregation pipeline. `fl/vectorised.py` computes
the same round for many clients at once; a test holds the two equal within float tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from fedshop.messages import AggregationPipeline, ClientMessage
from fedshop.models.mf import bpr_loss
from fedshop.models.spec import ModelSpec, Params, gather_rows
from fedshop.models.train import batch_scores, embedding_penalty, proximal_term
from fedshop.seeding import RandomSource, uniform

# Redraws of negatives that hit one of the client's own items; after this many, a hit is tolerated
# (it only happens for a shopper who bought most of the catalogue).
_NEGATIVE_REDRAWS = 20


@dataclass(frozen=True)
class LocalTraining:
    epochs: int
    learning_rate: float
    l2: float
    negatives: int
    update_shared: bool = True
    # FedProx's μ (Li et al., MLSys 2020): μ/2·‖w − w_global‖² on the shared parameters; 0: off.
    proximal_mu: float = 0.0


@dataclass(frozen=True)
class RoundInput:
    """The sampled clients of one round, their positives and the negatives drawn for them."""

    clients: torch.Tensor  # (C,) user index of each client
    positives: list[torch.Tensor]  # per client, its training items
    negatives: list[torch.Tensor]  # per client, (epochs, n_pos, negatives) item indices

    @property
    def num_examples(self) -> torch.Tensor:
        return torch.tensor([len(p) for p in self.positives], dtype=torch.float32)


def poisson_sample(pool: torch.Tensor, rate: float, generator: RandomSource) -> torch.Tensor:
    """Each client independently with probability `rate` (the sampling the DP accountant assumes;
    its amplification holds only while who was sampled stays secret: under DP, `generator` is a
    secret `NoiseStream`)."""
    if rate >= 1.0:
        return pool
    return pool[uniform(len(pool), generator) < rate]


def draw_round(
    train: sp.csr_matrix,
    clients: torch.Tensor,
    epochs: int,
    negatives: int,
    generator: torch.Generator,
) -> RoundInput:
    """Positives of `clients` (rows of `train`) and uniform negatives outside each client's items."""
    n_items = train.shape[1]
    indptr = torch.from_numpy(train.indptr.astype(np.int64))
    indices = torch.from_numpy(train.indices.astype(np.int64))
    starts, ends = indptr[clients], indptr[clients + 1]
    sizes = ends - starts
    owner = torch.repeat_interleave(torch.arange(len(clients)), sizes)
    flat_positive = indices[
        torch.repeat_interleave(starts - torch.cumsum(sizes, 0) + sizes, sizes)
        + torch.arange(int(sizes.sum()))
    ]
    # Keys (client, item) sorted, so membership is one searchsorted (CSR rows are sorted).
    own_keys = owner * n_items + flat_positive
    draws = torch.randint(n_items, (epochs, len(owner), negatives), generator=generator)
    owner_keys = (owner * n_items).view(1, -1, 1)
    for _ in range(_NEGATIVE_REDRAWS):
        keys = owner_keys + draws
        slot = torch.searchsorted(own_keys, keys.reshape(-1)).clamp(max=len(own_keys) - 1)
        clash = (own_keys[slot] == keys.reshape(-1)).view_as(draws)
        hits = int(clash.sum())
        if hits == 0:
            break
        draws[clash] = torch.randint(n_items, (hits,), generator=generator)
    split_sizes = sizes.tolist()
    return RoundInput(
        clients=clients,
        positives=list(torch.split(flat_positive, split_sizes)),
        negatives=list(torch.split(draws, split_sizes, dim=1)),
    )


def client_loss(
    spec: ModelSpec,
    users: Params,
    items: Params,
    dense: Params,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    l2: float,
) -> torch.Tensor:
    """One client's loss on full tables: mean BPR over its pairs + L2 on the rows it touches."""
    pair_users = {k: v.expand(len(positives), -1) for k, v in users.items()}
    v_pos = gather_rows(items, spec.item_tables, positives)
    v_neg = gather_rows(items, spec.item_tables, negatives)
    pos_score, neg_score = batch_scores(spec, pair_users, v_pos, v_neg, dense)
    return bpr_loss(pos_score, neg_score) + l2 * embedding_penalty(pair_users, v_pos, v_neg)


def sgd_step(params: list[torch.Tensor], loss: torch.Tensor, learning_rate: float) -> None:
    """One plain SGD step, in place (clients of the same round never share a parameter)."""
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for param, grad in zip(params, grads, strict=True):
            param -= learning_rate * grad


def reference_round(
    spec: ModelSpec,
    shared: Params,
    user_tables: Params,
    batch: RoundInput,
    training: LocalTraining,
    pipeline: AggregationPipeline | None = None,
) -> tuple[Params, Params]:
    """One round, one client at a time. Returns (mean update of the shared parameters, new user rows
    of the round's clients, stacked in client order)."""
    pipeline = pipeline or AggregationPipeline()
    messages, new_users = [], {k: [] for k in user_tables}
    for position, user in enumerate(batch.clients.tolist()):
        local = {
            k: v.detach().clone().requires_grad_(training.update_shared) for k, v in shared.items()
        }
        mine = {
            k: v[user : user + 1].detach().clone().requires_grad_(True)
            for k, v in user_tables.items()
        }
        params = list(mine.values()) + (list(local.values()) if training.update_shared else [])
        for epoch in range(training.epochs):
            loss = client_loss(
                spec, mine, local, spec.dense_of(local),
                batch.positives[position], batch.negatives[position][epoch], training.l2,
            )  # fmt: skip
            if training.update_shared and training.proximal_mu:
                loss = loss + proximal_term(local, shared, training.proximal_mu)
            sgd_step(params, loss, training.learning_rate)
        for k, v in mine.items():
            new_users[k].append(v.detach()[0])
        delta = {k: local[k].detach() - shared[k] for k in shared}
        messages.append(
            pipeline.on_client(
                ClientMessage(
                    delta, 1.0, len(batch.positives[position]), local_steps=training.epochs
                )
            )
        )
    mean_update = pipeline.aggregate(messages) if training.update_shared else {}
    return mean_update, {k: torch.stack(v) for k, v in new_users.items()}
