"""A table model across storefronts (demand, returns, fraud): training on one party's rows, a
storefront as a federated client, and the federated run.

`TabularSiloClient` has the interface of the recommenders' `SiloClient` (fit, personalise, evaluate,
private_state, acknowledge), so the same `SiloTransport`, `RoundDriver`, aggregation stages, server
optimisers, secure sums and audit log carry its rounds. It keeps its rows; only the update of the
shared network leaves it, with the embedding rows of codes it does not have left at zero, and only
counts leave its evaluation (eval/tabular_metrics.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedshop.config import RunConfig
from fedshop.data.tabular import TabularDataset, TabularPart, TabularSilo
from fedshop.eval.tabular_metrics import BinaryCounts, ForecastSums, summarise_counts
from fedshop.fl.aggregation import aggregation_pipeline, with_row_means
from fedshop.fl.client import LocalTask, SiloState
from fedshop.fl.in_process import SiloTransport
from fedshop.fl.rounds import RoundCallback, RoundDriver, RoundRecord
from fedshop.fl.server import FederatedServer, silo_server
from fedshop.messages import AggregationPipeline, ClientMessage
from fedshop.models.tabular import (
    Head,
    Params,
    TabularShape,
    embedding_tables,
    forward,
    init_params,
)
from fedshop.models.train import proximal_term
from fedshop.secure.protected_sum import ProtectedSum, make_protection
from fedshop.seeding import torch_generator

if TYPE_CHECKING:
    from fedshop.fl.audit import AuditTrail


@dataclass(frozen=True)
class TabularTraining:
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 256


# What each retail task's table predicts (data/tabular.py KINDS): a deployment's server checks the
# storefronts' hellos against it and reads their evaluations as that kind's counts.
TASK_KINDS = {"demand": "quantile", "returns": "binary", "fraud": "binary"}


@dataclass(frozen=True)
class TableSchema:
    """A table's public shape: what the network's shape depends on, never a row. A deployment's
    server learns it from the storefronts' hellos (their silo files hold it)."""

    kind: str
    horizon: int
    cardinalities: tuple[int, ...]
    n_numeric: int

    @staticmethod
    def of(dataset: TabularDataset) -> TableSchema:
        return TableSchema(
            dataset.kind, dataset.horizon, tuple(dataset.cardinalities), len(dataset.numeric_names)
        )


def head_of(config: RunConfig, table: TabularDataset | TableSchema) -> Head:
    return Head(table.kind, table.horizon, tuple(config.retail.quantiles))


def shape_of(config: RunConfig, table: TabularDataset | TableSchema) -> TabularShape:
    schema = table if isinstance(table, TableSchema) else TableSchema.of(table)
    return TabularShape(
        schema.cardinalities, schema.n_numeric, head_of(config, schema).outputs,
        config.retail.embedding_dim, config.retail.hidden,
    )  # fmt: skip


def training_of(config: RunConfig) -> TabularTraining:
    retail = config.retail
    return TabularTraining(retail.learning_rate, retail.weight_decay, retail.batch_size)


def as_tensors(part: TabularPart) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.from_numpy(part.categorical),
        torch.from_numpy(part.numeric),
        torch.from_numpy(part.target),
    )


def train_tabular(
    params: Params,
    head: Head,
    part: TabularPart,
    epochs: int,
    training: TabularTraining,
    generator: torch.Generator,
    proximal_mu: float = 0.0,
) -> tuple[Params, int]:
    """`epochs` passes of minibatch AdamW over `part` in a seeded order, from `params` (untouched),
    with a fresh optimiser: a round starts from the global model alone. Returns the new parameters
    and the number of steps. `proximal_mu` > 0 adds FedProx's μ/2·‖w − w_global‖² (anchored at
    `params` as given) to every step's loss."""
    anchor = {k: v.detach() for k, v in params.items()} if proximal_mu else None
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    optimiser = torch.optim.AdamW(
        params.values(), lr=training.learning_rate, weight_decay=training.weight_decay
    )
    categorical, numeric, target = as_tensors(part)
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(len(part), generator=generator)
        for start in range(0, len(part), training.batch_size):
            rows = order[start : start + training.batch_size]
            loss = head.loss(forward(params, categorical[rows], numeric[rows]), target[rows])
            if anchor is not None:
                loss = loss + proximal_term(params, anchor, proximal_mu)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            steps += 1
    return {k: v.detach() for k, v in params.items()}, steps


@torch.no_grad()
def predict(params: Params, head: Head, part: TabularPart) -> np.ndarray:
    """Binary: P(label = 1) per row. Quantile: (rows, horizon, levels) in the target's units."""
    categorical, numeric, _ = as_tensors(part)
    return head.predict(forward(params, categorical, numeric)).numpy()


def touched_rows(part: TabularPart, shape: TabularShape) -> dict[str, torch.Tensor]:
    """Per embedding table, which of its rows `part` has codes for (the rows training changes)."""
    out = {}
    for j, name in enumerate(embedding_tables(shape)):
        mask = torch.zeros(shape.cardinalities[j], 1, dtype=torch.bool)
        mask[torch.from_numpy(np.unique(part.categorical[:, j]))] = True
        out[name] = mask
    return out


