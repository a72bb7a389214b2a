"""Matrix factorisation for implicit feedback, trained with BPR (Rendle et al., UAI 2009).

score(u, i) = <user_u, item_i> + bias_i

Item embeddings and item biases are *shared*: every silo trains them and the server aggregates them.
User embeddings are *private*: each silo keeps its own customers' vectors and never sends them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Params = dict[str, torch.Tensor]

SHARED_PARAMETERS = ("item_embedding", "item_bias")
PRIVATE_PARAMETERS = ("user_embedding",)


def init_shared(n_items: int, dim: int, init_std: float, generator: torch.Generator) -> Params:
    return {
        "item_embedding": torch.randn(n_items, dim, generator=generator) * init_std,
        "item_bias": torch.zeros(n_items),
    }


def init_user_embedding(
    n_users: int, dim: int, init_std: float, generator: torch.Generator
) -> torch.Tensor:
    return torch.randn(n_users, dim, generator=generator) * init_std


def score_all(user_embedding: torch.Tensor, shared: Params) -> torch.Tensor:
    """Scores of the given users against the whole catalogue: (users × items)."""
    return user_embedding @ shared["item_embedding"].T + shared["item_bias"]


def bpr_loss(
    users: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    pos_bias: torch.Tensor,
    neg_bias: torch.Tensor,
    l2: float,
) -> torch.Tensor:
    """Mean BPR loss with L2 on the embeddings touched by the batch.

    `users`, `positives`: (batch, dim); `negatives`: (batch, n_neg, dim); biases match.
    """
    pos_score = (users * positives).sum(-1) + pos_bias
    neg_score = torch.einsum("bd,bnd->bn", users, negatives) + neg_bias
    ranking = -F.logsigmoid(pos_score.unsqueeze(1) - neg_score).mean()
    penalty = (
        users.pow(2).sum(-1).mean()
        + positives.pow(2).sum(-1).mean()
        + negatives.pow(2).sum(-1).mean(1).mean()
    )
    return ranking + l2 * penalty
