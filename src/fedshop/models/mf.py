"""Matrix factorisation for implicit feedback, trained with BPR (Rendle et al., UAI 2009).

score(u, i) = <user_u, item_i> + bias_i + silo_bias[silo(u), i]

Item embeddings and item biases are *shared*: every silo trains them and the server aggregates them.
User embeddings and the silo item-bias offsets are *private*: each silo keeps its own customers'
vectors and its own offsets and never sends them. The offsets let a storefront express local taste
(German customers buy different best-sellers than British ones) on top of the shared model; the
centralized baseline has the same term, indexed by each customer's silo, so all methods share a model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedshop.config import ModelConfig
from fedshop.models import spec as _spec
from fedshop.models.spec import ModelSpec, Params

SHARED_PARAMETERS = ("item_embedding", "item_bias")
PRIVATE_PARAMETERS = ("user_embedding", "silo_item_bias")


def init_shared(n_items: int, dim: int, init_std: float, generator: torch.Generator) -> Params:
    return {
        "item_embedding": torch.randn(n_items, dim, generator=generator) * init_std,
        "item_bias": torch.zeros(n_items),
    }


def init_private(
    n_users: int,
    n_items: int,
    dim: int,
    init_std: float,
    generator: torch.Generator,
    n_silos: int = 1,
    silo_item_bias: bool = True,
) -> Params:
    """Private parameters of `n_users` customers spread over `n_silos` silos (1 inside a silo)."""
    config = ModelConfig(dim=dim, init_std=init_std, silo_item_bias=silo_item_bias)
    return MF.init_private(n_users, n_items, config, generator, n_silos)


def pair_scores(users: Params, items: Params, dense: Params) -> torch.Tensor:
    return (users["user_embedding"] * items["item_embedding"]).sum(-1) + items["item_bias"]


def catalogue_scores(users: Params, items: Params, dense: Params) -> torch.Tensor:
    return users["user_embedding"] @ items["item_embedding"].T + items["item_bias"]


MF = ModelSpec(
    name="mf-bpr",
    item_tables=SHARED_PARAMETERS,
    user_tables=("user_embedding",),
    init_shared=lambda n_items, c, g: init_shared(n_items, c.dim, c.init_std, g),
    init_users=lambda n_users, c, g: {
        "user_embedding": torch.randn(n_users, c.dim, generator=g) * c.init_std
    },
    pair_scores=pair_scores,
    catalogue_scores=catalogue_scores,
)


def score_all(
    shared: Params, private: Params, users: torch.Tensor, user_silo: torch.Tensor | None = None
) -> torch.Tensor:
    """MF scores of `users` (indices into the private tables) against the whole catalogue."""
    return _spec.score_all(MF, shared, private, users, user_silo)


def bpr_loss(pos_score: torch.Tensor, neg_score: torch.Tensor) -> torch.Tensor:
    """Mean BPR loss: `pos_score` (batch,), `neg_score` (batch, n_neg)."""
    return -F.logsigmoid(pos_score.unsqueeze(1) - neg_score).mean()
