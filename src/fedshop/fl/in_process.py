"""The in-process cross-silo runtime: every silo a `SiloClient` object, the server in the same process.

`SiloTransport` carries a round to the silo objects; the round itself is `fl/rounds.py`'s, the same
that a deployment drives over Flower, with the same `SiloClient`, pipeline and server.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import torch

from fedshop.config import RunConfig
from fedshop.data.interactions import RecDataset
from fedshop.eval.metrics import MetricSums
from fedshop.fl.aggregation import aggregation_pipeline
from fedshop.fl.buffered import Schedule, StepOutcome, model_bytes, unscheduled
from fedshop.fl.client import LocalTask, SiloClient, SiloDp
from fedshop.fl.contribution import (
    ContributionMeter,
    RoundContribution,
    customer_sample,
    scaled,
    unavailable,
)
from fedshop.fl.robust import expected_layout, robust_summation, screen
from fedshop.fl.rounds import (
    FinalEvaluation,
    IncompleteRoundError,
    RoundCallback,
    RoundDriver,
    RoundRecord,
    RoundReply,
)
from fedshop.fl.server import FederatedServer, Sampler
from fedshop.fl.server_opt import make_server_optimizer
from fedshop.fl.wire import Wire, with_low_rank
from fedshop.messages import AggregationPipeline
from fedshop.models.spec import Params, get_model
from fedshop.secure.protected_sum import ProtectedSum, make_protection
from fedshop.seeding import NoiseStream, torch_generator

_log = logging.getLogger("fedshop.rounds")  # refused updates: stderr unless the caller routes it

if TYPE_CHECKING:
    from fedshop.fl.audit import AuditTrail
    from fedshop.privacy.dp import DpPlan, PrivacyGuard


def make_server(
    config: RunConfig,
    n_items: int,
    pool: torch.Tensor,
    pipeline: AggregationPipeline,
    poisson_rate: float | None = None,
    device: torch.device | None = None,
    item_features: sp.csr_matrix | None = None,
) -> FederatedServer:
    """The coordinating server as every runtime starts it: the same initial model and sampling
    stream for the same seed, whether the clients are simulated or separate processes. Poisson
    sampling (`poisson_rate`, user-level DP) is the accountant's amplification, which holds only
    while who was sampled is secret: it comes from a secret `NoiseStream`, not from the seed."""
    shared = get_model(config.model.name).init_model(
        n_items, config.model, torch_generator(config.seed, "shared", "init"), item_features
    )
    if device is not None:  # initialised on the CPU: the same numbers whatever the device
        shared = {k: v.to(device) for k, v in shared.items()}
    fed = config.federated
    per_round = (
        fed.silos_per_round if config.federated.mode == "cross-silo" else fed.clients_per_round
    )
    if config.communication.schedule == "fedbuff":  # draws enough to refill every free slot
        per_round = config.communication.concurrency or per_round
    if poisson_rate is not None:
        generator = NoiseStream.of(config.privacy.known_noise_seed, "server", "sampling")
    else:
        generator = torch_generator(config.seed, "server", "sampling")
    sampler = Sampler(pool, generator, per_round, poisson_rate)
    return FederatedServer(shared, pipeline, make_server_optimizer(fed), sampler)


@dataclass
class SiloTransport:
    """A round's messages handed to silo objects in this process."""

    clients: list[SiloClient]
    task: LocalTask
    split: str
    personalise_epochs: int
    protection: ProtectedSum | None = None
    unit: str = "silos"
    retries: bool = False  # a simulated silo does not come back: a failure stops the run
    max_update_norm: float = 0.0  # refuse longer updates ([federated] max_update_norm; 0: off)
    log: Callable[[str], None] = lambda line: None
    audit_run: str | None = None  # the run's id in its audit log: the silos acknowledge models
    # Values every round's silos from their accepted messages ([contribution]; None: off).
    contribution: ContributionMeter | None = None
    wire: Wire = field(default_factory=Wire)  # how messages are encoded ([communication] codec)
    schedule: Schedule | None = None  # the simulated clock, and FedBuff's buffer when it is on
    concurrency: int = 0  # FedBuff: silos training at once

    def party_name(self, index: int) -> str:
        return self.clients[index].name

    @property
    def client_dp_event(self):
        return self.task.dp.dp_event if self.task.dp is not None else None

    def train(
        self, round_number: int, clients: Sequence[int], shared: Params, evaluate: int | None
    ) -> RoundReply:
        pipeline = self.clients[0].pipeline
        step = self._step(round_number, list(clients), shared)
        sent = {
            i: step.discount(i, self.wire.open(parcel[0])) for i, parcel in step.parcels.items()
        }
        acks = {i: parcel[1] for i, parcel in step.parcels.items()}
        hashes = self._hashes(sent)
        # A silo's malformed or oversized message is refused, as a deployment refuses it on arrival.
        messages, refused = screen(sent, expected_layout(pipeline, shared), self.max_update_norm)
        for i, reason in refused.items():
            self.log(
                f"round {round_number}: silo {self.clients[i].name}'s update refused: {reason}"
            )
        if not messages:
            raise IncompleteRoundError(f"every update of round {round_number} was refused")
        events = {i: m.dp_event for i, m in messages.items() if m.dp_event}
        cost = None
        aggregate = pipeline.summation(list(messages.values()))
        traffic = step.traffic
        if self.protection is not None:  # the protection's own encoding is what travelled
            cost = self.protection.costs[-1]
            traffic = replace(
                traffic, sent=dict(zip(messages, cost.bytes_sent_per_client, strict=False))
            )
        if self.contribution is not None:  # before the server's step: its optimiser is as it was
            self.contribution.measure(round_number, shared, messages)
        return RoundReply(
            aggregate, list(messages), cost, events, message_hashes=hashes, acks=acks,
            traffic=traffic, clock=step.clock, staleness=step.staleness,
        )  # fmt: skip

    def _step(self, round_number: int, clients: list[int], shared: Params) -> StepOutcome:
        """Train the silos that start now; what arrives for this step (all of them, unless
        FedBuff), with the bytes and the simulated clock."""

        def train(chosen: list[int]) -> dict:
            trained = {}
            for i in chosen:
                ack = self._acknowledge(i, round_number, shared)
                message = self.clients[i].fit(shared, self.task)
                encoded, size = self.wire.send(i, round_number, message)
                trained[i] = (((message, encoded), ack), size)
            return trained

        down = model_bytes(shared)
        if self.schedule is not None:
            return self.schedule.round(clients, train, down, self.concurrency)
        return unscheduled(clients, train, down)

    def _acknowledge(self, client: int, round_number: int, shared: Params) -> str | None:
        """The silo's signature on the model it was sent (for the run's audit log)."""
        if self.audit_run is None:
            return None
        return self.clients[client].acknowledge(self.audit_run, round_number, shared)

    def _hashes(self, sent: dict) -> dict[int, str] | None:
        """Each message's hash, as the server received it (none under a protection: a
        deployment's server receives only masked values)."""
        if self.audit_run is None or self.protection is not None:
            return None
        from fedshop.fl.audit import hash_message

        return {i: hash_message(m) for i, m in sent.items()}

    def evaluate(self, round_number: int, shared: Params) -> dict[str, MetricSums]:
        return {c.name: c.evaluate(shared, self.split) for c in self.clients}

    def finish(self, shared: Params, evaluate: int | None) -> FinalEvaluation:
        for client in self.clients:
            client.personalise(shared, self.personalise_epochs)
        final = FinalEvaluation(self.evaluate(0, shared))
        if self.audit_run is not None:
            final.acks = {
                i: c.acknowledge(self.audit_run, 0, shared) for i, c in enumerate(self.clients)
            }
        return final

    def recover(self) -> None:
        pass


