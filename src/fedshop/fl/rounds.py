"""One federated round, written once, whichever runtime carries its messages.

    sample → release (write-ahead) → send and collect (transport) → server stages → check the noise
    → server optimiser → evaluate on schedule → record → checkpoint

`RoundDriver` owns that order. A `Transport` only carries a round: the in-process silos
(`fl/in_process.py`), the vectorised shoppers (`fl/cross_device.py`) or Flower's Grid
(`deploy/server_app.py`). It trains the sampled clients, returns the (plain or protected) sum of
their staged messages, and evaluates a model when asked.

Differential privacy: before a round is sent, the driver writes to the ledger the DP events that the
round's noise stages declare — the clients' (record-level DP-SGD, `Transport.client_dp_event`) and
the server's (`AggregationPipeline.server_dp_events`). After the round it compares them with the
events of the noise that was actually drawn, which travel with the sum and with each client's reply,
and refuses a round whose noise differs from what was accounted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from fedshop.config import RunConfig
from fedshop.errors import FedShopError
from fedshop.eval.metrics import MetricSums, summarise
from fedshop.fl.server import FederatedServer
from fedshop.messages import Aggregate, mean_of
from fedshop.models.spec import Params
from fedshop.secure.protected_sum import round_cost
from fedshop.secure.protocol import ProtectionCost, ProtectionError

if TYPE_CHECKING:  # the accountant loads only for DP runs
    from fedshop.fl.audit import RoundAudit
    from fedshop.privacy.dp import PrivacyGuard

MAX_ATTEMPTS = 5  # a round that fails this often in a row stops the run


@dataclass(frozen=True)
class RoundRecord:
    round: int
    clients: list[int]
    seconds: float
    metrics: dict[str, float | int] | None  # summarised test metrics, when evaluated this round
    epsilon: float | None = None  # the run's ε after this round, under differential privacy
    # Under a protection (SecAgg, CKKS, Paillier): its measured cost this round.
    protection: dict | None = None
    # Bytes on the wire this round (`Traffic.summary`): totals, and per party where few.
    traffic: dict | None = None
    # Simulated seconds since the run started when this round's step happened (fl/timing.py).
    clock: float | None = None
    # FedBuff: each contributor's staleness (server steps since the model it trained on), by name.
    staleness: dict[str, int] | None = None


RoundCallback = Callable[[RoundRecord], None]


def evaluated_after(config: RunConfig, round_number: int) -> bool:
    """Whether the model is evaluated after this round (every `eval_every` rounds, and the last)."""
    return round_number % config.eval.eval_every == 0 or round_number == config.federated.rounds


# A round's history entry names each party's bytes only up to this many parties (cross-silo); with
# more (cross-device shoppers) it keeps the totals, the mean and the largest.
PARTIES_LISTED = 64


@dataclass(frozen=True)
class Traffic:
    """Bytes on the wire in one round, per client: what it sent to the server (its messages, as
    encoded) and what it received (the model, and any protocol steps). `source` says how they were
    counted: "encoded" (the simulator: the size of each message as its codec encodes it) or
    "flower" (a deployment: the serialised size of the Flower messages)."""

    sent: dict[int, int]
    received: dict[int, int]
    source: str = "encoded"

    def summary(self, name: Callable[[int], str] = str) -> dict:
        sent, received = self.sent, self.received
        out: dict = {
            "source": self.source,
            "sent": int(sum(sent.values())),
            "received": int(sum(received.values())),
            "sent_max": int(max(sent.values(), default=0)),
            "received_max": int(max(received.values(), default=0)),
        }
        parties = sorted(set(sent) | set(received))
        if len(parties) <= PARTIES_LISTED:
            out["parties"] = {
                name(p): {"sent": int(sent.get(p, 0)), "received": int(received.get(p, 0))}
                for p in parties
            }
        return out


class IncompleteRoundError(FedShopError):
    """Too few clients took part in a round for it to be applied; a transport whose clients can
    come back retries it."""


class PrivacyAccountingError(FedShopError):
    """The noise a round added is not the noise that was written to the ledger for it."""


@dataclass
class RoundReply:
    """What a transport brings back from one round."""

    aggregate: Aggregate  # the sum of the contributors' staged messages (plain or protected)
    contributors: list[int]
    cost: ProtectionCost | None = None  # the protection's measured cost, when there is one
    # Each contributor's DP event: the noise it added to its update (record-level DP).
    client_dp_events: dict[int, Any] = field(default_factory=dict)
    # The previous round's model as the clients evaluated it, for transports that send the
    # evaluation with the next round's training (`Transport.evaluate` returned None).
    previous_metrics: dict[str, MetricSums] | None = None
    # For the audit log (fl/audit.py): each contributor's message hash (None: the server saw no
    # single message, e.g. under a protection) and each participant's signature on the model sent.
    message_hashes: dict[int, str] | None = None
    acks: dict[int, str | None] = field(default_factory=dict)
    traffic: Traffic | None = None  # bytes each party sent and received this round
    clock: float | None = None  # simulated seconds when the server steps (fl/timing.py)
    # FedBuff: how many server steps old the model each contributor trained on was (0: this one's).
    staleness: dict[int, int] = field(default_factory=dict)


class Transport(Protocol):
    """Carries rounds. A transport whose per-silo metrics are not `MetricSums` (fit prediction) also
    has `summarise` (per-silo metrics → summary) and `headline` (the metric a log line shows)."""

    unit: str  # what a client is, in log lines: "silos", "shoppers"
    retries: bool  # whether a failed round is tried again (clients may come back) or stops the run
    client_dp_event: Any  # what every client adds to its update each round (None: nothing)

    def train(
        self, round_number: int, clients: Sequence[int], shared: Params, evaluate: int | None
    ) -> RoundReply:
        """Send `shared` to `clients` for training; with `evaluate`, also ask for the metrics of
        that round's model where the transport defers evaluation."""
        ...

    def evaluate(self, round_number: int, shared: Params) -> dict[str, MetricSums] | None:
        """Per-silo metrics of `shared`, or None when they come with the next exchange."""
        ...

    def finish(self, shared: Params, evaluate: int | None) -> FinalEvaluation:
        """After the last round: clients refit their private parameters; the final metrics."""
        ...

    def recover(self) -> None:
        """Before a failed round is tried again (wait for clients to come back)."""
        ...


