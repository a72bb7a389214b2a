"""A retail-task run (`task = "demand" | "returns" | "fraud"`): one table network trained three ways on
the same storefronts' rows, each scored on every storefront's held-out rows.

- federated:   the storefronts train together (fl/tabular_silo.py: FedAvg through the round driver,
               the aggregation stages, secure sums and the audit log of the recommenders)
- centralized: one network on every storefront's rows pooled (the reference federation aims at)
- local_only:  every storefront trains alone and predicts its own rows

The task's own scoring (classification metrics, or forecasts with baselines and an inventory policy)
turns each method's per-storefront predictions into its metrics.json block.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from fedshop.config import RunConfig
from fedshop.data.partition import slug
from fedshop.data.tabular import TabularDataset
from fedshop.eval.tabular_metrics import binary_metrics
from fedshop.experiment import Progress, _Silent
from fedshop.fl.audit import AuditTrail
from fedshop.fl.rounds import RoundRecord
from fedshop.fl.tabular_silo import (
    head_of,
    init_shared,
    predict,
    run_tabular_federated,
    shape_of,
    train_tabular,
    training_of,
)
from fedshop.models.tabular import Params
from fedshop.secure.protected_sum import ProtectionSummary, summarise_costs
from fedshop.seeding import torch_generator

Predictions = dict[str, np.ndarray]  # per storefront, its held-out rows' predictions
Weights = dict[str, Params]


@dataclass
class Trained:
    """One method's predictions on every storefront's held-out rows, and what it writes."""

    predictions: Predictions
    seconds: float
    weights: Weights


@dataclass
class RetailResult:
    config: RunConfig
    dataset: TabularDataset
    methods: dict[str, Trained]
    history: list[RoundRecord] = field(default_factory=list)
    protection: ProtectionSummary = field(default_factory=ProtectionSummary)
    audit: AuditTrail | None = None
    message_bytes: dict[str, int] = field(default_factory=dict)  # per storefront, one round's


def train_federated(config: RunConfig, dataset: TabularDataset, progress: Progress):
    progress.start("federated", config.federated.rounds)
    started = time.perf_counter()
    headline = "auc_pr" if dataset.kind == "binary" else "wape"

    def on_round(record: RoundRecord) -> None:
        value = (record.metrics or {}).get(headline)
        progress.advance("federated", f"{headline} {value:.4f}" if value is not None else "")

    run = run_tabular_federated(dataset, config, on_round)
    shared = run.server.shared
    predictions = {c.name: c.predict(shared, c.silo.test) for c in run.clients}
    seconds = time.perf_counter() - started
    costs = run.protection.costs if run.protection is not None else []
    protection = summarise_costs(config.protection.kind, costs)
    return Trained(predictions, seconds, {"federated/shared": dict(shared)}), run, protection


def train_centralized(config: RunConfig, dataset: TabularDataset, progress: Progress) -> Trained:
    """One network on the pooled rows, for as many passes as a storefront makes in the federation."""
    epochs = config.baseline_epochs
    progress.start("centralized", 1)
    started = time.perf_counter()
    shape, head = shape_of(config, dataset), head_of(config, dataset)
    params, _ = train_tabular(
        init_shared(config, shape, "centralized", "init"), head, dataset.pooled("train"), epochs,
        training_of(config), torch_generator(config.seed, "centralized", "train"),
    )  # fmt: skip
    predictions = {s.name: predict(params, head, s.test) for s in dataset.silos}
    progress.advance("centralized")
    return Trained(predictions, time.perf_counter() - started, {"centralized": params})


def train_local_only(config: RunConfig, dataset: TabularDataset, progress: Progress) -> Trained:
    epochs = config.baseline_epochs
    progress.start("local_only", dataset.n_silos)
    started = time.perf_counter()
    shape, head = shape_of(config, dataset), head_of(config, dataset)
    predictions, weights = {}, {}
    for silo in dataset.silos:
        params, _ = train_tabular(
            init_shared(config, shape, "local", silo.index, "init"), head, silo.train, epochs,
            training_of(config), torch_generator(config.seed, "local", silo.index, "train"),
        )  # fmt: skip
        predictions[silo.name] = predict(params, head, silo.test)
        weights[f"local_only/silo-{slug(silo.name)}"] = params
        progress.advance("local_only", silo.name)
    return Trained(predictions, time.perf_counter() - started, weights)


def message_bytes(shared: Params, dataset: TabularDataset) -> dict[str, int]:
    """Per storefront, the float32 bytes of one round's update sent as its touched embedding rows
    (with their indices) and the dense layers."""
    out = {}
    for silo in dataset.silos:
        total = 0
        for name, tensor in shared.items():
            if name.startswith("embedding."):
                rows = len(np.unique(silo.train.categorical[:, int(name.split(".")[1])]))
                total += rows * (tensor.shape[1] * 4 + 4)
            else:
                total += tensor.numel() * 4
        out[silo.name] = int(total)
    return out


def run_retail_experiment(
    config: RunConfig, dataset: TabularDataset, progress: Progress | None = None
) -> RetailResult:
    progress = progress or _Silent()
    result = RetailResult(config, dataset, {})
    for method in config.retail.methods:
        if method == "federated":
            trained, run, result.protection = train_federated(config, dataset, progress)
            result.history, result.audit = run.history, run.audit
            result.message_bytes = message_bytes(run.server.shared, dataset)
        elif method == "centralized":
            trained = train_centralized(config, dataset, progress)
        else:
            trained = train_local_only(config, dataset, progress)
        result.methods[method] = trained
    return result


def score_binary(dataset: TabularDataset, predictions: Predictions) -> dict:
    """Per storefront, pooled and silo-mean classification metrics of one method."""
    per_silo = {s.name: binary_metrics(predictions[s.name], s.test.target) for s in dataset.silos}
    pooled = binary_metrics(
        np.concatenate([predictions[s.name] for s in dataset.silos]),
        dataset.pooled("test").target,
    )
    summary = dict(pooled)
    for name in ("auc_pr", "auc", "recall@fpr"):
        values = [m[name] for m in per_silo.values() if not np.isnan(m[name])]
        summary[f"silo_mean_{name}"] = float(np.mean(values)) if values else float("nan")
    return {"summary": summary, "per_silo": per_silo}
