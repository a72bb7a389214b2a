"""Fit prediction across shops: a shop as a federated client, and the federated run.

A `FitSiloClient` has the interface of the recommenders' `SiloClient` (fit, personalise, evaluate,
private_state, acknowledge), so the same `SiloTransport`, `RoundDriver`, aggregation pipeline, server optimisers,
record-level DP and secure sums carry its rounds. It holds its own records, its customers'
measurements and their private true-size vectors; only the update of the shared product vectors,
item biases and head leaves it, and only counts leave its evaluation (`eval/fit_metrics.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedshop.config import RunConfig
from fedshop.data.fit_feedback import FitDataset, FitRecords, FitSilo, size_feature
from fedshop.eval.fit_metrics import FitCounts, summarise_fit
from fedshop.fl.aggregation import aggregation_pipeline, with_row_means
from fedshop.fl.client import LocalTask, SiloDp, SiloState
from fedshop.fl.fit_local import FitTraining, dp_sgd_fit, train_fit
from fedshop.fl.in_process import SiloTransport
from fedshop.fl.rounds import RoundCallback, RoundDriver, RoundRecord
from fedshop.fl.server import FederatedServer, silo_server
from fedshop.messages import AggregationPipeline, ClientMessage
from fedshop.models.fit import (
    ITEM_TABLES,
    PRODUCT_TABLES,
    Batch,
    FitModel,
    Params,
    get_fit_model,
    probabilities,
)
from fedshop.secure.protected_sum import ProtectedSum, make_protection
from fedshop.seeding import NoiseStream, torch_generator

if TYPE_CHECKING:
    from fedshop.fl.audit import AuditTrail
    from fedshop.privacy.dp import PrivacyGuard

ROW_TABLES = PRODUCT_TABLES + ITEM_TABLES  # averaged over the shops that changed each row


def fit_training(config: RunConfig) -> FitTraining:
    fit = config.fit
    return FitTraining(
        learning_rate=fit.learning_rate,
        l2=fit.l2,
        weight_decay=fit.weight_decay,
        private_decay=fit.private_decay,
        batch_size=fit.batch_size,
        user_learning_rate=fit.user_learning_rate,
    )


def records_batch(
    records: FitRecords, user_row: np.ndarray, product_item: np.ndarray, product_size: np.ndarray
) -> Batch:
    """`records` as a model's batch; `product_item` and `product_size` are the public catalogue."""
    return Batch(
        torch.from_numpy(np.asarray(user_row, dtype=np.int64)),
        torch.from_numpy(records.product),
        torch.from_numpy(product_item[records.product]),
        torch.from_numpy(records.label),
        torch.from_numpy(size_feature(product_size[records.product])),
    )


