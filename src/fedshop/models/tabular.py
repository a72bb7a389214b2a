"""A small network over a table's rows (data/tabular.py), for the retail tasks beyond recommendation.

One embedding table per categorical column, concatenated with the numeric features, two ReLU layers,
and a head: one logit (binary: return risk, fraud) or `horizon × len(quantiles)` values (quantile:
demand over the next weeks at several quantile levels). Every parameter is shared: a storefront has
no private parameters here. The embedding tables are row tables: a silo's update changes only the
rows of the codes it has, and the server averages each row over the silos that changed it.

Parameters are a plain dict of tensors (as every FedShop model's), so the aggregation stages, secure
sums and server optimisers carry them unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

Params = dict[str, torch.Tensor]
EMBEDDING_PREFIX = "embedding."


@dataclass(frozen=True)
class TabularShape:
    """What the network's shape depends on: the table's columns and what it predicts. A deployment's
    server learns these from the silos' hellos, never their rows."""

    cardinalities: tuple[int, ...]
    n_numeric: int
    outputs: int  # 1 (a logit) or horizon × quantile levels
    embedding_dim: int = 8
    hidden: int = 64


def embedding_tables(shape: TabularShape) -> tuple[str, ...]:
    return tuple(f"{EMBEDDING_PREFIX}{j}" for j in range(len(shape.cardinalities)))


def embedding_width(cardinality: int, cap: int) -> int:
    """Small vocabularies (sex, browser) get small vectors: about 1.6·n^0.56, at most `cap`."""
    return int(max(1, min(cap, round(1.6 * cardinality**0.56))))


def init_params(shape: TabularShape, generator: torch.Generator) -> Params:
    params: Params = {}
    width = shape.n_numeric
    for name, cardinality in zip(embedding_tables(shape), shape.cardinalities, strict=True):
        dim = embedding_width(cardinality, shape.embedding_dim)
        params[name] = torch.randn(cardinality, dim, generator=generator) * 0.05
        width += dim
    for layer, (fan_in, fan_out) in enumerate(
        ((width, shape.hidden), (shape.hidden, shape.hidden), (shape.hidden, shape.outputs))
    ):
        bound = (6.0 / (fan_in + fan_out)) ** 0.5  # Glorot uniform
        params[f"layer{layer}.weight"] = (
            torch.rand(fan_in, fan_out, generator=generator) * 2 - 1
        ) * bound
        params[f"layer{layer}.bias"] = torch.zeros(fan_out)
    return params


def forward(params: Params, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
    """(n, outputs) raw outputs: logits, or quantile values before sorting."""
    tables = sorted(k for k in params if k.startswith(EMBEDDING_PREFIX))
    columns = [params[name][categorical[:, j]] for j, name in enumerate(tables)]
    hidden = torch.cat([*columns, numeric], dim=1)
    hidden = F.relu(hidden @ params["layer0.weight"] + params["layer0.bias"])
    hidden = F.relu(hidden @ params["layer1.weight"] + params["layer1.bias"])
    return hidden @ params["layer2.weight"] + params["layer2.bias"]


def pinball_loss(
    predicted: torch.Tensor, target: torch.Tensor, levels: torch.Tensor
) -> torch.Tensor:
    """Mean quantile loss; `predicted` (n, h, q), `target` (n, h), `levels` (q,)."""
    error = target.unsqueeze(-1) - predicted
    return torch.maximum(levels * error, (levels - 1) * error).mean()


@dataclass(frozen=True)
class Head:
    """What the outputs mean: a logit, or quantiles at `levels` of `horizon` future values."""

    kind: str  # "binary" or "quantile"
    horizon: int = 1
    levels: tuple[float, ...] = ()

    @property
    def outputs(self) -> int:
        return 1 if self.kind == "binary" else self.horizon * len(self.levels)

    def loss(self, raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.kind == "binary":
            return F.binary_cross_entropy_with_logits(raw[:, 0], target)
        levels = torch.tensor(self.levels, dtype=raw.dtype)
        return pinball_loss(raw.view(len(raw), self.horizon, -1), target, levels)

    def predict(self, raw: torch.Tensor) -> torch.Tensor:
        """Binary: P(label = 1), (n,). Quantile: (n, horizon, levels), sorted along the levels so
        that a quantile never exceeds a higher one."""
        if self.kind == "binary":
            return torch.sigmoid(raw[:, 0])
        return raw.view(len(raw), self.horizon, -1).sort(dim=-1).values