@dataclass
class FederatedRun:
    server: FederatedServer
    clients: list[SiloClient]
    history: list[RoundRecord]
    protection: ProtectedSum | None = None  # the secure sum, when updates are protected
    # Per silo, the final model's metrics after every silo refitted its private parameters.
    final: dict[str, MetricSums] | None = None
    audit: AuditTrail | None = None  # the run's audit log and the silos' keys (fl/audit.py)
    # metrics.json "contribution": each silo's value (fl/contribution.py), or why there is none.
    contribution: dict | None = None
    contribution_rounds: list[RoundContribution] = field(default_factory=list)  # with utilities


def server_pipeline(config: RunConfig) -> AggregationPipeline:
    """The aggregation rule's pipeline with `[federated] robust`'s summation: the simulator's
    server and a deployment's build the same."""
    fed = config.federated
    pipeline = with_low_rank(aggregation_pipeline(fed.aggregation), config)
    if fed.robust == "none":
        return pipeline
    summation = robust_summation(fed.robust, fed.robust_trim, fed.byzantine, fed.robust_bound)
    return replace(pipeline, summation=summation)


def build_federation(
    dataset: RecDataset, config: RunConfig, pipeline: AggregationPipeline | None = None
) -> FederatedRun:
    pipeline = pipeline or server_pipeline(config)
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
    server = make_server(
        config, dataset.n_items, torch.arange(len(clients)), pipeline,
        item_features=dataset.item_features,
    )  # fmt: skip
    return FederatedRun(server=server, clients=clients, history=[], protection=protected)