class FitSiloClient(SiloState):
    def __init__(
        self,
        silo: FitSilo,
        product_item: np.ndarray,
        product_size: np.ndarray,
        measurements: np.ndarray,
        config: RunConfig,
        pipeline: AggregationPipeline,
    ) -> None:
        """`measurements`: this shop's customers' only, in the order of `silo.users` (it asked
        them itself); `product_item`, `product_size`: the public catalogue's item and size of each
        product."""
        self.index = silo.index
        self.silo = silo
        self.model = get_fit_model(config.fit.model)
        self.dim = config.fit.dim
        self.training = fit_training(config)
        self.pipeline = pipeline
        self._product_item, self._product_size = product_item, product_size
        self._measurements = torch.from_numpy(np.ascontiguousarray(measurements))
        self._private = self.model.init_private(
            silo.n_users, self.dim, torch_generator(config.seed, "fit-silo", silo.index, "users")
        )
        self._generator = torch_generator(config.seed, "fit-silo", silo.index, "train")
        self.dp: SiloDp | None = None

    @classmethod
    def of_dataset(
        cls, silo: FitSilo, dataset: FitDataset, config: RunConfig, pipeline: AggregationPipeline
    ) -> FitSiloClient:
        """The simulator's shop: its rows of the dataset's measurements."""
        return cls(
            silo, dataset.product_item, dataset.product_size, dataset.measurements[silo.users],
            config, pipeline,
        )  # fmt: skip

    @property
    def name(self) -> str:
        return self.silo.name

    @property
    def n_customers(self) -> int:
        return self.silo.n_users

    def batch(self, records: FitRecords) -> Batch:
        return records_batch(
            records, self.silo.local(records), self._product_item, self._product_size
        )

    def fit(self, global_shared: Params, task: LocalTask) -> ClientMessage:
        """Train from the global shared parameters; return the (staged) update of them."""
        self.personalise(global_shared, task.reconstruction_epochs)
        train = self.batch(self.silo.train)
        if task.dp is None:
            delta, steps, examples, event = self._plain_update(global_shared, train, task)
        else:
            delta, steps, examples, event = self._private_update(global_shared, train, task.dp)
        message = ClientMessage(delta, 1.0, examples, local_steps=max(steps, 1), dp_event=event)
        return self.pipeline.on_client(message)

    def _plain_update(self, global_shared: Params, train: Batch, task: LocalTask):
        result = train_fit(
            self.model, global_shared, self._private, self._measurements, train, task.epochs,
            self.training, self._generator, proximal_mu=task.proximal_mu,
        )  # fmt: skip
        self._private = result.private
        delta = {k: result.shared[k] - global_shared[k] for k in global_shared}
        # A shop changes only the rows of the products (and items) it rented out; the decay of the
        # others is left to the shops that train them.
        for name, rows in ((PRODUCT_TABLES[0], train.product), (ITEM_TABLES[0], train.item)):
            touched = torch.zeros(len(delta[name]), 1, dtype=torch.bool)
            touched[rows] = True
            delta[name] = delta[name] * touched
        return delta, result.steps, len(train), None

    def _private_update(self, global_shared: Params, train: Batch, dp):
        """Record-level DP: DP-SGD over the shop's customers; every row carries noise, and the
        message's weight is the shop's released (noisy) customer count."""
        if self.dp is None:
            raise RuntimeError(f"silo {self.name} has no DP state for a DP round")
        local, event = dp_sgd_fit(
            self.model, global_shared, self._private, self._measurements, train, dp,
            self.training, self.dp.state,
        )  # fmt: skip
        delta = {k: local[k] - global_shared[k] for k in global_shared}
        return delta, dp.steps, self.dp.released_count, event

    def personalise(self, global_shared: Params, epochs: int) -> None:
        """Refit the customers' own vectors against the fixed shared model; nothing is sent."""
        if epochs <= 0 or not self._private:
            return
        result = train_fit(
            self.model, global_shared, self._private, self._measurements,
            self.batch(self.silo.train), epochs, self.training, self._generator,
            update_shared=False,
        )  # fmt: skip
        self._private = result.private

    def predict(self, global_shared: Params, records: FitRecords) -> torch.Tensor:
        return probabilities(
            self.model, global_shared, self._private, self._measurements, self.batch(records)
        )

    def evaluate(self, global_shared: Params, split: str = "test") -> FitCounts:
        """Counts over this shop's held-out records; only these leave the shop."""
        records = self.silo.heldout(split)
        return FitCounts.of(self.predict(global_shared, records).numpy(), records.label)


class FitSummaries:
    """What `RoundDriver` reads of a transport whose per-silo metrics are `FitCounts` (the
    simulator's `FitTransport` and a deployment's)."""

    headline = "auc_macro"
    summarise = staticmethod(summarise_fit)


@dataclass
class FitTransport(FitSummaries, SiloTransport):
    """`SiloTransport` whose per-silo metrics are `FitCounts`."""


@dataclass
class FitFederatedRun:
    server: FederatedServer
    clients: list[FitSiloClient]
    history: list[RoundRecord]
    protection: ProtectedSum | None
    final: dict[str, FitCounts]
    audit: AuditTrail | None = None  # the run's audit log and the shops' keys (fl/audit.py)


