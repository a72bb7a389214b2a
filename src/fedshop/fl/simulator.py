"""In-process cross-silo simulator: every silo a `SiloClient` object, the server in the same process.

The simulator only drives the loop; what a silo computes and sends, and what the server does with it,
live in `client.py`, `stages.py` and `server.py`, which a real deployment runtime reuses unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fedshop.config import RunConfig
from fedshop.data.interactions import RecDataset
from fedshop.eval.metrics import summarise
from fedshop.fl.client import SiloClient
from fedshop.fl.server import FederatedServer
from fedshop.fl.server_opt import make_server_optimizer
from fedshop.fl.stages import AggregationPipeline
from fedshop.models.spec import get_model
from fedshop.seeding import torch_generator

RoundCallback = Callable[["RoundRecord"], None]


@dataclass(frozen=True)
class RoundRecord:
    round: int
    clients: list[int]
    seconds: float
    metrics: dict[str, float | int] | None  # summarised test metrics, when evaluated this round


@dataclass
class FederatedRun:
    server: FederatedServer
    clients: list[SiloClient]
    history: list[RoundRecord] = field(default_factory=list)

    def evaluate(self, split: str = "test") -> dict:
        return {c.name: c.evaluate(self.server.shared, split) for c in self.clients}


def build_federation(
    dataset: RecDataset, config: RunConfig, pipeline: AggregationPipeline | None = None
) -> FederatedRun:
    pipeline = pipeline or AggregationPipeline.for_aggregation(config.federated.aggregation)
    shared = get_model(config.model.name).init_shared(
        dataset.n_items, config.model, torch_generator(config.seed, "shared", "init")
    )
    clients = [
        SiloClient(i, dataset.silo(i), config.model, config.train, pipeline, config.seed)
        for i in range(dataset.n_silos)
    ]
    server = FederatedServer(
        shared,
        pipeline,
        make_server_optimizer(config.federated),
        len(clients),
        config.federated.silos_per_round,
        torch_generator(config.seed, "server", "sampling"),
    )
    return FederatedRun(server=server, clients=clients)


def run_cross_silo(
    dataset: RecDataset,
    config: RunConfig,
    on_round: RoundCallback | None = None,
    pipeline: AggregationPipeline | None = None,
) -> FederatedRun:
    run = build_federation(dataset, config, pipeline)
    fed = config.federated
    for round_number in range(1, fed.rounds + 1):
        started = time.perf_counter()
        chosen = run.server.sample_clients()
        global_shared = run.server.shared
        messages = [
            run.clients[i].fit(global_shared, fed.local_epochs, fed.reconstruction_epochs)
            for i in chosen
        ]
        run.server.apply(messages)
        seconds = time.perf_counter() - started
        metrics = None
        if round_number % config.eval.eval_every == 0 or round_number == fed.rounds:
            metrics = summarise(run.evaluate(config.eval.split))
        record = RoundRecord(round_number, chosen, seconds, metrics)
        run.history.append(record)
        if on_round is not None:
            on_round(record)
    for client in run.clients:
        client.personalise(run.server.shared, fed.personalise_epochs)
    return run
