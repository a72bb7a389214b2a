"""A fit-prediction run (`task = "fit"`): the federated model and its baselines on one split.

- federated:            the shops train the [fit] model together (fl/fit_silo.py); each keeps its
                        customers' true sizes, so a shopper of three shops has three private copies
- centralized:          one model on all shops' records pooled, one size per shopper (the reference)
- centralized_unlinked: pooled too, but a shopper of three shops is three shoppers: what giving up
                        cross-shop linkage costs on its own, apart from federation
- local_only:           every shop trains alone and scores its own customers
- majority:             every shop predicts its own training label frequencies (AUC 0.5: the floor)
- 1-lv-lr:              the paper's simplest model, one latent size each, centralized
- measurements:         body measurements in place of a learned size vector (measure-ml), centralized
All are scored per shop on the same held-out records with the same counts (eval/fit_metrics.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from fedshop.config import RunConfig
from fedshop.data.fit_feedback import FitDataset, FitRecords
from fedshop.data.partition import slug
from fedshop.eval.fit_metrics import FitCounts, summarise_fit
from fedshop.experiment import MethodResult, Progress, _Silent, record_level_plan
from fedshop.fl.audit import AuditTrail
from fedshop.fl.fit_local import train_fit
from fedshop.fl.fit_silo import fit_training, init_fit_shared, records_batch, run_fit_federated
from fedshop.fl.rounds import RoundRecord
from fedshop.models.fit import get_fit_model, probabilities
from fedshop.privacy.dp import PrivacyGuard, PrivacySummary
from fedshop.secure.protected_sum import ProtectionSummary, summarise_costs
from fedshop.seeding import torch_generator

Weights = dict[str, dict[str, torch.Tensor]]


@dataclass
class FitResult:
    config: RunConfig
    dataset: FitDataset
    methods: dict[str, MethodResult]
    history: list[RoundRecord]
    weights: Weights
    privacy: PrivacySummary = field(default_factory=PrivacySummary)
    protection: ProtectionSummary = field(default_factory=ProtectionSummary)
    # Bytes of one shop's message per round: the dense tensors, and only the rows it touched.
    message_bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    # The federated run's audit log, closed and written as audit.jsonl by the run folder's writer.
    audit: AuditTrail | None = None


def fit_method_result(per_silo: dict[str, FitCounts], seconds: float, curve=None) -> MethodResult:
    return MethodResult(
        summary=summarise_fit(per_silo),
        per_silo={name: counts.means() for name, counts in per_silo.items()},
        seconds=seconds,
        curve=curve or [],
    )


def _scored(dataset: FitDataset, split: str, predict: Callable) -> dict[str, FitCounts]:
    """Per shop, counts of `predict(silo, records)` on its held-out records."""
    out = {}
    for silo in dataset.silos:
        records = silo.heldout(split)
        out[silo.name] = FitCounts.of(predict(silo, records), records.label)
    return out


def run_federated(
    config: RunConfig, dataset: FitDataset, progress: Progress, guard: PrivacyGuard | None
) -> tuple[MethodResult, Weights, list[RoundRecord], ProtectionSummary, dict, AuditTrail | None]:
    progress.start("federated", config.federated.rounds)
    started = time.perf_counter()

    def on_round(record: RoundRecord) -> None:
        note = f"AUC {record.metrics['auc_macro']:.3f}" if record.metrics else ""
        if record.epsilon is not None:
            note += f"  ε {record.epsilon:.2f}"
        progress.advance("federated", note)

    run = run_fit_federated(dataset, config, on_round=on_round, guard=guard)
    result = fit_method_result(run.final, time.perf_counter() - started)
    weights: Weights = {"federated/shared": dict(run.server.shared)}
    for client in run.clients:
        # Written by each shop into its own part of the run folder; the server never had these.
        weights[f"federated/silo-{slug(client.name)}"] = {
            **client.private_state(),
            "users": torch.from_numpy(client.silo.users),
        }
    costs = run.protection.costs if run.protection is not None else []
    protection = summarise_costs(config.protection.kind, costs)
    sizes = message_bytes(run.server.shared, dataset)
    return result, weights, run.history, protection, sizes, run.audit


def message_bytes(shared: dict[str, torch.Tensor], dataset: FitDataset) -> dict[str, dict]:
    """Per shop, the float32 bytes of one round's update: all of it (what a dense or secure sum
    sends), and only the product and item rows its training records touch plus their indices."""
    out = {}
    dense = sum(v.numel() * 4 for v in shared.values())
    for silo in dataset.silos:
        products = np.unique(silo.train.product)
        items = np.unique(dataset.product_item[products])
        row_tables = {"product_size": len(products), "item_bias": len(items)}
        sparse = sum(
            rows * (shared[name].shape[1] * 4 + 4) for name, rows in row_tables.items()
        ) + sum(v.numel() * 4 for name, v in shared.items() if name not in row_tables)
        out[silo.name] = {"dense": int(dense), "touched_rows": int(sparse)}
    return out


def train_pooled(
    config: RunConfig,
    dataset: FitDataset,
    progress: Progress,
    task: str,
    model_name: str | None = None,
    unlinked: bool = False,
) -> tuple[MethodResult, Weights]:
    """One model on all shops' records. With `unlinked`, shopper rows are (shop, shopper) pairs."""
    epochs = config.baseline_epochs
    progress.start(task, epochs)
    started = time.perf_counter()
    config_fit = replace(config.fit, model=model_name or config.fit.model)
    model = get_fit_model(config_fit.model)
    run_config = replace(config, fit=config_fit)
    offsets = np.cumsum([0] + [s.n_users for s in dataset.silos])

    def rows_of(silo_index: int, records: FitRecords) -> np.ndarray:
        if not unlinked:
            return records.user
        return offsets[silo_index] + dataset.silos[silo_index].local(records)

    n_rows = int(offsets[-1]) if unlinked else dataset.n_users
    measurements = torch.from_numpy(
        np.concatenate([dataset.measurements[s.users] for s in dataset.silos])
        if unlinked
        else dataset.measurements
    )
    train = dataset.pooled("train")
    user_rows = np.concatenate([rows_of(s.index, s.train) for s in dataset.silos])
    batch = records_batch(train, user_rows, dataset.product_item, dataset.product_size)
    shared = init_fit_shared(run_config, dataset, task, "init")
    private = model.init_private(
        n_rows, config.fit.dim, torch_generator(config.seed, task, "users")
    )
    generator = torch_generator(config.seed, task, "train")
    training = fit_training(run_config)
    for _ in range(epochs):
        trained = train_fit(model, shared, private, measurements, batch, 1, training, generator)
        shared, private = trained.shared, trained.private
        progress.advance(task)

    def predict(silo, records):
        held = records_batch(
            records, rows_of(silo.index, records), dataset.product_item, dataset.product_size
        )
        return probabilities(model, shared, private, measurements, held).numpy()

    per_silo = _scored(dataset, config.eval.split, predict)
    weights = {task: {**shared, **private}}
    return fit_method_result(per_silo, time.perf_counter() - started), weights