@dataclass(frozen=True)
class FitShapes:
    """What the shared model's shape depends on: the public catalogue and the measurement features.
    A deployment's server learns them from the silos' hellos, never from their data."""

    n_products: int
    n_items: int
    n_features: int

    @staticmethod
    def of(dataset: FitDataset) -> FitShapes:
        return FitShapes(dataset.n_products, len(dataset.item_ids), dataset.measurements.shape[1])


def init_fit_shared(config: RunConfig, dataset: FitDataset, *stream: object) -> Params:
    return init_fit_shared_of(config, FitShapes.of(dataset), *stream)


def init_fit_shared_of(config: RunConfig, shapes: FitShapes, *stream: object) -> Params:
    model: FitModel = get_fit_model(config.fit.model)
    return model.init_shared(
        shapes.n_products, shapes.n_items, shapes.n_features, config.fit.dim,
        torch_generator(config.seed, *stream),
    )  # fmt: skip


def fit_pipeline(config: RunConfig, private: bool) -> AggregationPipeline:
    """The aggregation stages of a fit run, the simulator's and a deployment's (server and silos)."""
    pipeline = aggregation_pipeline(config.federated.aggregation)
    if private:  # under DP every row carries noise, and so would the row weights
        return pipeline
    return with_row_means(pipeline, ROW_TABLES)


def make_fit_server(
    config: RunConfig, shapes: FitShapes, n_silos: int, pipeline: AggregationPipeline
) -> FederatedServer:
    """The fit server as every runtime starts it: the same initial model and sampling stream."""
    shared = init_fit_shared_of(config, shapes, "shared", "init")
    return silo_server(config.federated, config.seed, shared, n_silos, pipeline)


def run_fit_federated(
    dataset: FitDataset,
    config: RunConfig,
    on_round: RoundCallback | None = None,
    guard: PrivacyGuard | None = None,
) -> FitFederatedRun:
    """Federated training over the shops, through the recommenders' round driver and stages, and
    its audit log as a recommender's cross-silo run keeps it (`fl/audit.py`: every shop signs the
    models it receives with a key of its own for the run)."""
    from fedshop.fl.audit import start_silo_audit

    pipeline = fit_pipeline(config, private=guard is not None)
    protection = make_protection(config.protection)
    protected = None
    if protection is not None:
        protected = ProtectedSum(protection, config.protection.bound)
        pipeline = replace(pipeline, summation=protected)
    clients = [FitSiloClient.of_dataset(s, dataset, config, pipeline) for s in dataset.silos]
    server = make_fit_server(config, FitShapes.of(dataset), len(clients), pipeline)
    audit = start_silo_audit(config, clients)
    fed = config.federated
    if guard is not None:
        start_private_fit_silos(clients, config, guard)
    transport = FitTransport(
        clients, LocalTask.of_run(config, guard.plan if guard is not None else None),
        config.eval.split, fed.personalise_epochs, protected, audit_run=audit.log.run,
    )  # fmt: skip
    driver = RoundDriver(config, server, transport, guard, on_round=on_round, audit=audit.rounds)
    finished = driver.run_all()
    return FitFederatedRun(
        server, clients, finished.history, protected, finished.final.per_silo, audit
    )


def start_private_fit_silos(
    clients: list[FitSiloClient], config: RunConfig, guard: PrivacyGuard
) -> None:
    """Each shop's DP-SGD state and its customer count released once with noise (the release is
    already in the ledger: the guard composed the plan's fixed events when it opened)."""
    from fedshop.fl.dp_local import DpSgdState
    from fedshop.privacy.dp import release_silo_counts

    for i, client in enumerate(clients):
        stream = NoiseStream.of(config.privacy.known_noise_seed, "silo", i, "dp", "count")
        count = release_silo_counts([client.n_customers], guard.plan, stream)[0]
        # Its shared-model Adam runs at the fit model's own rate (`dp_learning_rate`).
        client.dp = SiloDp(DpSgdState.of_run(config, i), float(count))
