"""SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018) as pure functions.

The model is a dict of tensors and functions of it, so that `torch.func` can batch clients
(`vmap`), take per-client gradients (`grad`) and the trainers stay free of `nn.Module` state:

    x_t   = E[s_t] · √d + P[pos_t]            item embedding E (shared with the output), learned positions
    h     = blocks(x)                          causal self-attention blocks (1 head) + point-wise FFN
    score = LN(h_T) · E[i]                     next-item score of every catalogue item i

Sequences are left-padded; positions are anchored at the right (the last item always has position
maxlen - 1, as in the reference implementation, which pads to maxlen). Padded positions are masked as
attention keys and zeroed after every block, so a sequence's output does not depend on how much
padding its batch adds: one shopper scored alone and in a batch of any length give the same numbers
(the federated simulator relies on it). Attention is causal: the output at position t reads positions
≤ t only.

Every parameter is shared (the item table `item_embedding` is the model's only item table; the rest
are dense transformer weights). There is no user table: a shopper is their sequence, which stays on
their device and is read only there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedshop.config import ModelConfig
from fedshop.errors import FedShopError
from fedshop.models.spec import ModelSpec, Params

ITEM_TABLE = "item_embedding"


@dataclass(frozen=True)
class SasRecShape:
    """The architecture: SASRec's settings for the Amazon datasets (maxlen 50, 2 blocks, 1 head)."""

    dim: int = 64
    maxlen: int = 50
    blocks: int = 2
    dropout: float = 0.2


def init_params(n_items: int, shape: SasRecShape, generator: torch.Generator) -> Params:
    d = shape.dim

    def normal(*size: int, std: float) -> torch.Tensor:
        return torch.randn(*size, generator=generator) * std

    def xavier(fan_in: int, fan_out: int) -> torch.Tensor:
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return (torch.rand(fan_in, fan_out, generator=generator) * 2 - 1) * bound

    params: Params = {
        ITEM_TABLE: normal(n_items, d, std=1.0 / math.sqrt(d)),
        "position_embedding": normal(shape.maxlen, d, std=1.0 / math.sqrt(d)),
        "last_ln_w": torch.ones(d),
        "last_ln_b": torch.zeros(d),
    }
    for b in range(shape.blocks):
        for name in ("q", "k", "v", "ff1", "ff2"):
            params[f"b{b}_{name}_w"] = xavier(d, d)  # applied as x @ W
            params[f"b{b}_{name}_b"] = torch.zeros(d)
        for name in ("ln1", "ln2"):
            params[f"b{b}_{name}_w"] = torch.ones(d)
            params[f"b{b}_{name}_b"] = torch.zeros(d)
    return params


def n_blocks(params: Params) -> int:
    return sum(1 for k in params if k.endswith("_q_w"))


def _layer_norm(x: torch.Tensor, params: Params, name: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], params[f"{name}_w"], params[f"{name}_b"], eps=1e-8)


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return F.dropout(x, p, training) if training and p > 0 else x


