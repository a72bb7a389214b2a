"""Neural collaborative filtering (He et al., WWW 2017): GMF and NeuMF, trained here with BPR.

GMF:    score = <h, p_u ⊙ q_i> + b_i
NeuMF:  score = <w, [p_u ⊙ q_i ; MLP([p'_u ; q'_i])]> + b_i, MLP a ReLU tower halving its width
User vectors (p, p') are private; item vectors, biases, the tower and the output weights are shared.
The paper trains with a pointwise log loss; we use the same pairwise BPR loss as MF so that the three
models differ only in their scoring function. Output weights on the GMF part start at 1, so both models
start out as plain MF and the extra weights learn what a dot product cannot express.
"""

from __future__ import annotations

import math

import torch

from fedshop.config import ModelConfig
from fedshop.models.spec import ModelSpec, Params


def _normal(shape: tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * std


def _glorot(fan_in: int, fan_out: int, generator: torch.Generator) -> torch.Tensor:
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return (torch.rand(fan_in, fan_out, generator=generator) * 2 - 1) * bound


def _users(names: tuple[str, ...]):
    def init(n_users: int, config: ModelConfig, generator: torch.Generator) -> Params:
        return {name: _normal((n_users, config.dim), config.init_std, generator) for name in names}

    return init


# ---- GMF -------------------------------------------------------------------------------------------


def _gmf_shared(n_items: int, config: ModelConfig, generator: torch.Generator) -> Params:
    return {
        "item_embedding": _normal((n_items, config.dim), config.init_std, generator),
        "item_bias": torch.zeros(n_items),
        "output_weight": torch.ones(config.dim),
    }


def gmf_pair_scores(users: Params, items: Params, dense: Params) -> torch.Tensor:
    product = users["user_embedding"] * items["item_embedding"]
    return (product * dense["output_weight"]).sum(-1) + items["item_bias"]


def gmf_catalogue_scores(users: Params, items: Params, dense: Params) -> torch.Tensor:
    weighted = users["user_embedding"] * dense["output_weight"]
    return weighted @ items["item_embedding"].T + items["item_bias"]


GMF = ModelSpec(
    name="gmf",
    item_tables=("item_embedding", "item_bias"),
    user_tables=("user_embedding",),
    init_shared=_gmf_shared,
    init_users=_users(("user_embedding",)),
    pair_scores=gmf_pair_scores,
    catalogue_scores=gmf_catalogue_scores,
)


# ---- NeuMF -----------------------------------------------------------------------------------------


def tower_widths(config: ModelConfig) -> list[int]:
    """Hidden widths of the MLP tower: dim, dim/2, … (`mlp_layers` layers, at least 1 unit)."""
    return [max(1, config.dim // 2**layer) for layer in range(config.mlp_layers)]


def _neumf_shared(n_items: int, config: ModelConfig, generator: torch.Generator) -> Params:
    dim, widths = config.dim, tower_widths(config)
    # The first layer sees [p'_u ; q'_i]; it is kept as two blocks so that the user half is computed
    # once per user rather than once per (user, item) pair.
    first = _glorot(2 * dim, widths[0], generator)
    shared = {
        "item_gmf": _normal((n_items, dim), config.init_std, generator),
        "item_mlp": _normal((n_items, dim), config.init_std, generator),
        "item_bias": torch.zeros(n_items),
        "mlp_user_weight_1": first[:dim].clone(),
        "mlp_item_weight_1": first[dim:].clone(),
        "mlp_bias_1": torch.zeros(widths[0]),
    }
    for layer in range(1, len(widths)):
        shared[f"mlp_weight_{layer + 1}"] = _glorot(widths[layer - 1], widths[layer], generator)
        shared[f"mlp_bias_{layer + 1}"] = torch.zeros(widths[layer])
    mlp_out = _glorot(widths[-1], 1, generator).reshape(-1)
    shared["output_weight"] = torch.cat([torch.ones(dim), mlp_out])
    return shared


def neumf_pair_scores(users: Params, items: Params, dense: Params) -> torch.Tensor:
    hidden = torch.relu(
        users["user_mlp"] @ dense["mlp_user_weight_1"]
        + items["item_mlp"] @ dense["mlp_item_weight_1"]
        + dense["mlp_bias_1"]
    )
    layer = 2
    while f"mlp_weight_{layer}" in dense:
        hidden = torch.relu(hidden @ dense[f"mlp_weight_{layer}"] + dense[f"mlp_bias_{layer}"])
        layer += 1
    gmf = users["user_gmf"] * items["item_gmf"]
    dim = gmf.shape[-1]
    weight = dense["output_weight"]
    return (
        (gmf * weight[..., :dim]).sum(-1)
        + (hidden * weight[..., dim:]).sum(-1)
        + items["item_bias"]
    )


NEUMF = ModelSpec(
    name="neumf",
    item_tables=("item_gmf", "item_mlp", "item_bias"),
    user_tables=("user_gmf", "user_mlp"),
    init_shared=_neumf_shared,
    init_users=_users(("user_gmf", "user_mlp")),
    pair_scores=neumf_pair_scores,
)
