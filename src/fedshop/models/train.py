"""Local BPR training: the one routine used by federated silos and by both trained baselines."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from fedshop.config import TrainConfig
from fedshop.models.mf import MF, bpr_loss
from fedshop.models.spec import ModelSpec, Params, gather_rows


@dataclass(frozen=True)
class TrainResult:
    shared: Params
    private: Params
    mean_loss: float
    steps: int


def positive_pairs(train: sp.csr_matrix) -> tuple[torch.Tensor, torch.Tensor]:
    coo = train.tocoo()
    return torch.from_numpy(coo.row.astype(np.int64)), torch.from_numpy(coo.col.astype(np.int64))


def effective_batch_size(n_pairs: int, config: TrainConfig) -> int:
    """`batch_size`, shrunk for small data so an epoch has at least `min_batches_per_epoch` steps."""
    return max(1, min(config.batch_size, -(-n_pairs // config.min_batches_per_epoch)))


def train_bpr(
    shared: Params,
    private: Params,
    train: sp.csr_matrix,
    epochs: int,
    config: TrainConfig,
    generator: torch.Generator,
    update_shared: bool = True,
    user_silo: torch.Tensor | None = None,
    on_epoch: Callable[[int, TrainResult], None] | None = None,
    spec: ModelSpec = MF,
    frozen: Collection[str] = (),
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Run `epochs` passes of BPR over the (users × items) matrix `train`.

    `private` holds the users' embeddings (row = row of `train`) and, optionally, silo item-bias
    offsets indexed by `user_silo` (all zeros, i.e. one silo, when omitted). Inputs are not modified:
    the function works on copies and returns the new values. Negatives are drawn uniformly from the
    whole catalogue (a rare draw of a positive is tolerated, as in BPR). L2 applies to the embedding
    rows and offsets each batch touches. With `update_shared=False` only the private parameters move
    (personalisation); private tensors named in `frozen` stay fixed too (a new customer's vector
    fitted against a storefront's offsets). `on_epoch(epoch, state)` is called after each epoch
    with read-only views. With `proximal_mu` > 0 every step's loss also has FedProx's
    μ/2·‖w − w_shared‖² over the whole shared tables (`proximal_term`, anchored at `shared` as
    given); the private parameters have none.
    """
    mine_shared = {k: v.detach().clone().requires_grad_(update_shared) for k, v in shared.items()}
    mine = {k: v.detach().clone().requires_grad_(k not in frozen) for k, v in private.items()}
    silo_bias = mine.get("silo_item_bias")
    trainable = [v for k, v in mine.items() if k not in frozen]
    trainable += list(mine_shared.values()) if update_shared else []
    optimizer = torch.optim.Adam(trainable, lr=config.learning_rate)
    dense = spec.dense_of(mine_shared)
    anchor = {k: v.detach() for k, v in shared.items()} if update_shared and proximal_mu else None

    pair_users, pair_items = positive_pairs(train)
    if user_silo is None:
        user_silo = torch.zeros(train.shape[0], dtype=torch.int64)
    n_pairs, n_items = len(pair_users), train.shape[1]
    batch_size = effective_batch_size(n_pairs, config)
    total, steps = 0.0, 0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n_pairs, generator=generator)
        for start in range(0, n_pairs, batch_size):
            batch = order[start : start + batch_size]
            users, positives = pair_users[batch], pair_items[batch]
            negatives = torch.randint(n_items, (len(batch), config.negatives), generator=generator)
            u = gather_rows(mine, spec.user_tables, users)
            v_pos = gather_rows(mine_shared, spec.item_tables, positives)
            v_neg = gather_rows(mine_shared, spec.item_tables, negatives)
            pos_score, neg_score = batch_scores(spec, u, v_pos, v_neg, dense)
            penalty = embedding_penalty(u, v_pos, v_neg)
            if silo_bias is not None:
                silos = user_silo[users]
                c_pos, c_neg = silo_bias[silos, positives], silo_bias[silos[:, None], negatives]
                pos_score, neg_score = pos_score + c_pos, neg_score + c_neg
                penalty = penalty + c_pos.pow(2).mean() + c_neg.pow(2).mean()
            loss = bpr_loss(pos_score, neg_score) + config.l2 * penalty
            if anchor is not None:
                loss = loss + proximal_term(mine_shared, anchor, proximal_mu)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            steps += 1
        if on_epoch is not None:
            on_epoch(epoch, _snapshot(mine_shared, mine, total, steps))
    return _snapshot(mine_shared, mine, total, steps)


def batch_scores(
    spec: ModelSpec, users: Params, positives: Params, negatives: Params, dense: Params
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of a batch's positives (batch,) and negatives (batch, n_neg), one user row per pair."""
    pos_score = spec.pair_scores(users, positives, dense)
    neg_score = spec.pair_scores({k: u.unsqueeze(1) for k, u in users.items()}, negatives, dense)
    return pos_score, neg_score


def embedding_penalty(users: Params, positives: Params, negatives: Params) -> torch.Tensor:
    """Mean squared norm of the embedding rows a batch touches (biases are not penalised)."""
    penalty = sum(u.pow(2).sum(-1).mean() for u in users.values())
    for name, v_pos in positives.items():
        if v_pos.dim() >= 2:
            v_neg = negatives[name]
            penalty = penalty + v_pos.pow(2).sum(-1).mean() + v_neg.pow(2).sum(-1).mean(1).mean()
    return penalty


def proximal_term(params: Params, anchor: Params, mu: float) -> torch.Tensor:
    """FedProx's proximal term (Li et al., MLSys 2020): μ/2 · Σ ‖w − w_anchor‖² over `params`;
    its gradient is μ·(w − w_anchor). `anchor` holds the round's global values (no gradient)."""
    return mu / 2 * sum((params[k] - anchor[k]).pow(2).sum() for k in params)


def _snapshot(shared: Params, private: Params, total_loss: float, steps: int) -> TrainResult:
    return TrainResult(
        shared={k: v.detach() for k, v in shared.items()},
        private={k: v.detach() for k, v in private.items()},
        mean_loss=total_loss / max(steps, 1),
        steps=steps,
    )
