"""Aggregation rules as pipeline stages: FedAvg's example weighting and FedNova's step normalisation."""

from __future__ import annotations

from dataclasses import replace

import torch

from fedshop.choices import AGGREGATIONS
from fedshop.messages import Aggregate, AggregationPipeline, ClientMessage, weight_by_examples

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


# The aggregation rules' base pipelines, by name in fedshop/choices.py's AGGREGATIONS; privacy
# stages are added around them.
def fedavg_pipeline() -> AggregationPipeline:
    return AggregationPipeline()


def fednova_pipeline() -> AggregationPipeline:
    return AggregationPipeline(
        client_stages=(weight_by_examples, normalise_by_local_steps),
        server_stages=(rescale_by_effective_steps,),
    )


def aggregation_pipeline(kind: str) -> AggregationPipeline:
    """The base pipeline of the aggregation rule named `kind`."""
    return AGGREGATIONS.get(kind)()
