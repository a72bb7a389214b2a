"""What travels in a federated round, and the pipeline of stages it passes through.

    client: update → [client stages: weight, clip, normalise …] → message   (only the message leaves)
    server: messages → sum (plain or protected) → [server stages: noise, rescale …] → mean

This is the lowest layer of the federated code: the aggregation rules (`fl/aggregation.py`), the
privacy stages (`privacy/noise.py`) and the protections (`secure/`) all build on these types and on
nothing above them. Each stage is a plain function (or a small object with `__call__`), so
differential privacy, secure aggregation and encryption combine without the models or the runtime
knowing which are on.

Differential privacy: a stage that adds noise says so. Its `dp_event` (a dp-accounting `DpEvent`) is
what it *will* add, read by the round driver before the round to write the ledger ahead of any
release; when it runs it appends the event of what it *did* add to the result's `dp_events`, and the
driver refuses a round whose two differ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientMessage:
    """Everything a silo sends to the server in one round. Nothing else leaves the silo."""

    tensors: Tensors  # shared-parameter update (after the client stages)
    weight: float  # this message's weight in the sum (1 until a weighting stage sets it)
    # Training examples behind the update (for weighting and reports); under record-level DP the
    # silo's released noisy customer count instead.
    num_examples: float
    local_steps: int  # optimiser steps behind the update (for step normalisation)
    # The DP event of the noise the client added to its update (record-level DP-SGD), or None.
    dp_event: Any = None


@dataclass(frozen=True)
class Aggregate:
    """The server's running result: weighted sum of the messages' tensors and of their weights."""

    tensors: Tensors
    weight: float
    num_clients: int
    # The DP events of the noise server stages added to this sum, in order.
    dp_events: tuple[Any, ...] = ()


ClientStage = Callable[[ClientMessage], ClientMessage]
ServerStage = Callable[[Aggregate], Aggregate]
# protect → sum → unprotect: the plain sum, or a secure one (`secure/protected_sum.py`) that shows the
# server only the total.
Summation = Callable[[Sequence[ClientMessage]], Aggregate]


def sum_messages(messages: Sequence[ClientMessage]) -> Aggregate:
    if not messages:
        raise ValueError("cannot aggregate an empty round")
    names = messages[0].tensors.keys()
    for message in messages[1:]:
        if message.tensors.keys() != names:
            raise ValueError("client messages carry different parameter names")
    total = {name: torch.stack([m.tensors[name] for m in messages]).sum(0) for name in names}
    return Aggregate(
        tensors=total, weight=sum(m.weight for m in messages), num_clients=len(messages)
    )


def mean_of(aggregate: Aggregate) -> Tensors:
    if aggregate.weight <= 0:
        raise ValueError("aggregate has no weight")
    return {k: v / aggregate.weight for k, v in aggregate.tensors.items()}


def weight_by_examples(message: ClientMessage) -> ClientMessage:
    """FedAvg weighting: scale the update by its example count, so the mean is example-weighted."""
    n = float(message.num_examples)
    return replace(message, tensors={k: v * n for k, v in message.tensors.items()}, weight=n)


@dataclass(frozen=True)
class AggregationPipeline:
    client_stages: tuple[ClientStage, ...] = (weight_by_examples,)
    server_stages: tuple[ServerStage, ...] = field(default_factory=tuple)
    summation: Summation = sum_messages

    def on_client(self, message: ClientMessage) -> ClientMessage:
        """Runs inside the silo, before anything is sent."""
        for stage in self.client_stages:
            message = stage(message)
        return message

    def aggregate(self, messages: Sequence[ClientMessage]) -> Tensors:
        """Runs on the server: combine the messages into the mean update."""
        return self.finish(self.summation(messages))

    def finish(self, aggregate: Aggregate) -> Tensors:
        """The server stages and the mean, on a sum however it was made (in a deployment, a secure
        sum runs as message steps between the parties, outside `summation`)."""
        return mean_of(self.server_side(aggregate))

    def server_side(self, aggregate: Aggregate) -> Aggregate:
        for stage in self.server_stages:
            aggregate = stage(aggregate)
        return aggregate

    def stage_of(self, kind: type) -> Any:
        """The first client or server stage of this type, or None."""
        stages = (*self.client_stages, *self.server_stages)
        return next((s for s in stages if isinstance(s, kind)), None)

    def server_dp_events(self) -> tuple[Any, ...]:
        """What the server stages will add, declared before the round (see the module's docstring)."""
        return tuple(s.dp_event for s in self.server_stages if hasattr(s, "dp_event"))