class TabularSiloClient(SiloState):
    dp = None  # no record-level DP for the retail tasks yet (config refuses it)

    def __init__(
        self,
        silo: TabularSilo,
        shape: TabularShape,
        head: Head,
        config: RunConfig,
        pipeline: AggregationPipeline,
    ) -> None:
        self.index = silo.index
        self.silo = silo
        self.shape = shape
        self.head = head
        self.training = training_of(config)
        self.pipeline = pipeline
        self._private: Params = {}  # every parameter is shared; nothing personal to keep
        self._generator = torch_generator(config.seed, "tabular-silo", silo.index, "train")
        self._touched = touched_rows(silo.train, shape)

    @property
    def name(self) -> str:
        return self.silo.name

    @property
    def n_customers(self) -> int:
        return len(self.silo.train)

    def fit(self, global_shared: Params, task: LocalTask) -> ClientMessage:
        trained, steps = train_tabular(
            global_shared, self.head, self.silo.train, task.epochs, self.training, self._generator,
            proximal_mu=task.proximal_mu,
        )  # fmt: skip
        delta = {k: trained[k] - global_shared[k] for k in global_shared}
        # Weight decay and Adam's momentum move rows this storefront never saw; leave those to
        # the storefronts that have the codes (and send only its own rows where the sum allows).
        for name, mask in self._touched.items():
            delta[name] = delta[name] * mask
        message = ClientMessage(delta, 1.0, len(self.silo.train), local_steps=max(steps, 1))
        return self.pipeline.on_client(message)

    def personalise(self, global_shared: Params, epochs: int) -> None:
        """Nothing private to refit: the whole network is shared."""

    def predict(self, global_shared: Params, part: TabularPart) -> np.ndarray:
        return predict(global_shared, self.head, part)

    def evaluate(self, global_shared: Params, split: str = "test") -> BinaryCounts | ForecastSums:
        """Counts over this storefront's held-out rows; only these leave it."""
        return silo_counts(self.head, self.silo.test, self.predict(global_shared, self.silo.test))


def silo_counts(
    head: Head, part: TabularPart, predicted: np.ndarray
) -> BinaryCounts | ForecastSums:
    if head.kind == "binary":
        return BinaryCounts.of(predicted, part.target)
    median = predicted[..., len(head.levels) // 2]
    scale = part.extra.get("scale", np.ones(len(part), np.float32))[:, None]
    return ForecastSums(
        float((np.abs(part.target - median) * scale).sum()),
        float((part.target * scale).sum()),
    )


class BinarySummaries:
    """What `RoundDriver` reads of a transport whose per-silo metrics are `BinaryCounts` (the
    simulator's `TabularTransport` and a deployment's)."""

    summarise = staticmethod(summarise_counts)
    headline = "auc_pr"


class ForecastSummaries(BinarySummaries):
    """... whose per-silo metrics are `ForecastSums`."""

    headline = "wape"


class TabularTransport(BinarySummaries, SiloTransport):
    """`SiloTransport` whose per-silo metrics are a table model's counts."""


class ForecastTransport(ForecastSummaries, SiloTransport):
    """`SiloTransport` whose per-silo metrics are a forecaster's sums."""


@dataclass
class TabularFederatedRun:
    server: FederatedServer
    clients: list[TabularSiloClient]
    history: list[RoundRecord]
    protection: ProtectedSum | None
    final: dict[str, BinaryCounts | ForecastSums]  # the final model's counts, per storefront
    audit: AuditTrail | None = None


def init_shared(config: RunConfig, shape: TabularShape, *stream: object) -> Params:
    return init_params(shape, torch_generator(config.seed, *stream))


def tabular_pipeline(config: RunConfig, shape: TabularShape) -> AggregationPipeline:
    """Each embedding row averaged over the storefronts that have its code."""
    return with_row_means(
        aggregation_pipeline(config.federated.aggregation), embedding_tables(shape)
    )


def make_tabular_server(
    config: RunConfig, shape: TabularShape, n_silos: int, pipeline: AggregationPipeline
) -> FederatedServer:
    """The table server as every runtime starts it (the simulator, a deployment's ServerApp): the
    same initial network, sampling stream and server optimiser."""
    shared = init_shared(config, shape, "shared", "init")
    return silo_server(config.federated, config.seed, shared, n_silos, pipeline)


def run_tabular_federated(
    dataset: TabularDataset, config: RunConfig, on_round: RoundCallback | None = None
) -> TabularFederatedRun:
    """Federated training over the storefronts through the recommenders' round driver, stages,
    secure sums and audit log."""
    from fedshop.fl.audit import start_silo_audit

    shape, head = shape_of(config, dataset), head_of(config, dataset)
    pipeline = tabular_pipeline(config, shape)
    protection = make_protection(config.protection)
    protected = None
    if protection is not None:
        protected = ProtectedSum(protection, config.protection.bound)
        pipeline = replace(pipeline, summation=protected)
    clients = [TabularSiloClient(s, shape, head, config, pipeline) for s in dataset.silos]
    server = make_tabular_server(config, shape, len(clients), pipeline)
    audit = start_silo_audit(config, clients)
    transport_type = TabularTransport if head.kind == "binary" else ForecastTransport
    transport = transport_type(
        clients, LocalTask.of_run(config), "test", 0, protected, audit_run=audit.log.run
    )
    driver = RoundDriver(config, server, transport, on_round=on_round, audit=audit.rounds)
    finished = driver.run_all()
    return TabularFederatedRun(
        server, clients, finished.history, protected, finished.final.per_silo, audit
    )
