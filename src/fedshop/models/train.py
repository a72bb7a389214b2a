"""Local BPR training: the one routine used by federated silos and by both trained baselines."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from fedshop.config import TrainConfig
from fedshop.models.mf import Params, bpr_loss


@dataclass(frozen=True)
class TrainResult:
    shared: Params
    user_embedding: torch.Tensor
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
    user_embedding: torch.Tensor,
    train: sp.csr_matrix,
    epochs: int,
    config: TrainConfig,
    generator: torch.Generator,
    update_shared: bool = True,
    on_epoch: Callable[[int, TrainResult], None] | None = None,
) -> TrainResult:
    """Run `epochs` passes of BPR over the (local users × items) matrix `train`.

    Inputs are not modified: the function works on copies and returns the new values. Negatives are
    drawn uniformly from the whole catalogue (a rare draw of a positive is tolerated, as in BPR).
    With `update_shared=False` only the user embeddings move (personalisation). `on_epoch(epoch, state)`
    is called after each epoch with the current values (read-only views; do not modify them).
    """
    item_embedding = shared["item_embedding"].detach().clone().requires_grad_(update_shared)
    item_bias = shared["item_bias"].detach().clone().requires_grad_(update_shared)
    users_param = user_embedding.detach().clone().requires_grad_(True)
    trainable = [users_param] + ([item_embedding, item_bias] if update_shared else [])
    optimizer = torch.optim.Adam(trainable, lr=config.learning_rate)

    pair_users, pair_items = positive_pairs(train)
    n_pairs, n_items = len(pair_users), item_embedding.shape[0]
    batch_size = effective_batch_size(n_pairs, config)
    total, steps = 0.0, 0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n_pairs, generator=generator)
        for start in range(0, n_pairs, batch_size):
            batch = order[start : start + batch_size]
            users, positives = pair_users[batch], pair_items[batch]
            negatives = torch.randint(n_items, (len(batch), config.negatives), generator=generator)
            loss = bpr_loss(
                users_param[users],
                item_embedding[positives],
                item_embedding[negatives],
                item_bias[positives],
                item_bias[negatives],
                config.l2,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            steps += 1
        if on_epoch is not None:
            on_epoch(epoch, _snapshot(item_embedding, item_bias, users_param, total, steps))
    return _snapshot(item_embedding, item_bias, users_param, total, steps)


def _snapshot(
    item_embedding: torch.Tensor,
    item_bias: torch.Tensor,
    users: torch.Tensor,
    total_loss: float,
    steps: int,
) -> TrainResult:
    return TrainResult(
        shared={"item_embedding": item_embedding.detach(), "item_bias": item_bias.detach()},
        user_embedding=users.detach(),
        mean_loss=total_loss / max(steps, 1),
        steps=steps,
    )
