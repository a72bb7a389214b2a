"""The protect → sum → unprotect part of the aggregation pipeline.

Each client's staged message (its clipped, weighted update) is flattened into one vector, summed by a
`SecureSum` so that the server sees only the total, and unflattened into the usual `Aggregate`; the
server stages (noise, FedNova rescaling) and the server optimiser run on that total unchanged.

Weights: a message's weight (its example count, or under record-level DP its released noisy count)
is public metadata, as it is without protection. Each vector is divided by the round's total
weight before it is protected, so that every entry is of the size of one update, not of one update
times a silo's example count, and fits the protection's range; the weights themselves travel inside
the protected vector, so the server learns only their sum (which the mean needs anyway).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedshop.config import ProtectionConfig
from fedshop.fl.stages import Aggregate, ClientMessage
from fedshop.secure.protocol import ProtectionCost, ProtectionError, SecureSum

WEIGHT_ENTRY = "__weight__"


def flatten(message: ClientMessage, names: Sequence[str], normaliser: float) -> np.ndarray:
    parts = [message.tensors[n].detach().cpu().double().reshape(-1).numpy() for n in names]
    parts.append(np.array([message.weight], dtype=np.float64))
    return np.concatenate(parts) / normaliser


def unflatten(total: np.ndarray, like: ClientMessage, names: Sequence[str], normaliser: float):
    tensors, offset = {}, 0
    total = total * normaliser
    for name in names:
        template = like.tensors[name]
        size = template.numel()
        chunk = torch.from_numpy(total[offset : offset + size].copy())
        tensors[name] = chunk.reshape(template.shape).to(template.dtype)
        offset += size
    # In the message's own order: server stages that draw noise per tensor follow dict order.
    return {name: tensors[name] for name in like.tensors}, float(total[offset])


@dataclass
class ProtectedSum:
    """Sum messages through a `SecureSum`; keeps each round's measured cost."""

    protection: SecureSum
    bound: float
    costs: list[ProtectionCost] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.protection.kind

    def last_round(self) -> dict:
        """The latest round's cost, as each round of the history records it."""
        last = self.costs[-1]
        return {
            "seconds": last.total_seconds,
            "latency_seconds": last.latency_seconds,
            "bytes_per_client": last.mean_bytes_per_client,
        }

    def __call__(self, messages: Sequence[ClientMessage]) -> Aggregate:
        if not messages:
            raise ValueError("cannot aggregate an empty round")
        names = sorted(messages[0].tensors)
        for message in messages[1:]:
            if sorted(message.tensors) != names:
                raise ProtectionError("client messages carry different parameter names")
        normaliser = sum(m.weight for m in messages)
        if not normaliser > 0:
            raise ProtectionError("the round's messages carry no weight")
        vectors = [flatten(m, names, normaliser) for m in messages]
        result = self.protection.sum(vectors, self.bound)
        self.costs.append(result.cost)
        tensors, weight = unflatten(result.total, messages[0], names, normaliser)
        return Aggregate(tensors=tensors, weight=weight, num_clients=len(result.contributors))


def make_protection(config: ProtectionConfig) -> SecureSum | None:
    """The configured protection, or None for plain sums."""
    if config.kind == "none":
        return None
    if config.kind == "secagg":
        from fedshop.secure.secagg import SecAggSum

        return SecAggSum(
            neighbours=config.neighbours or None,
            threshold=config.threshold or None,
            ring_bits=config.ring_bits,
        )
    if config.kind == "ckks":
        from fedshop.secure.ckks import CkksSum

        return CkksSum()
    if config.kind == "paillier":
        from fedshop.secure.paillier import PaillierSum

        return PaillierSum(key_bits=config.paillier_key_bits)
    raise ProtectionError(f"unknown protection '{config.kind}'")


def summarise_costs(kind: str, costs: Sequence[ProtectionCost]) -> dict:
    """The `protection` block of metrics.json: means over the run's rounds."""
    if kind == "none" or not costs:
        return {"kind": kind, "seconds_per_round": None, "bytes_per_client_per_round": None}
    return {
        "kind": kind,
        # What the one-process simulator spent on the protocol (all parties' work added up).
        "seconds_per_round": float(np.mean([c.total_seconds for c in costs])),
        # What a deployment would wait for: the slowest client plus the server.
        "latency_seconds_per_round": float(np.mean([c.latency_seconds for c in costs])),
        "bytes_per_client_per_round": float(np.mean([c.mean_bytes_per_client for c in costs])),
        "plaintext_bytes_per_client": costs[-1].details.get("plaintext_bytes_per_client"),
        "rounds": len(costs),
        "details": {
            k: v
            for k, v in costs[-1].details.items()
            if not isinstance(v, list) and k != "plaintext_bytes_per_client"
        },
    }