def run_cross_silo(
    dataset: RecDataset,
    config: RunConfig,
    on_round: RoundCallback | None = None,
    pipeline: AggregationPipeline | None = None,
    guard: PrivacyGuard | None = None,
    clients_hook: Callable[[list], list] | None = None,
) -> FederatedRun:
    """Train; with a `guard` (record-level DP) every silo trains by DP-SGD over its customers and
    each round is written to the ledger before any silo's message leaves."""
    run = build_federation(dataset, config, pipeline)
    from fedshop.fl.audit import start_silo_audit

    run.audit = start_silo_audit(config, run.clients)  # each silo's key, before any wrapper
    if clients_hook is not None:  # an experiment's attackers ([attack], fl/poisoning.py)
        run.clients = clients_hook(run.clients)
    if guard is not None:
        start_private_silos(run.clients, config, guard.plan)
    reason = contribution_unavailable(config, run.server.pipeline)
    meter = contribution_meter(config, run) if reason is None else None
    transport = SiloTransport(
        run.clients, LocalTask.of_run(config, guard.plan if guard is not None else None),
        config.eval.split, config.federated.personalise_epochs, run.protection,
        max_update_norm=config.federated.max_update_norm, log=_log.warning, contribution=meter,
    )  # fmt: skip
    transport.audit_run = run.audit.log.run
    # Record-level DP: encoding a noisy update is post-processing, no re-clip needed.
    transport.wire = Wire.of_run(config)
    transport.schedule, transport.concurrency = silo_schedule(config, run.clients)
    driver = RoundDriver(
        config, run.server, transport, guard, on_round=on_round, audit=run.audit.rounds
    )
    finished = driver.run_all()
    run.history, run.final = finished.history, finished.final.per_silo
    run.contribution = meter.block() if meter is not None else unavailable(reason)
    run.contribution_rounds = meter.rounds if meter is not None else []
    return run


def silo_schedule(config: RunConfig, clients: list[SiloClient]) -> tuple[Schedule, int]:
    """The silos' simulated clock (each silo's compute scales with its training interactions), and
    how many silos train at once under FedBuff."""
    schedule = Schedule(
        config, len(clients), lambda i: clients[i].data.n_train, config.federated.local_epochs
    )
    fed = config.federated
    return schedule, config.communication.concurrency or fed.silos_per_round or len(clients)


def contribution_unavailable(config: RunConfig, pipeline: AggregationPipeline) -> str | None:
    """Why this cross-silo run cannot value its silos, or None when it can."""
    method = config.contribution.method
    if method == "none":
        return '[contribution] method = "none": no silo was valued'
    if config.communication.schedule == "fedbuff":
        return (
            'under [communication] schedule = "fedbuff" a step sums updates trained on different '
            "models: a subset's candidate model is not defined"
        )
    kind = config.protection.kind
    if kind != "none":
        return (
            f'under [protection] kind = "{kind}" the server sees only the sum of the silos\' '
            "updates, never one silo's, so it cannot form the model a subset of silos would give"
        )
    if pipeline.server_dp_events():
        return "the server adds DP noise to the sum: valuing subsets would draw and release more"
    return None


def contribution_split(config: RunConfig) -> str:
    """The split the utility reads: validation where the run has one, else the evaluation split."""
    return "validation" if config.data.validation else config.eval.split


def contribution_meter(config: RunConfig, run: FederatedRun) -> ContributionMeter:
    """The meter of a run's silos: each evaluates a candidate model on (a sample of) its own
    held-out customers, scaled to its size, and only the metric sums go to the server."""
    split, cap = contribution_split(config), config.contribution.customers
    samples, counts = [], []
    for client in run.clients:
        evaluated = np.flatnonzero(np.diff(client.data.heldout(split).indptr) > 0)
        samples.append(customer_sample(evaluated, cap, config.seed, client.index))
        counts.append(len(evaluated))
    clients, server = run.clients, run.server

    def evaluate(shared: Params) -> dict[str, MetricSums]:
        return {
            c.name: scaled(c.evaluate(shared, split, samples[i]), counts[i])
            for i, c in enumerate(clients)
        }

    customers = (
        "all evaluated customers"
        if all(s is None for s in samples)
        else f"at most {cap} evaluated customers per silo, drawn by the seed, sums scaled to the "
        "silo's count"
    )
    return ContributionMeter(
        config.contribution, [c.name for c in clients], server.pipeline,
        lambda: server.optimizer, evaluate, split, config.seed, customers,
    )  # fmt: skip


def start_private_silos(clients: list[SiloClient], config: RunConfig, plan: DpPlan) -> None:
    """Each silo's DP-SGD state and its released customer count, both with secret noise. The counts'
    release is already in the ledger (the guard composes the plan's fixed events when it opens)."""
    from fedshop.fl.dp_local import DpSgdState
    from fedshop.privacy.dp import release_silo_counts

    for i, client in enumerate(clients):
        # Each silo releases its own count with noise of its own, as a deployed silo does.
        stream = NoiseStream.of(config.privacy.known_noise_seed, "silo", i, "dp", "count")
        count = release_silo_counts([client.data.n_users], plan, stream)[0]
        client.dp = SiloDp(DpSgdState.of_run(config, i), float(count))
