"""Differential-privacy stages of the aggregation pipeline (DP-FedAvg, McMahan et al., ICLR 2018).

    client: update → clip_update (L2 norm ≤ C, weight 1)            — one client changes the sum by ≤ C
    server: sum → add_gaussian_noise (std z·C) → fixed_denominator  — the mean does not reveal who came

Weights must be 1 under DP: an example-weighted sum lets a client with many examples move it by more
than C. The denominator is the *expected* number of clients (q·N under Poisson sampling), not the
number that showed up, which would itself leak whether someone took part.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from fedshop.fl.stages import Aggregate, ClientMessage, ClientStage, ServerStage, Tensors


def global_norm(tensors: Tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def clip_update(clip: float) -> ClientStage:
    """Client stage: scale the whole update (all tensors together) to L2 norm at most `clip`."""
    if clip <= 0:
        raise ValueError("clip must be positive")

    def stage(message: ClientMessage) -> ClientMessage:
        norm = global_norm(message.tensors)
        scale = min(1.0, clip / norm) if norm > 0 else 1.0
        return replace(
            message, tensors={k: v * scale for k, v in message.tensors.items()}, weight=1.0
        )

    return stage


def add_gaussian_noise(std: float, generator: torch.Generator) -> ServerStage:
    """Server stage: add N(0, std²) independently to every coordinate of the summed update —
    every row of every table, touched or not, or the noise would reveal which rows were touched."""

    def stage(aggregate: Aggregate) -> Aggregate:
        noisy = {
            k: v + std * torch.randn(v.shape, generator=generator, dtype=v.dtype)
            for k, v in aggregate.tensors.items()
        }
        return replace(aggregate, tensors=noisy)

    return stage


def fixed_denominator(expected_clients: float) -> ServerStage:
    """Server stage: divide by the expected number of clients rather than the realised one."""
    if expected_clients <= 0:
        raise ValueError("expected_clients must be positive")

    def stage(aggregate: Aggregate) -> Aggregate:
        return replace(aggregate, weight=float(expected_clients))

    return stage


def clip_per_client(
    item_deltas: Tensors, row_owner: torch.Tensor, dense_deltas: Tensors, clients: int, clip: float
) -> torch.Tensor:
    """`clip_update` for the vectorised round, in place: client c owns the item rows with
    `row_owner == c` and row c of each dense delta. Returns the clients' norms before clipping."""
    squared = torch.zeros(clients, dtype=torch.float64, device=row_owner.device)
    for delta in item_deltas.values():
        rows = delta.double().pow(2).reshape(len(delta), -1).sum(1)
        squared.index_add_(0, row_owner, rows)
    for delta in dense_deltas.values():
        squared += delta.double().pow(2).reshape(clients, -1).sum(1)
    norms = squared.sqrt()
    scale = torch.where(norms > clip, clip / norms.clamp_min(1e-30), torch.ones_like(norms))
    for delta in item_deltas.values():
        delta *= scale[row_owner].to(delta.dtype).view(-1, *([1] * (delta.dim() - 1)))
    for delta in dense_deltas.values():
        delta *= scale.to(delta.dtype).view(-1, *([1] * (delta.dim() - 1)))
    return norms
