"""A server that does not trust every party (issue 21): garbage refused, robust aggregation rules.

Screening (`check_message`, every runtime): a message whose tensors do not have the round's names,
shapes and dtypes, that holds NaN or infinities, has a negative or non-finite weight, or (with
`[federated] max_update_norm`) an update longer than that bound, is refused with its reason; the
round goes on with the others. A deployment refuses it on arrival (`deploy/wire.py`), the simulator
before its sum (`fl/in_process.py`).

Robust rules (`[federated] robust`) replace the plain sum. Each looks at every client's own update
(its tensors divided by its weight), so **none works under secure aggregation or encryption**, which
show the server only the total; the config refuses the combination. Each returns an `Aggregate`
whose mean (`mean_of`) is its robust estimate, so the server stages and optimiser that follow are
unchanged:
- norm-bound: every update scaled to L2 norm ≤ `robust_bound`, then the weighted mean;
- median: the coordinate-wise median of the updates (Yin et al., ICML 2018);
- trimmed-mean: per coordinate, the mean after dropping the `robust_trim` share of the largest and
  of the smallest values (Yin et al.);
- krum: multi-Krum (Blanchard et al., NeurIPS 2017): with f = `byzantine` tolerated attackers, each
  update is scored by its summed squared distance to its n − f − 2 nearest others; the mean of the
  n − f best-scored updates.
The coordinate rules treat every silo alike (unweighted), as the papers do: a weight is a claim the
attacker controls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fedshop.errors import FedShopError
from fedshop.messages import (
    Aggregate,
    AggregationPipeline,
    ClientMessage,
    Summation,
    sum_messages,
)
from fedshop.models.spec import Params
from fedshop.secure.protected_sum import Layout, layout_of


class BadMessageError(FedShopError):
    """A client's message that the server refuses, with the reason."""


def check_message(message: ClientMessage, layout: Layout, max_norm: float = 0.0) -> None:
    """Raise `BadMessageError` naming what is wrong with `message` for a round of `layout`."""
    got = layout_of(message)
    if got != layout:
        raise BadMessageError(f"an update of layout {got}, not the round's {layout}")
    numbers = (message.weight, message.num_examples)
    if not all(math.isfinite(x) and x >= 0 for x in numbers) or message.local_steps < 0:
        raise BadMessageError(
            f"weight {message.weight}, examples {message.num_examples} and steps "
            f"{message.local_steps} must be finite and not negative"
        )
    for name, tensor in message.tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise BadMessageError(f"'{name}' holds NaN or infinite values")
    if max_norm > 0:
        norm = update_norm(message)
        if norm > max_norm:
            raise BadMessageError(f"an update of norm {norm:.4g}, above the bound {max_norm:g}")


def expected_layout(pipeline: AggregationPipeline, shared: Params) -> Layout:
    """The layout of every client's staged message: the client stages applied to an update of the
    shared model's shape (what they add, such as FedNova's step count, is part of it)."""
    zero = {k: torch.zeros_like(v) for k, v in shared.items()}
    return layout_of(pipeline.on_client(ClientMessage(zero, 1.0, 1.0, 1)))


def update_norm(message: ClientMessage) -> float:
    """L2 norm of the client's own update (its staged tensors divided by its weight)."""
    weight = message.weight if message.weight > 0 else 1.0
    squared = sum(float(t.double().pow(2).sum()) for t in message.tensors.values())
    return math.sqrt(squared) / weight


def screen(
    messages: dict[int, ClientMessage], layout: Layout, max_norm: float = 0.0
) -> tuple[dict[int, ClientMessage], dict[int, str]]:
    """The messages the server accepts, and the reason for each one it refuses, by client."""
    kept, refused = {}, {}
    for client, message in messages.items():
        try:
            check_message(message, layout, max_norm)
        except BadMessageError as reason:
            refused[client] = str(reason)
        else:
            kept[client] = message
    return kept, refused


def _stacked(messages: Sequence[ClientMessage]) -> tuple[list[str], torch.Tensor]:
    """Every client's own update as one row: (names, clients × coordinates)."""
    names = list(messages[0].tensors)
    rows = []
    for message in messages:
        weight = message.weight if message.weight > 0 else 1.0
        rows.append(torch.cat([message.tensors[n].reshape(-1).double() / weight for n in names]))
    return names, torch.stack(rows)


def _aggregate(
    messages: Sequence[ClientMessage], names: list[str], mean: torch.Tensor
) -> Aggregate:
    """An Aggregate whose `mean_of` is `mean` (unflattened into `names`' shapes)."""
    weight = sum(m.weight for m in messages) or float(len(messages))
    tensors, start = {}, 0
    for name in names:
        like = messages[0].tensors[name]
        size = like.numel()
        tensors[name] = (mean[start : start + size] * weight).reshape(like.shape).to(like.dtype)
        start += size
    return Aggregate(tensors=tensors, weight=weight, num_clients=len(messages))


@dataclass(frozen=True)
class NormBound:
    bound: float

    def __call__(self, messages: Sequence[ClientMessage]) -> Aggregate:
        names, updates = _stacked(messages)
        norms = updates.norm(dim=1, keepdim=True)
        scale = torch.clamp(self.bound / norms.clamp_min(1e-30), max=1.0)
        weights = torch.tensor([m.weight for m in messages], dtype=torch.float64).view(-1, 1)
        mean = (updates * scale * weights).sum(0) / weights.sum().clamp_min(1e-30)
        return _aggregate(messages, names, mean)


@dataclass(frozen=True)
class CoordinateMedian:
    def __call__(self, messages: Sequence[ClientMessage]) -> Aggregate:
        names, updates = _stacked(messages)
        # The mean of the two middle values for an even count (torch.median takes the lower one).
        return _aggregate(messages, names, updates.quantile(0.5, dim=0))


@dataclass(frozen=True)
class TrimmedMean:
    trim: float

    def __call__(self, messages: Sequence[ClientMessage]) -> Aggregate:
        names, updates = _stacked(messages)
        cut = math.floor(self.trim * len(messages))
        if 2 * cut >= len(messages):
            raise FedShopError(
                f"trimmed mean: trimming {cut} from each end of {len(messages)} updates leaves none"
            )
        ordered = updates.sort(dim=0).values
        return _aggregate(messages, names, ordered[cut : len(messages) - cut].mean(0))


@dataclass(frozen=True)
class MultiKrum:
    byzantine: int

    def __call__(self, messages: Sequence[ClientMessage]) -> Aggregate:
        names, updates = _stacked(messages)
        n, f = len(messages), self.byzantine
        if n - f - 2 < 1:
            raise FedShopError(
                f"Krum tolerates f = {f} attackers only with more than {f + 2} updates, got {n}"
            )
        distances = torch.cdist(updates, updates).pow(2)
        nearest = distances.sort(dim=1).values[:, 1 : n - f - 1]  # column 0 is the update itself
        chosen = nearest.sum(1).argsort()[: n - f]
        return _aggregate(messages, names, updates[chosen].mean(0))


def robust_summation(kind: str, trim: float, byzantine: int, bound: float) -> Summation:
    """The summation of `[federated] robust = kind` (the plain sum for "none")."""
    rules: dict[str, Callable[[], Summation]] = {
        "none": lambda: sum_messages,
        "norm-bound": lambda: NormBound(bound),
        "median": CoordinateMedian,
        "trimmed-mean": lambda: TrimmedMean(trim),
        "krum": lambda: MultiKrum(byzantine),
    }
    return rules[kind]()
