"""When a round's messages reach the server, on the simulated clock: synchronous rounds, or FedBuff.

Synchronous: the round's sampled clients all train on the same model and the server waits for the
last of them (`fl/timing.py`). FedBuff (Nguyen et al., "Federated Learning with Buffered
Asynchronous Aggregation", AISTATS 2022): `concurrency` clients train at once, each on the model of
the step at which it started; the server steps as soon as `buffer_size` updates have arrived,
each weighted by (1 + staleness)^-exponent, where staleness counts the server steps since the
update's client started, and at once starts new clients in the freed slots. A slow client no longer
holds every step; its update arrives late and counts less.

`Schedule.round` sits between a transport's per-client messages and the round's sum: the transport
says how to train a list of clients (each client's encoded message, a "parcel", and its size), and
gets back the parcels the server sums this step with their staleness discounts, the bytes each party
sent and received, and the simulated time at which the step happens. A client trains when it starts
(on the model it was sent then); the buffer holds its parcel until its arrival time.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fedshop.config import RunConfig
from fedshop.fl.rounds import Traffic
from fedshop.fl.timing import ClientClock, synchronous_round_seconds
from fedshop.messages import ClientMessage, Tensors

# What a transport's training of some clients returns: per client, its message as it travels (a
# parcel the transport opens when it arrives) and the bytes it takes on the wire.
Trained = dict[int, tuple[Any, int]]
TrainClients = Callable[[list[int]], Trained]


def model_bytes(shared: Tensors) -> int:
    """What sending the shared model to one client costs: every tensor as float32."""
    return sum(4 * v.numel() for v in shared.values())


def staleness_weight(staleness: int, exponent: float) -> float:
    """FedBuff's polynomial staleness discount, 1 / (1 + s)^exponent."""
    return float((1 + staleness) ** -exponent)


def discounted(message: ClientMessage, weight: float) -> ClientMessage:
    """The update scaled down, its weight in the denominator kept: a stale update moves the model
    less, as in FedBuff's weighted sum divided by the buffer size. Bookkeeping columns ("__…", such
    as FedNova's step counts and the row weights) are counts, not update: they stay."""
    if weight == 1.0:
        return message
    tensors = {k: v if k.startswith("__") else v * weight for k, v in message.tensors.items()}
    return replace(message, tensors=tensors)


@dataclass(order=True)
class Pending:
    """A started client's update on its way to the server."""

    arrives: float  # simulated seconds; a dropout's is when its slot is given up
    client: int = field(compare=False)
    version: int = field(compare=False)  # the server step whose model it trained on
    parcel: Any = field(compare=False)  # None: it dropped out
    sent: int = field(compare=False, default=0)


@dataclass
class StepOutcome:
    parcels: dict[int, Any]  # what the server sums this step, by client
    traffic: Traffic
    clock: float | None  # simulated seconds since the run started, when the server steps
    staleness: dict[int, int] = field(default_factory=dict)  # FedBuff: per contributor
    discounts: dict[int, float] = field(default_factory=dict)  # FedBuff: each update's weight

    def discount(self, client: int, message: ClientMessage) -> ClientMessage:
        return discounted(message, self.discounts.get(client, 1.0))


