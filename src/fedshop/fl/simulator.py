"""In-process cross-silo simulator: every silo a `SiloClient` object, the server in the same process.

The simulator only drives the loop; what a silo computes and sends, and what the server does with it,
live in `client.py`, `stages.py` and `server.py`, which a real deployment runtime reuses unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from fedshop.config import RunConfig
from fedshop.data.interactions import RecDataset
from fedshop.eval.metrics import summarise
from fedshop.fl.client import SiloClient
from fedshop.fl.dp_local import DpSgdState, release_counts
from fedshop.fl.server import FederatedServer
from fedshop.fl.server_opt import make_server_optimizer
from fedshop.fl.stages import AggregationPipeline, ClientMessage
from fedshop.models.spec import get_model
from fedshop.privacy.dp import DpPlan, PrivacyGuard
from fedshop.secure.stage import ProtectedSum, make_protection
from fedshop.seeding import derive_seed, torch_generator

RoundCallback = Callable[["RoundRecord"], None]


@dataclass(frozen=True)
class RoundRecord:
    round: int
    clients: list[int]
    seconds: float
    metrics: dict[str, float | int] | None  # summarised test metrics, when evaluated this round
    epsilon: float | None = None  # the run's ε after this round, under differential privacy
    # Under a protection (SecAgg, CKKS, Paillier): its measured cost this round.
    protection: dict | None = None


def evaluated_after(config: RunConfig, round_number: int) -> bool:
    """Whether the model is evaluated after this round (every `eval_every` rounds, and the last)."""
    return round_number % config.eval.eval_every == 0 or round_number == config.federated.rounds


@dataclass
class FederatedRun:
    server: FederatedServer
    clients: list[SiloClient]
    history: list[RoundRecord] = field(default_factory=list)
    protection: ProtectedSum | None = None  # the secure sum, when updates are protected

    def evaluate(self, split: str = "test") -> dict:
        return {c.name: c.evaluate(self.server.shared, split) for c in self.clients}


def build_federation(
    dataset: RecDataset, config: RunConfig, pipeline: AggregationPipeline | None = None
) -> FederatedRun:
    pipeline = pipeline or AggregationPipeline.for_aggregation(config.federated.aggregation)
    protection = make_protection(config.protection)
    protected = None
    if protection is not None:
        protected = ProtectedSum(protection, config.protection.bound)
        pipeline = replace(pipeline, summation=protected)
    clients = [
        SiloClient(
            i, dataset.silo(i), config.model, config.train, pipeline, config.seed,
            config.federated.client_learning_rate,
        )
        for i in range(dataset.n_silos)
    ]  # fmt: skip
    server = make_server(config, dataset.n_items, len(clients), pipeline)
    return FederatedRun(server=server, clients=clients, protection=protected)


def make_server(
    config: RunConfig, n_items: int, n_silos: int, pipeline: AggregationPipeline
) -> FederatedServer:
    """The coordinating server as both runtimes start it: the same initial model and sampling
    stream for the same seed, whether the silos are simulated or separate processes."""
    shared = get_model(config.model.name).init_shared(
        n_items, config.model, torch_generator(config.seed, "shared", "init")
    )
    return FederatedServer(
        shared,
        pipeline,
        make_server_optimizer(config.federated),
        n_silos,
        config.federated.silos_per_round,
        torch_generator(config.seed, "server", "sampling"),
    )


def run_cross_silo(
    dataset: RecDataset,
    config: RunConfig,
    on_round: RoundCallback | None = None,
    pipeline: AggregationPipeline | None = None,
    guard: PrivacyGuard | None = None,
) -> FederatedRun:
    """Train; with a `guard` (record-level DP) every silo trains by DP-SGD over its customers and
    each round is written to the ledger before any silo's message leaves."""
    run = build_federation(dataset, config, pipeline)
    fed = config.federated
    if guard is not None:
        private = _PrivateSilos.start(run, config, guard)
    for round_number in range(1, fed.rounds + 1):
        started = time.perf_counter()
        chosen = run.server.sample_clients()
        global_shared = run.server.shared
        epsilon = None
        if guard is not None:
            epsilon = guard.release(round_number, guard.plan.round_event)
            messages = [private.fit(run.clients[i], global_shared) for i in chosen]
        else:
            messages = [
                run.clients[i].fit(global_shared, fed.local_epochs, fed.reconstruction_epochs)
                for i in chosen
            ]
        run.server.apply(messages)
        seconds = time.perf_counter() - started
        metrics = None
        if evaluated_after(config, round_number):
            metrics = summarise(run.evaluate(config.eval.split))
        cost = run.protection.last_round() if run.protection is not None else None
        record = RoundRecord(round_number, chosen, seconds, metrics, epsilon, cost)
        run.history.append(record)
        if on_round is not None:
            on_round(record)
    for client in run.clients:
        client.personalise(run.server.shared, fed.personalise_epochs)
    return run


@dataclass
class _PrivateSilos:
    """Record-level DP state of the federation: each silo's DP-SGD state and released count."""

    plan: DpPlan
    states: list[DpSgdState]
    released_counts: np.ndarray  # per silo, the noisy customer count (what the server may see)

    @classmethod
    def start(cls, run: FederatedRun, config: RunConfig, guard: PrivacyGuard) -> _PrivateSilos:
        # The counts' release is already in the ledger (guard.open composes the plan's fixed events).
        counts = release_counts(
            [client.data.n_users for client in run.clients], guard.plan,
            np.random.default_rng(derive_seed(config.seed, "privacy", "silo-counts")),
        )  # fmt: skip
        states = [
            DpSgdState.start(
                config.train.learning_rate,
                {s: torch_generator(config.seed, "silo", i, "dp", s) for s in DpSgdState.STREAMS},
            )
            for i in range(len(run.clients))
        ]
        return cls(guard.plan, states, counts)

    def fit(self, client: SiloClient, global_shared) -> ClientMessage:
        return client.fit_private(
            global_shared, self.plan, self.states[client.index],
            float(self.released_counts[client.index]),
        )  # fmt: skip
