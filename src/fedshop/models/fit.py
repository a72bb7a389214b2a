"""Latent-size models of fit (Misra, Wan & McAuley, RecSys 2018): will this size fit this shopper?

Every shopper c has a private "true size" vector u_c and bias b_c; every product p (an item in one
size) has a shared vector v_p = w_p + s_p·d, its own learned part plus its catalogue size s_p along a
shared direction d, and its parent item a shared bias b_i. The catalogue size is what ties an item's
sizes into an order (the paper constrains them to be monotone); learned alone, the vector of a size
rented a few times says little, and every size of an item scored alike. The pair becomes a fit vector

    LF (latent factors):   φ = [b_c, b_i, u_c ⊙ v_p]       (K-LF-*, the paper's best family)
    LV (latent variables): φ = [b_c, b_i, u_c − v_p]       (K-LV-*)
    1-LV:                  φ = u_c − v_p, one scalar size each (Sembium et al. 2017, the paper's (a))

and a head maps φ to P(small), P(fit), P(large):
- LR: ordinal (cumulative logit) regression, s = w·φ; P(y ≤ small) = σ(θ₁ − s), P(y ≤ fit) =
  σ(θ₂ − s), θ₂ = θ₁ + softplus(γ) > θ₁: the paper's two-threshold ordinal model made smooth.
- ML: metric learning with prototypes: z = φ L, logits = −‖z − c_k‖² for a learned prototype c_k of
  each class. The paper learns the metric with LMNN and classifies by nearest prototypes; here the
  metric and the prototypes are trained jointly by cross-entropy (a differentiable stand-in for the
  same picture: classes as regions of a learned metric space).

`measure-ml` is the baseline that uses body measurements instead of a learned private vector: u_c and
b_c are a shared linear map of the shopper's measurements (then φ as in LF), so the shopper has no
private parameter.

Parameters fall in the same groups as the recommenders' (`models/spec.py`): row tables shared by
products (`product_size`) and items (`item_bias`), dense shared weights (the head, the measurement
map), and private rows per shopper (`user_size`, `user_bias`) that never leave the silo.
Every function takes the head's weights with a leading batch dimension (a view made by `expand` in
ordinary training), so that per-record gradients for DP-SGD come out of one backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedshop.errors import ConfigError

Params = dict[str, torch.Tensor]
PRODUCT_TABLES = ("product_size",)  # rows indexed by product
ITEM_TABLES = ("item_bias",)  # rows indexed by the product's parent item
USER_TABLES = ("user_size", "user_bias")  # private rows indexed by the silo's own shoppers
INPUTS = ("measurements", "size")  # what `gather` adds that is data, not a parameter
CLASSES = 3


@dataclass(frozen=True)
class FitModel:
    name: str
    latent: str  # "lf" | "lv" | "measure"
    head: str  # "lr" | "ml"
    description: str
    fixed_dim: int = 0  # 1-LV: one size each, whatever [fit] dim says
    biases: bool = True  # φ starts with the shopper's and the item's bias (1-LV has none)

    def dim(self, configured: int) -> int:
        return self.fixed_dim or configured

    @property
    def has_private(self) -> bool:
        return self.latent != "measure"

    def init_shared(
        self, n_products: int, n_items: int, n_features: int, dim: int, generator: torch.Generator
    ) -> Params:
        k = self.dim(dim)
        width = k + 2 if self.biases else k
        shared = {
            "product_size": 0.1 * torch.randn(n_products, k, generator=generator),
            "item_bias": torch.zeros(n_items, 1),
            "size_direction": 0.1 * torch.randn(k, generator=generator),
        }
        if self.latent == "measure":
            shared["measure_map"] = 0.1 * torch.randn(n_features, k + 1, generator=generator)
        if self.head == "lr":
            shared["weights"] = torch.full((width,), 1.0)
            shared["thresholds"] = torch.tensor([-1.0, 0.5])  # θ₁ and γ (θ₂ = θ₁ + softplus γ)
        else:
            shared["projection"] = torch.eye(width) + 0.01 * torch.randn(
                width, width, generator=generator
            )
            # Prototypes start apart along the shopper's and the item's bias axes, small · fit ·
            # large in that order (along one axis only, some seeds settled in a poor optimum).
            shared["prototypes"] = torch.zeros(CLASSES, width)
            shared["prototypes"][:, :2] = torch.tensor([-1.0, 0.0, 1.0]).unsqueeze(1)
        return shared

    def init_private(self, n_users: int, dim: int, generator: torch.Generator) -> Params:
        if not self.has_private:
            return {}
        k = self.dim(dim)
        return {
            "user_size": 0.1 * torch.randn(n_users, k, generator=generator),
            "user_bias": torch.zeros(n_users, 1),
        }

    def dense_names(self, shared: Params) -> tuple[str, ...]:
        return tuple(n for n in shared if n not in PRODUCT_TABLES + ITEM_TABLES)

    def log_probs(self, rows: Params, dense: Params) -> torch.Tensor:
        """(B, 3) log P(small, fit, large) from gathered rows (B, ·) and batched dense weights."""
        if self.latent == "measure":
            own = torch.einsum("bf,bfk->bk", rows["measurements"], dense["measure_map"])
            user_bias, user_size = own[:, :1], own[:, 1:]
        else:
            user_bias, user_size = rows["user_bias"], rows["user_size"]
        product = rows["product_size"] + rows["size"] * dense["size_direction"]
        pair = user_size - product if self.latent == "lv" else user_size * product
        phi = torch.cat([user_bias, rows["item_bias"], pair], dim=1) if self.biases else pair
        if self.head == "lr":
            score = (phi * dense["weights"]).sum(1)
            first = dense["thresholds"][:, 0]
            second = first + F.softplus(dense["thresholds"][:, 1])
            below_small = torch.sigmoid(first - score)
            below_fit = torch.sigmoid(second - score)
            probs = torch.stack(
                [below_small, below_fit - below_small, 1.0 - below_fit], dim=1
            ).clamp_min(1e-7)
            return probs.log()
        z = torch.einsum("bd,bdm->bm", phi, dense["projection"])
        distances = (z.unsqueeze(1) - dense["prototypes"]).pow(2).sum(-1)
        return torch.log_softmax(-distances, dim=1)


FIT_MODELS = {
    model.name: model
    for model in (
        FitModel("k-lf-ml", "lf", "ml", "latent factors, metric-learning head (the paper's best)"),
        FitModel("k-lf-lr", "lf", "lr", "latent factors, ordinal regression head"),
        FitModel("k-lv-lr", "lv", "lr", "latent size differences, ordinal regression head"),
        FitModel(
            "1-lv-lr",
            "lv",
            "lr",
            "one latent size each, ordinal regression",
            fixed_dim=1,
            biases=False,
        ),
        FitModel("measure-ml", "measure", "ml", "body measurements instead of a private vector"),
    )
}


def get_fit_model(name: str) -> FitModel:
    if name not in FIT_MODELS:
        raise ConfigError(f"[fit] model must be one of {', '.join(FIT_MODELS)}; got '{name}'")
    return FIT_MODELS[name]


@dataclass(frozen=True)
class Batch:
    """Records as tensors: each one's shopper row (in the private tables or the measurement
    matrix), product, parent item, label, and the product's catalogue size (`size_feature`)."""

    user_row: torch.Tensor
    product: torch.Tensor
    item: torch.Tensor
    label: torch.Tensor
    size: torch.Tensor

    def take(self, index: torch.Tensor) -> Batch:
        return Batch(
            self.user_row[index], self.product[index], self.item[index], self.label[index],
            self.size[index],
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.label)


