"""Aggregation as a pipeline of small stages.

    silo:   update → [client stages: clip, weight, protect …] → message   (only the message leaves)
    server: messages → sum → [server stages: unprotect, noise …] → mean → server optimiser

Each stage is a plain function (or a small object with `__call__`), so differential privacy, secure
aggregation and encryption slot in between without the models or the runtime knowing which are on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientMessage:
    """Everything a silo sends to the server in one round. Nothing else leaves the silo."""

    tensors: Tensors  # shared-parameter update (after the client stages)
    weight: float  # this message's weight in the sum (1 until a weighting stage sets it)
    num_examples: int  # training examples behind the update (for weighting and reports)


@dataclass(frozen=True)
class Aggregate:
    """The server's running result: weighted sum of the messages' tensors and of their weights."""

    tensors: Tensors
    weight: float
    num_clients: int


ClientStage = Callable[[ClientMessage], ClientMessage]
ServerStage = Callable[[Aggregate], Aggregate]


def weight_by_examples(message: ClientMessage) -> ClientMessage:
    """FedAvg weighting: scale the update by its example count, so the mean is example-weighted."""
    n = float(message.num_examples)
    return replace(message, tensors={k: v * n for k, v in message.tensors.items()}, weight=n)


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


@dataclass(frozen=True)
class AggregationPipeline:
    client_stages: tuple[ClientStage, ...] = (weight_by_examples,)
    server_stages: tuple[ServerStage, ...] = field(default_factory=tuple)

    def on_client(self, message: ClientMessage) -> ClientMessage:
        """Runs inside the silo, before anything is sent."""
        for stage in self.client_stages:
            message = stage(message)
        return message

    def aggregate(self, messages: Sequence[ClientMessage]) -> Tensors:
        """Runs on the server: combine the messages into the mean update."""
        aggregate = sum_messages(messages)
        for stage in self.server_stages:
            aggregate = stage(aggregate)
        return mean_of(aggregate)
