"""Training a fit model on one party's records: plain minibatch AdamW, and record-level DP-SGD.

Plain: `epochs` passes over the records in a seeded order, minibatches of `batch_size`, AdamW on
every parameter that is trained (a fresh optimiser per call, so a round starts from the global model
alone).

DP-SGD (record-level DP inside a silo, as `fl/dp_local.py` for the recommenders): the protected unit
is one customer with all her rentals. Each step samples customers with probability q (Poisson, from
a secret stream), computes every record's gradient of the shared parameters in one backward pass
(gathered rows and batched head weights are per-record leaves), sums them per customer, clips each
customer's update to L2 norm C (`privacy.noise.clip_per_client`), adds N(0, (zC)²) to every coordinate
of every shared table and divides by q·n. An Adam step on that noisy mean moves the silo's copy of the
shared model. Sampled customers' own vectors take a plain SGD step on their own loss; they are never
released.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fedshop.messages import Aggregate, AggregationPipeline, mean_of
from fedshop.models.fit import (
    INPUTS,
    USER_TABLES,
    Batch,
    FitModel,
    Params,
    batched,
    gather,
    record_losses,
)
from fedshop.models.train import proximal_term

if TYPE_CHECKING:
    import dp_accounting as dpa

    from fedshop.fl.dp_local import DpSgd, DpSgdState


@dataclass(frozen=True)
class FitTraining:
    learning_rate: float = 0.01
    l2: float = 1e-3
    # Decoupled (AdamW) decay. Most shoppers rent once: without decay the model memorises them
    # (held-out AUC 0.727 → 0.641 in six epochs, random split). The shared weights decay per
    # step; each shopper's own vector by e^(−private_decay) per pass over her party's data,
    # whatever the party's size: per step, a shop's customers would decay far less each round
    # than the pooled model's each epoch, and federated AUC then fell after round 2 (validation,
    # seed 42, before the catalogue-size term: 0.684 → 0.652 by round 12; with this decay it rose
    # to 0.706, pooled 0.719).
    weight_decay: float = 1.0
    private_decay: float = 3.0
    batch_size: int = 1024
    user_learning_rate: float = 0.5  # DP-SGD: plain SGD on a sampled customer's own vector


@dataclass
class Trained:
    shared: Params
    private: Params
    steps: int


def train_fit(
    model: FitModel,
    shared: Params,
    private: Params,
    measurements: torch.Tensor | None,
    batch: Batch,
    epochs: int,
    training: FitTraining,
    generator: torch.Generator,
    update_shared: bool = True,
    proximal_mu: float = 0.0,
) -> Trained:
    """`epochs` passes of minibatch AdamW over `batch`; returns new tables (inputs untouched).
    `update_shared=False` refits the private vectors alone. `proximal_mu` > 0 adds FedProx's
    μ/2·‖w − w_shared‖² on the shared tables (anchored at `shared` as given) to every step's loss."""
    anchor = {k: v.detach() for k, v in shared.items()} if update_shared and proximal_mu else None
    shared = {k: v.detach().clone().requires_grad_(update_shared) for k, v in shared.items()}
    private = {k: v.detach().clone().requires_grad_(True) for k, v in private.items()}
    dense_names = model.dense_names(shared)
    params = {**shared, **private}
    steps, steps_per_epoch = 0, -(-len(batch) // training.batch_size)
    if not any(v.requires_grad for v in params.values()) or len(batch) == 0 or epochs <= 0:
        return Trained(_detached(shared), _detached(private), 0)
    # AdamW multiplies by 1 − lr·wd per step; the ordinal thresholds never shrink (at 0 they
    # would merge the classes).
    own_decay = -math.expm1(-training.private_decay / steps_per_epoch) / training.learning_rate
    decay = {"shared": training.weight_decay, "own": own_decay, "thresholds": 0.0}
    groups: dict[str, list[torch.Tensor]] = {kind: [] for kind in decay}
    for name, value in params.items():
        if value.requires_grad:
            kind = "thresholds" if name == "thresholds" else "own" if name in private else "shared"
            groups[kind].append(value)
    optimizer = torch.optim.AdamW(
        [{"params": values, "weight_decay": decay[k]} for k, values in groups.items() if values],
        lr=training.learning_rate,
    )
    for _ in range(epochs):
        order = torch.randperm(len(batch), generator=generator)
        for start in range(0, len(batch), training.batch_size):
            part = batch.take(order[start : start + training.batch_size])
            rows = gather(model, shared, private, measurements, part)
            dense = batched({n: shared[n] for n in dense_names}, len(part))
            loss = record_losses(model, rows, dense, part.label, training.l2).mean()
            if anchor is not None:
                loss = loss + proximal_term(shared, anchor, proximal_mu)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
    return Trained(_detached(shared), _detached(private), steps)


def _detached(params: Params) -> Params:
    return {k: v.detach() for k, v in params.items()}


def per_customer_updates(
    model: FitModel,
    shared: Params,
    private: Params,
    measurements: torch.Tensor | None,
    batch: Batch,
    customer: torch.Tensor,
    customers: int,
    l2: float,
    clip: float,
) -> tuple[Params, Params]:
    """Sum over customers of each one's clipped update (−gradient of her records' summed loss) of the
    shared parameters, as full-size tensors; and the gradient of the private rows. `customer[r]` is
    record r's position among the `customers` sampled customers."""
    dense_names = model.dense_names(shared)
    rows = {
        k: v.detach().requires_grad_(k not in INPUTS)
        for k, v in gather(model, shared, private, measurements, batch).items()
    }
    dense = {
        n: shared[n].detach().unsqueeze(0).repeat(len(batch), *([1] * shared[n].dim()))
        for n in dense_names
    }
    for value in dense.values():
        value.requires_grad_(True)
    losses = record_losses(model, rows, dense, batch.label, l2)
    names = [n for n in rows if n not in INPUTS] + list(dense_names)
    trained = [rows[n] for n in rows if n not in INPUTS] + list(dense.values())
    # Unused is allowed: 1-LV reads no item bias.
    found = torch.autograd.grad(losses.sum(), trained, allow_unused=True)
    grads = {
        n: g if g is not None else torch.zeros_like(t)
        for n, g, t in zip(names, found, trained, strict=True)
    }
    # Rows: one per (customer, row) pair, so a customer who rented a product twice is one row.
    row_deltas, row_owner, row_index = {}, {}, {}
    for name, index in (("product_size", batch.product), ("item_bias", batch.item)):
        key = customer * (int(index.max()) + 1 if len(index) else 1) + index
        unique, inverse = torch.unique(key, return_inverse=True)
        summed = torch.zeros(len(unique), grads[name].shape[1]).index_add_(0, inverse, grads[name])
        row_deltas[name] = -summed
        owner = torch.zeros(len(unique), dtype=torch.long)
        owner[inverse] = customer
        index_of = torch.zeros(len(unique), dtype=torch.long)
        index_of[inverse] = index
        row_owner[name], row_index[name] = owner, index_of
    dense_deltas = {
        n: -torch.zeros(customers, *shared[n].shape).index_add_(0, customer, grads[n])
        for n in dense_names
    }
    # One customer owns rows in two tables: clip over both at once.
    owners = torch.cat([row_owner[n] for n in row_deltas])
    widths = {n: row_deltas[n].shape[1] for n in row_deltas}
    width = max(widths.values())
    stacked = torch.cat([_pad_columns(row_deltas[n], width) for n in row_deltas])
    from fedshop.privacy.noise import clip_per_client

    clip_per_client({"rows": stacked}, owners, dense_deltas, customers, clip)
    totals: Params = {}
    start = 0
    for name in row_deltas:
        part = stacked[start : start + len(row_deltas[name]), : widths[name]]
        start += len(row_deltas[name])
        totals[name] = torch.zeros_like(shared[name]).index_add_(0, row_index[name], part)
    for name in dense_names:
        totals[name] = dense_deltas[name].sum(0)
    private_grads = {n: grads[n] for n in USER_TABLES if n in grads}
    return totals, private_grads


def _pad_columns(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zero columns on the right up to `width` (zeros change no norm)."""
    if tensor.shape[1] == width:
        return tensor
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]))


def dp_sgd_fit(
    model: FitModel,
    shared: Params,
    private: Params,
    measurements: torch.Tensor | None,
    batch: Batch,
    dp: DpSgd,
    training: FitTraining,
    state: DpSgdState,
) -> tuple[Params, dpa.DpEvent]:
    """`dp.steps` DP-SGD steps from `shared` over the silo's customers (rows of the private tables,
    or of `measurements`); returns the new shared parameters and the DP event of the noise drawn.
    Updates `private` in place."""
    from fedshop.fl.local_round import poisson_sample
    from fedshop.privacy.accounting import together
    from fedshop.privacy.noise import GaussianNoise, fixed_denominator

    n_customers = len(next(iter(private.values()))) if private else int(batch.user_row.max()) + 1
    customers = torch.arange(n_customers)
    noise = GaussianNoise(dp.noise_multiplier, dp.clip, state.noise, dp.sampling_rate)
    step = AggregationPipeline(
        client_stages=(), server_stages=(noise, fixed_denominator(dp.sampling_rate * n_customers))
    )
    # Each customer's records, found by sorting once.
    order = torch.argsort(batch.user_row, stable=True)
    starts = torch.searchsorted(batch.user_row[order], customers)
    ends = torch.searchsorted(batch.user_row[order], customers, right=True)
    drawn = []
    for _ in range(dp.steps):
        sampled = poisson_sample(customers, dp.sampling_rate, state.sampling)
        sizes = ends[sampled] - starts[sampled]
        records = order[
            torch.repeat_interleave(starts[sampled] - torch.cumsum(sizes, 0) + sizes, sizes)
            + torch.arange(int(sizes.sum()))
        ]
        part = batch.take(records)
        position = torch.repeat_interleave(torch.arange(len(sampled)), sizes)
        if len(part):
            totals, private_grads = per_customer_updates(
                model, shared, private, measurements, part, position, len(sampled),
                training.l2, dp.clip,
            )  # fmt: skip
            with torch.no_grad():
                for name, grad in private_grads.items():
                    private[name].index_add_(0, part.user_row, -training.user_learning_rate * grad)
        else:
            totals = {k: torch.zeros_like(v) for k, v in shared.items()}
        total = step.server_side(Aggregate(totals, float(len(sampled)), len(sampled)))
        drawn += total.dp_events
        shared = state.optimizer.step(shared, mean_of(total))
    return shared, together(drawn)
