"""Clipping and noise: the differential-privacy stages (DP-FedAvg, McMahan et al., ICLR 2018; the same
stages make each step of a silo's DP-SGD).

    client: update → ClipUpdate (L2 norm ≤ C, weight 1)             — one unit changes the sum by ≤ C
    server: sum → GaussianNoise (std z·C) → fixed_denominator       — the mean does not reveal who came

Weights must be 1 under DP: an example-weighted sum lets a client with many examples move it by more
than C. The denominator is the *expected* number of units (q·N under Poisson sampling), not the number
that showed up, which would itself leak whether someone took part.

`GaussianNoise` accounts for itself: its `dp_event` is what it will add (the round driver writes it to
the ledger first), and every sum it noises carries the event of exactly the noise drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import dp_accounting as dpa
import torch

from fedshop.messages import Aggregate, ClientMessage, ServerStage, Tensors
from fedshop.privacy.accounting import gaussian_step
from fedshop.seeding import RandomSource, standard_normal


def global_norm(tensors: Tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


@dataclass(frozen=True)
class ClipUpdate:
    """Client stage: scale the whole update (all tensors together) to L2 norm at most `clip`."""

    clip: float

    def __post_init__(self) -> None:
        if self.clip <= 0:
            raise ValueError("clip must be positive")

    def __call__(self, message: ClientMessage) -> ClientMessage:
        norm = global_norm(message.tensors)
        scale = min(1.0, self.clip / norm) if norm > 0 else 1.0
        return replace(
            message, tensors={k: v * scale for k, v in message.tensors.items()}, weight=1.0
        )


@dataclass
class GaussianNoise:
    """Server stage: add N(0, (z·C)²) independently to every coordinate of a sum of C-clipped
    updates whose units took part with probability `sampling_rate` — every row of every table,
    touched or not, or the noise would reveal which rows were touched.

    Drawn on the CPU from `generator` (the same numbers on any device), added where the sum is. In a
    run it is a secret `NoiseStream` (`seeding.py`): noise that someone can predict protects nothing."""

    noise_multiplier: float
    clip: float
    generator: RandomSource
    sampling_rate: float = 1.0

    @property
    def dp_event(self) -> dpa.DpEvent:
        """The release one call makes: a Gaussian step, Poisson-subsampled at `sampling_rate`."""
        return gaussian_step(self.noise_multiplier, self.sampling_rate)

    def __call__(self, aggregate: Aggregate) -> Aggregate:
        std = self.noise_multiplier * self.clip
        noisy = {}
        for name, value in aggregate.tensors.items():
            noise = standard_normal(value.shape, value.dtype, self.generator)
            noisy[name] = value + (std * noise).to(value.device)
        # The event of what was just drawn, read off the numbers that scaled this noise.
        drawn = gaussian_step(self.noise_multiplier, self.sampling_rate)
        return replace(aggregate, tensors=noisy, dp_events=(*aggregate.dp_events, drawn))


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
    """`ClipUpdate` for the vectorised round, in place: client c owns the item rows with
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