def hidden_states(
    params: Params,
    items: torch.Tensor,
    mask: torch.Tensor,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Hidden state of every position: items (..., L) item indices (any value where padded), mask
    (..., L) True on real items (left padding). Returns (..., L, d); padded rows are zero."""
    table = params[ITEM_TABLE]
    d = table.shape[-1]
    L = items.shape[-1]
    maxlen = params["position_embedding"].shape[0]
    if maxlen < L:
        raise ValueError(f"sequences of {L} items are longer than maxlen {maxlen}")
    keep = mask.to(table.dtype).unsqueeze(-1)
    x = table[items.clamp(min=0)] * math.sqrt(d) + params["position_embedding"][maxlen - L :]
    x = _dropout(x, dropout, training) * keep
    causal = torch.ones(L, L, dtype=torch.bool, device=items.device).tril()
    allowed = causal & mask.unsqueeze(-2)  # (..., L, L): earlier real items only
    # A padded query row has no allowed key: let it read itself (its output is zeroed anyway).
    allowed = allowed | torch.eye(L, dtype=torch.bool, device=items.device)
    bias = torch.zeros(allowed.shape, dtype=table.dtype, device=items.device).masked_fill(
        ~allowed, float("-inf")
    )
    for b in range(n_blocks(params)):
        p = lambda name, b=b: params[f"b{b}_{name}"]  # noqa: E731
        q_in = _layer_norm(x, params, f"b{b}_ln1")
        q = q_in @ p("q_w") + p("q_b")
        k = x @ p("k_w") + p("k_b")
        v = x @ p("v_w") + p("v_b")
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1)
        attention = _dropout(attention, dropout, training)
        x = q_in + attention @ v
        x = _layer_norm(x, params, f"b{b}_ln2")
        ff = torch.relu(x @ p("ff1_w") + p("ff1_b"))
        ff = _dropout(ff, dropout, training) @ p("ff2_w") + p("ff2_b")
        x = (x + _dropout(ff, dropout, training)) * keep
    return _layer_norm(x, params, "last_ln") * keep


def last_state(params: Params, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The user representation: the hidden state at the last position (evaluation mode)."""
    return hidden_states(params, items, mask)[..., -1, :]


def catalogue_scores(params: Params, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(..., n_items) next-item scores of left-padded sequences against the whole catalogue."""
    return last_state(params, items, mask) @ params[ITEM_TABLE].T


def sequence_loss(
    params: Params,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    loss: str = "ce",
    negatives: torch.Tensor | None = None,
    dropout: float = 0.0,
    training: bool = True,
    compact: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-item loss over the real positions of `inputs` (..., L) and their count.

    ce:  cross-entropy of the target against the whole catalogue (softmax over every item);
    bce: SASRec's own loss: -log σ(s_target) - log(1 - σ(s_negative)), one sampled negative per
         position (`negatives`, same shape as `targets`).
    Returns (sum of the position losses, number of positions): a client's mean is their ratio,
    and a batch's per-position mean is the ratio of the sums. `compact` scores the real positions
    only (boolean indexing: not under `vmap`); the result is the same.
    """
    h = hidden_states(params, inputs, mask, dropout, training)
    table = params[ITEM_TABLE]
    if compact:
        real = mask
        h, targets, mask = h[real], targets[real], mask[real]
        negatives = negatives[real] if negatives is not None else None
    weight = mask.to(h.dtype)
    if loss == "ce":
        logits = h @ table.T  # (..., L, n_items)
        per_position = torch.logsumexp(logits, dim=-1) - torch.gather(
            logits, -1, targets.clamp(min=0).unsqueeze(-1)
        ).squeeze(-1)
    elif loss == "bce":
        if negatives is None:
            raise ValueError("the bce loss needs one sampled negative per position")
        positive = (h * table[targets.clamp(min=0)]).sum(-1)
        negative = (h * table[negatives.clamp(min=0)]).sum(-1)
        per_position = -F.logsigmoid(positive) - F.logsigmoid(-negative)
    else:
        raise ValueError(f"unknown loss {loss!r}: ce or bce")
    return (per_position * weight).sum(), weight.sum()


def _init_shared(n_items: int, config: ModelConfig, generator: torch.Generator) -> Params:
    return init_params(n_items, SasRecShape(dim=config.dim), generator)


def _no_users(n_users: int, config: ModelConfig, generator: torch.Generator) -> Params:
    return {}


def _not_pairwise(users: Params, items: Params, dense: Params) -> torch.Tensor:
    raise FedShopError("sasrec scores a shopper's sequence, not a (user, item) pair")


# The registry entry (choices.MODELS): every parameter shared, no private user table. The pairwise
# scorer of the user-vector models does not apply; `fl/sequences.py` trains and scores it.
SASREC = ModelSpec(
    name="sasrec",
    item_tables=(ITEM_TABLE,),
    user_tables=(),
    init_shared=_init_shared,
    init_users=_no_users,
    pair_scores=_not_pairwise,
)
