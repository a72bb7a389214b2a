"""The protect → sum → unprotect part of the aggregation pipeline.

Each client's staged message (its clipped, weighted update) is flattened into one vector, summed by a
`SecureSum` so that the server sees only the total, and unflattened into the usual `Aggregate`; the
server stages (noise, FedNova rescaling) and the server optimiser run on that total unchanged.

Weights: a message's weight (its example count, or under record-level DP its released noisy count)
is public metadata, as it is without protection. Each vector is divided by the round's total weight
before it is protected, so that every entry is of the size of one update, not of one update times a
silo's example count, and fits the protection's range. The weights also travel inside the protected
vector, so the mean is weighted by exactly the clients whose vectors reached the sum, also when some
drop out after the total was announced.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedshop.choices import PROTECTIONS
from fedshop.config import ProtectionConfig
from fedshop.messages import Aggregate, ClientMessage
from fedshop.secure.protocol import ProtectionCost, ProtectionError, SecureSum

WEIGHT_ENTRY = "__weight__"


# A message's tensors as (name, shape, dtype) in the message's own order: all a server needs to
# turn a summed vector back into tensors, and the same for every message of a round.
Layout = list[tuple[str, tuple[int, ...], str]]


def layout_of(message: ClientMessage) -> Layout:
    return [
        (n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in message.tensors.items()
    ]


def vector_length(layout: Layout) -> int:
    """The flattened size: every tensor entry, and the weight."""
    return sum(math.prod(shape) for _, shape, _ in layout) + 1


def flatten(message: ClientMessage, normaliser: float) -> np.ndarray:
    """The message's tensors (in name order) and its weight as one vector, divided by the
    round's `normaliser` (see the module's docstring)."""
    names = sorted(message.tensors)
    parts = [message.tensors[n].detach().cpu().double().reshape(-1).numpy() for n in names]
    parts.append(np.array([message.weight], dtype=np.float64))
    return np.concatenate(parts) / normaliser


def unflatten(
    total: np.ndarray, layout: Layout, normaliser: float
) -> tuple[dict[str, torch.Tensor], float]:
    """The summed vector back as tensors (in the layout's order) and the summed weight."""
    tensors, offset = {}, 0
    total = total * normaliser
    for name, shape, dtype in sorted(layout):
        size = math.prod(shape)
        chunk = torch.from_numpy(total[offset : offset + size].copy())
        tensors[name] = chunk.reshape(shape).to(getattr(torch, dtype))
        offset += size
    # In the message's own order: server stages that draw noise per tensor follow dict order.
    return {name: tensors[name] for name, _, _ in layout}, float(total[offset])


def check_layouts(layouts: Sequence[Layout]) -> Layout:
    """The round's layout; every message must carry the same tensors."""
    names = sorted(layouts[0])
    for layout in layouts[1:]:
        if sorted(layout) != names:
            raise ProtectionError("client messages carry different parameter names or shapes")
    return layouts[0]


@dataclass
class ProtectedSum:
    """Sum messages through a `SecureSum`; keeps each round's measured cost."""

    protection: SecureSum
    bound: float
    costs: list[ProtectionCost] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.protection.kind

    def __call__(self, messages: Sequence[ClientMessage]) -> Aggregate:
        if not messages:
            raise ValueError("cannot aggregate an empty round")
        layout = check_layouts([layout_of(m) for m in messages])
        normaliser = round_normaliser([m.weight for m in messages])
        vectors = [flatten(m, normaliser) for m in messages]
        result = self.protection.sum(vectors, self.bound)
        self.costs.append(result.cost)
        tensors, weight = unflatten(result.total, layout, normaliser)
        return Aggregate(tensors=tensors, weight=weight, num_clients=len(result.contributors))


def round_cost(cost: ProtectionCost) -> dict:
    """One round's protection cost, as the round's history entry records it."""
    return {
        "seconds": cost.total_seconds,
        "latency_seconds": cost.latency_seconds,
        "bytes_per_client": cost.mean_bytes_per_client,
    }


def round_normaliser(weights: Sequence[float]) -> float:
    """What every vector of a round is divided by: the round's total weight."""
    normaliser = float(sum(weights))
    if not normaliser > 0:
        raise ProtectionError("the round's messages carry no weight")
    return normaliser


def make_protection(config: ProtectionConfig) -> SecureSum | None:
    """The configured protection, or None for plain sums."""
    if config.kind == "none":
        return None
    return PROTECTIONS.get(config.kind).from_config(config)  # imports only the chosen one


@dataclass(frozen=True)
class ProtectionSummary:
    """The `protection` block of metrics.json: a run's protection and its mean cost per round."""

    kind: str = "none"
    # What the one-process simulator spent on the protocol (all parties' work added up).
    seconds_per_round: float | None = None
    # What a deployment would wait for: the slowest client plus the server.
    latency_seconds_per_round: float | None = None
    bytes_per_client_per_round: float | None = None
    plaintext_bytes_per_client: int | None = None
    rounds: int = 0
    details: dict = field(default_factory=dict)


def summarise_costs(kind: str, costs: Sequence[ProtectionCost]) -> ProtectionSummary:
    """Means over the run's protected rounds."""
    if kind == "none" or not costs:
        return ProtectionSummary(kind)
    return ProtectionSummary(
        kind=kind,
        seconds_per_round=float(np.mean([c.total_seconds for c in costs])),
        latency_seconds_per_round=float(np.mean([c.latency_seconds for c in costs])),
        bytes_per_client_per_round=float(np.mean([c.mean_bytes_per_client for c in costs])),
        plaintext_bytes_per_client=costs[-1].details.get("plaintext_bytes_per_client"),
        rounds=len(costs),
        details={
            k: v
            for k, v in costs[-1].details.items()
            if not isinstance(v, list) and k != "plaintext_bytes_per_client"
        },
    )
