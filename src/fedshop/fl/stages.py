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

from fedshop.choices import AGGREGATIONS

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


# Carried as a tensor so that it is summed like the update itself, also under secure aggregation.
STEPS_KEY = "__weighted_local_steps__"


def normalise_by_local_steps(message: ClientMessage) -> ClientMessage:
    """FedNova (Wang et al., NeurIPS 2020), client half: divide the update by its local step count.

    With plain FedAvg a silo that takes ten times more local steps moves the model about ten times
    further, on top of its larger weight, so large silos dominate beyond their share of the data. Runs
    after the weighting stage: the step count is weighted like the update, so the server can form the
    weighted mean step count.
    """
    steps = max(message.local_steps, 1)
    tensors = {k: v / steps for k, v in message.tensors.items()}
    tensors[STEPS_KEY] = torch.tensor([message.weight * steps], dtype=torch.float64)
    return replace(message, tensors=tensors)


def rescale_by_effective_steps(aggregate: Aggregate) -> Aggregate:
    """FedNova, server half: scale the step-normalised sum by the weighted mean step count."""
    tensors = dict(aggregate.tensors)
    effective_steps = float(tensors.pop(STEPS_KEY)) / aggregate.weight
    return replace(aggregate, tensors={k: v * effective_steps for k, v in tensors.items()})


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


# protect → sum → unprotect: the plain sum, or a secure one (`secure/stage.py`) that shows the
# server only the total.
Summation = Callable[[Sequence[ClientMessage]], Aggregate]


@dataclass(frozen=True)
class AggregationPipeline:
    client_stages: tuple[ClientStage, ...] = (weight_by_examples,)
    server_stages: tuple[ServerStage, ...] = field(default_factory=tuple)
    summation: Summation = sum_messages

    @staticmethod
    def for_aggregation(kind: str) -> AggregationPipeline:
        """The base pipeline of an aggregation rule; privacy stages are added around it."""
        return AGGREGATIONS.get(kind)()  # fedavg_pipeline or fednova_pipeline

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
        for stage in self.server_stages:
            aggregate = stage(aggregate)
        return mean_of(aggregate)


# The aggregation rules' base pipelines, by name in fedshop/choices.py's AGGREGATIONS.
def fedavg_pipeline() -> AggregationPipeline:
    return AggregationPipeline()


def fednova_pipeline() -> AggregationPipeline:
    return AggregationPipeline(
        client_stages=(weight_by_examples, normalise_by_local_steps),
        server_stages=(rescale_by_effective_steps,),
    )
