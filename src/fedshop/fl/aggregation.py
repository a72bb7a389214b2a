"""Aggregation rules as pipeline stages: FedAvg's example weighting and FedNova's step normalisation."""

from __future__ import annotations

from collections.abc import Callable
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


ROW_WEIGHT_PREFIX = "__row_weight__/"
ROW_STEPS_PREFIX = "__row_steps__/"


def row_weights_stage(tables: tuple[str, ...]) -> Callable[[ClientMessage], ClientMessage]:
    """Client stage (after the weighting and FedNova's normalisation): for each row table, a column
    of the message's weight on the rows it changed and 0 elsewhere, summed with the update (also
    under secure aggregation); under FedNova also its weighted step count on those rows.

    A row that only a few clients touch (a product only one shop sells) would otherwise move by its
    update times those clients' share of the total weight: the zeros of everyone else dilute it."""

    def stage(message: ClientMessage) -> ClientMessage:
        tensors = dict(message.tensors)
        for name in tables:
            changed = tensors[name].reshape(len(tensors[name]), -1).ne(0).any(1, keepdim=True)
            changed = changed.to(tensors[name].dtype)
            tensors[ROW_WEIGHT_PREFIX + name] = changed * message.weight
            if STEPS_KEY in tensors:
                tensors[ROW_STEPS_PREFIX + name] = changed * tensors[STEPS_KEY].to(changed.dtype)
        return replace(message, tensors=tensors)

    return stage


def row_weighted_mean(aggregate: Aggregate) -> Aggregate:
    """Server stage (first): each row of a row table becomes the weighted mean over the clients
    that changed it (scaled so that `mean_of`'s division by the total weight gives it). Under
    FedNova each row is also rescaled by its own clients' mean step count rather than everyone's
    (`rescale_by_effective_steps` follows with the global one, so it is divided out here): a row
    only a 4-step shop trains must not move as if 40 steps had been taken on it."""
    tensors = dict(aggregate.tensors)
    for key in [k for k in tensors if k.startswith(ROW_WEIGHT_PREFIX)]:
        name = key[len(ROW_WEIGHT_PREFIX) :]
        weights = tensors.pop(key)
        touched = weights > 0
        scale = aggregate.weight / weights.clamp_min(1e-12)
        steps = tensors.pop(ROW_STEPS_PREFIX + name, None)
        if steps is not None:
            global_steps = float(tensors[STEPS_KEY]) / aggregate.weight
            scale = scale * (steps / weights.clamp_min(1e-12)) / global_steps
        tensors[name] = tensors[name] * torch.where(touched, scale, torch.zeros_like(scale))
    return replace(aggregate, tensors=tensors)


def with_row_means(pipeline: AggregationPipeline, tables: tuple[str, ...]) -> AggregationPipeline:
    """`pipeline` with the row tables averaged over the clients that changed each row."""
    return replace(
        pipeline,
        client_stages=(*pipeline.client_stages, row_weights_stage(tables)),
        server_stages=(row_weighted_mean, *pipeline.server_stages),
    )