class Schedule:
    """The simulated clock of a run's rounds, and FedBuff's buffer when it is on."""

    def __init__(
        self, config: RunConfig, n_clients: int, examples: Callable[[int], float], epochs: int
    ) -> None:
        com = config.communication
        self.clock = ClientClock.of(com, n_clients, config.seed)
        self.examples, self.epochs = examples, epochs
        self.buffered = com.schedule == "fedbuff"
        self.buffer_size = com.buffer_size
        self.exponent = com.staleness_exponent
        self.now = 0.0
        self.version = 0  # server steps taken
        self.in_flight: list[Pending] = []  # a heap by arrival

    def busy(self) -> set[int]:
        return {p.client for p in self.in_flight}

    def round(
        self, clients: Sequence[int], train: TrainClients, down_bytes: int, concurrency: int
    ) -> StepOutcome:
        """One server step. Synchronous: `clients` all train now. FedBuff: of `clients`, those not
        already training start, up to `concurrency` in flight; the step takes the first
        `buffer_size` arrivals."""
        if self.buffered:
            return self._buffered(clients, train, down_bytes, concurrency)
        return self._synchronous(list(clients), train, down_bytes)

    def _durations(self, trained: Trained, clients: Sequence[int], down_bytes: int) -> dict:
        return {
            c: self.clock.duration(
                c, self.examples(c), self.epochs, trained[c][1] if c in trained else 0, down_bytes
            )
            for c in clients
        }

    def _synchronous(self, clients: list[int], train: TrainClients, down_bytes: int) -> StepOutcome:
        dropped = self.clock.drop_outs(clients)
        trained = train([c for c in clients if c not in dropped])
        durations = self._durations(trained, clients, down_bytes)
        self.now += synchronous_round_seconds(self.clock, durations, dropped)
        self.version += 1
        traffic = Traffic(
            sent={c: trained[c][1] for c in trained}, received=dict.fromkeys(clients, down_bytes)
        )
        return StepOutcome({c: parcel for c, (parcel, _) in trained.items()}, traffic, self.now)

    def _buffered(
        self, clients: Sequence[int], train: TrainClients, down_bytes: int, concurrency: int
    ) -> StepOutcome:
        busy = self.busy()
        waiting = [c for c in clients if c not in busy]  # may start during this step, in order
        started: list[int] = []

        def refill() -> None:
            nonlocal waiting
            free = max(concurrency - len(self.in_flight), 0)
            starting, waiting = waiting[:free], waiting[free:]
            self._start(starting, train, down_bytes)
            started.extend(starting)

        # Free slots are filled as the step begins. Slots freed during the step wait for the next
        # one (which starts on arrival of the buffer's last update): a small delay for those
        # clients, and it lets a step's starts train as one vectorised batch. Only when nothing
        # that will report is in flight (only dropouts) are slots refilled at once.
        refill()
        arrived: list[Pending] = []
        while len(arrived) < self.buffer_size:
            if not self._any_coming():
                refill()
            if not self.in_flight:
                break
            pending = heapq.heappop(self.in_flight)
            self.now = max(self.now, pending.arrives)
            if pending.parcel is not None:  # a dropout only frees its slot
                arrived.append(pending)
        staleness = {p.client: self.version - p.version for p in arrived}
        discounts = {c: staleness_weight(s, self.exponent) for c, s in staleness.items()}
        self.version += 1
        traffic = Traffic(
            sent={p.client: p.sent for p in arrived}, received=dict.fromkeys(started, down_bytes)
        )
        parcels = {p.client: p.parcel for p in arrived}
        return StepOutcome(parcels, traffic, self.now, staleness, discounts)

    def _any_coming(self) -> bool:
        """Whether anything in flight will report (rather than only dropouts)."""
        return any(p.parcel is not None for p in self.in_flight)

    def _start(self, starting: list[int], train: TrainClients, down_bytes: int) -> None:
        """Send the model to `starting` now; each trains at once and its update arrives after its
        duration, or, if it drops out, its slot is given up at the timeout."""
        if not starting:
            return
        dropped = self.clock.drop_outs(starting)
        trained = train([c for c in starting if c not in dropped])
        durations = self._durations(trained, starting, down_bytes)
        given_up = self.clock.timeout(list(durations.values()))
        for c in starting:
            if c in dropped:
                heapq.heappush(self.in_flight, Pending(self.now + given_up, c, self.version, None))
            else:
                parcel, sent = trained[c]
                pending = Pending(self.now + durations[c], c, self.version, parcel, sent)
                heapq.heappush(self.in_flight, pending)


def unscheduled(clients: list[int], train: TrainClients, down_bytes: int) -> StepOutcome:
    """A synchronous step without a clock (a transport built without a `Schedule`)."""
    trained = train(clients)
    sent = {c: size for c, (_, size) in trained.items()}
    parcels = {c: parcel for c, (parcel, _) in trained.items()}
    return StepOutcome(parcels, Traffic(sent, dict.fromkeys(clients, down_bytes)), None)