def train_local_only(
    config: RunConfig, dataset: FitDataset, progress: Progress
) -> tuple[MethodResult, Weights]:
    epochs = config.baseline_epochs
    progress.start("local_only", dataset.n_silos)
    started = time.perf_counter()
    model = get_fit_model(config.fit.model)
    training = fit_training(config)
    per_silo, weights = {}, {}
    for silo in dataset.silos:
        shared = init_fit_shared(config, dataset, "local", silo.index, "init")
        private = model.init_private(
            silo.n_users, config.fit.dim, torch_generator(config.seed, "local", silo.index, "users")
        )
        measurements = torch.from_numpy(dataset.measurements[silo.users])
        batch = records_batch(
            silo.train, silo.local(silo.train), dataset.product_item, dataset.product_size
        )
        trained = train_fit(
            model, shared, private, measurements, batch, epochs, training,
            torch_generator(config.seed, "local", silo.index, "train"),
        )  # fmt: skip
        records = silo.heldout(config.eval.split)
        held = records_batch(
            records, silo.local(records), dataset.product_item, dataset.product_size
        )
        predicted = probabilities(model, trained.shared, trained.private, measurements, held)
        per_silo[silo.name] = FitCounts.of(predicted.numpy(), records.label)
        weights[f"local_only/silo-{slug(silo.name)}"] = {**trained.shared, **trained.private}
        progress.advance("local_only", silo.name)
    return fit_method_result(per_silo, time.perf_counter() - started), weights


def majority(config: RunConfig, dataset: FitDataset, progress: Progress):
    progress.start("majority", 1)
    started = time.perf_counter()
    frequencies = {}
    for silo in dataset.silos:
        counts = np.asarray(silo.train.class_counts(), dtype=np.float64) + 1.0  # Laplace
        frequencies[silo.name] = counts / counts.sum()

    def predict(silo, records):
        return np.tile(frequencies[silo.name], (len(records), 1))

    per_silo = _scored(dataset, config.eval.split, predict)
    progress.advance("majority")
    weights = {"majority": {"frequencies": torch.tensor(np.stack(list(frequencies.values())))}}
    return fit_method_result(per_silo, time.perf_counter() - started), weights


def open_fit_privacy(config: RunConfig, dataset: FitDataset) -> PrivacyGuard | None:
    """Record-level DP: each shop protects each of its customers (a shopper of k shops is k
    customers, each protected by her shop; across shops her loss composes k times)."""
    if not config.privacy.enabled:
        return None
    plan = record_level_plan(config, [silo.n_users for silo in dataset.silos])
    return PrivacyGuard.open(plan, config.privacy, dataset.name, dataset.silo_names)


def run_fit_experiment(
    config: RunConfig, dataset: FitDataset, progress: Progress | None = None
) -> FitResult:
    progress = progress or _Silent()
    methods = config.fit.methods
    guard = open_fit_privacy(config, dataset) if "federated" in methods else None
    results: dict[str, MethodResult] = {}
    weights: Weights = {}
    history: list[RoundRecord] = []
    protection, sizes, audit = ProtectionSummary(), {}, None
    trainers = {
        "centralized": lambda: train_pooled(config, dataset, progress, "centralized"),
        "centralized_unlinked": lambda: train_pooled(
            config, dataset, progress, "centralized_unlinked", unlinked=True
        ),
        "local_only": lambda: train_local_only(config, dataset, progress),
        "majority": lambda: majority(config, dataset, progress),
        "1-lv-lr": lambda: train_pooled(config, dataset, progress, "1-lv-lr", "1-lv-lr"),
        "measurements": lambda: train_pooled(
            config, dataset, progress, "measurements", "measure-ml"
        ),
    }
    for method in methods:
        if method == "federated":
            results[method], more, history, protection, sizes, audit = run_federated(
                config, dataset, progress, guard
            )
        else:
            results[method], more = trainers[method]()
        weights.update(more)
    return FitResult(
        config, dataset, results, history, weights,
        guard.summary() if guard is not None else PrivacySummary(), protection, sizes, audit,
    )  # fmt: skip