def gather(
    model: FitModel,
    shared: Params,
    private: Params,
    measurements: torch.Tensor | None,
    batch: Batch,
) -> Params:
    rows = {
        "product_size": shared["product_size"][batch.product],
        "item_bias": shared["item_bias"][batch.item],
        "size": batch.size.view(-1, 1),
    }
    if model.has_private:
        rows.update({name: private[name][batch.user_row] for name in USER_TABLES})
    else:
        rows["measurements"] = measurements[batch.user_row]
    return rows


def batched(dense: Params, size: int) -> Params:
    """The dense weights as a batch of `size` identical views (gradients sum over the batch)."""
    return {name: value.unsqueeze(0).expand(size, *value.shape) for name, value in dense.items()}


def record_losses(model: FitModel, rows: Params, dense: Params, label: torch.Tensor, l2: float):
    """Each record's loss: −log P(its label) + l2 · ‖its rows (vectors and biases)‖²."""
    nll = -model.log_probs(rows, dense).gather(1, label.view(-1, 1)).squeeze(1)
    penalty = sum(
        rows[name].pow(2).sum(1)
        for name in (*PRODUCT_TABLES, *ITEM_TABLES, *USER_TABLES)
        if name in rows
    )
    return nll + l2 * penalty


def probabilities(
    model: FitModel,
    shared: Params,
    private: Params,
    measurements: torch.Tensor | None,
    batch: Batch,
    chunk: int = 65536,
) -> torch.Tensor:
    """(B, 3) P(small, fit, large) for every record of `batch`."""
    dense = {name: shared[name] for name in model.dense_names(shared)}
    parts = []
    with torch.no_grad():
        for start in range(0, len(batch), chunk):
            part = batch.take(torch.arange(start, min(start + chunk, len(batch))))
            rows = gather(model, shared, private, measurements, part)
            parts.append(model.log_probs(rows, batched(dense, len(part))).exp())
    return torch.cat(parts) if parts else torch.empty(0, CLASSES)