@dataclass
class FinalEvaluation:
    per_silo: dict[str, MetricSums]  # after every client refitted its private parameters
    last_round: dict[str, MetricSums] | None = None  # the last round's model, where it was deferred
    acks: dict[int, str | None] = field(default_factory=dict)  # the parties' on the final model


@dataclass
class RoundsResult:
    """What the driver leaves after the last round: the server, the rounds and what they cost."""

    server: FederatedServer
    history: list[RoundRecord] = field(default_factory=list)
    costs: list[ProtectionCost] = field(default_factory=list)
    final: FinalEvaluation | None = None


class RoundDriver:
    """Runs `config.federated.rounds` rounds of `server` over `transport`."""

    def __init__(
        self,
        config: RunConfig,
        server: FederatedServer,
        transport: Transport,
        guard: PrivacyGuard | None = None,
        history: list[RoundRecord] | None = None,
        on_round: RoundCallback | None = None,
        checkpoint: Callable[[FederatedServer, list[RoundRecord]], None] | None = None,
        log: Callable[[str], None] = lambda line: None,
        audit: RoundAudit | None = None,
    ) -> None:
        self.config = config
        self.audit = audit  # the run's audit log: one entry per round, one for the final model
        self.run = RoundsResult(server, list(history or []))
        self.transport = transport
        self.guard = guard
        self.on_round = on_round
        self.checkpoint = checkpoint
        self.log = log
        # A resumed run's ledger already holds the completed rounds (`PrivacyGuard.resume`).
        self._released = server.round
        self._summarise = getattr(transport, "summarise", summarise)
        self._headline = getattr(transport, "headline", "hr@10")
        self._party_name = getattr(transport, "party_name", str)  # how traffic names a client

    def declared_events(self) -> tuple[Any, ...]:
        """The DP events one round releases, as its noise stages declare them."""
        client = self.transport.client_dp_event
        return (
            *((client,) if client is not None else ()),
            *self.server.pipeline.server_dp_events(),
        )

    @property
    def server(self) -> FederatedServer:
        return self.run.server

    def run_all(self) -> RoundsResult:
        attempts = 0
        while self.server.round < self.config.federated.rounds:
            try:
                self.run_round()
                attempts = 0
            except (IncompleteRoundError, ProtectionError) as reason:
                attempts += 1
                round_number = self.server.round + 1
                if not self.transport.retries:
                    raise
                if attempts >= MAX_ATTEMPTS:
                    raise FedShopError(
                        f"round {round_number} failed {attempts} times; the last time: {reason}"
                    ) from None
                unit = self.transport.unit
                self.log(f"round {round_number}: {reason}; waiting for {unit} and trying again")
                self.transport.recover()
        pending = self._pending_evaluation()
        self.run.final = self.transport.finish(self.server.shared, pending)
        if self.audit is not None:
            self.audit.final(self.server.shared, self.run.final.acks)
        if pending is not None and self.run.final.last_round is not None:
            self._settle(self.run.final.last_round)
        if self.checkpoint is not None:
            self.checkpoint(self.server, self.run.history)
        return self.run

    def run_round(self) -> RoundRecord:
        server, history = self.server, self.run.history
        round_number = server.round + 1
        started = time.perf_counter()
        before = server.sampling_state()
        chosen = server.sample_clients()
        epsilon = self._release(round_number)
        model_in = self.audit and self.audit.model_hash(server.shared)
        try:
            reply = self.transport.train(
                round_number, chosen, server.shared, self._pending_evaluation()
            )
        except (IncompleteRoundError, ProtectionError):
            # The retried round draws the same clients again.
            server.load_sampling_state(before)
            raise
        if reply.previous_metrics is not None:
            self._settle(reply.previous_metrics)
        aggregate = server.pipeline.server_side(reply.aggregate)
        self._check_noise(reply, aggregate)
        server.step(mean_of(aggregate) if aggregate.weight > 0 else None)
        if self.audit is not None:
            self.audit.round(round_number, reply, model_in, server.shared, epsilon)
        seconds = time.perf_counter() - started
        metrics = None
        if evaluated_after(self.config, round_number):
            per_silo = self.transport.evaluate(round_number, server.shared)
            metrics = self._summarise(per_silo) if per_silo is not None else None
        cost = None
        if reply.cost is not None:
            self.run.costs.append(reply.cost)
            cost = round_cost(reply.cost)
        traffic = reply.traffic.summary(self._party_name) if reply.traffic is not None else None
        record = RoundRecord(
            round_number, reply.contributors, seconds, metrics, epsilon, cost, traffic, reply.clock,
            self._staleness(reply),
        )  # fmt: skip
        history.append(record)
        if self.checkpoint is not None:
            self.checkpoint(server, history)
        dropped = sorted(set(chosen) - set(reply.contributors))
        unit = self.transport.unit
        # FedBuff: a chosen client not in this step is still training (or its reply waits).
        missing = "not in this step" if reply.staleness else "dropped out"
        self.log(
            f"round {round_number}: {len(reply.contributors)} {unit} trained"
            + (f", {unit} {dropped} {missing}" if dropped else "")
            + (f", {traffic['sent'] / 1e6:.2f} MB sent" if traffic is not None else "")
            + f" ({seconds:.2f} s)"
        )
        if self.on_round is not None:
            self.on_round(record)
        return record

    def _staleness(self, reply: RoundReply) -> dict[str, int] | None:
        """FedBuff's staleness per contributor for the history, named; None on synchronous rounds
        or with more contributors than a history entry lists."""
        if not reply.staleness or len(reply.staleness) > PARTIES_LISTED:
            return None
        return {self._party_name(c): int(s) for c, s in reply.staleness.items()}

    def _release(self, round_number: int) -> float | None:
        """Write-ahead: the ledger holds the round's ε before any noisy value exists. A retried
        round is not charged again (its clients send the very same messages)."""
        if self.guard is None:
            return None
        if round_number > self._released:
            from fedshop.privacy.accounting import together

            self.guard.release(round_number, together(self.declared_events()))
            self._released = round_number
        return self.guard.epsilon

    def _check_noise(self, reply: RoundReply, aggregate: Aggregate) -> None:
        client = self.transport.client_dp_event
        for c in reply.contributors:
            if reply.client_dp_events.get(c) != client:
                raise PrivacyAccountingError(
                    f"client {c} added noise {reply.client_dp_events.get(c)}, but the ledger "
                    f"holds {client}; the round is not applied"
                )
        declared = self.server.pipeline.server_dp_events()
        if tuple(aggregate.dp_events) != tuple(declared):
            raise PrivacyAccountingError(
                f"the server added noise {aggregate.dp_events}, but the ledger holds {declared}; "
                "the round is not applied"
            )
        if self.guard is None and (client is not None or declared):
            raise PrivacyAccountingError("a round adds DP noise, but no ledger accounts it")

    def _pending_evaluation(self) -> int | None:
        """The latest round, when it is due for evaluation and its metrics have not arrived."""
        history = self.run.history
        if (
            history
            and history[-1].metrics is None
            and evaluated_after(self.config, history[-1].round)
        ):
            return history[-1].round
        return None

    def _settle(self, per_silo: dict[str, MetricSums]) -> None:
        history = self.run.history
        last = history[-1]
        history[-1] = replace(last, metrics=self._summarise(per_silo))
        headline = self._headline
        self.log(f"round {last.round}: {headline} {history[-1].metrics[headline]:.4f}")
