"""The simulated round schedule (fl/buffered.py): synchronous steps and FedBuff's buffer, checked
against what the clock (fl/timing.py) says each client takes, step by step."""

from __future__ import annotations

import pytest
import torch

from fedshop.config import load_config
from fedshop.fl.buffered import Schedule, discounted, model_bytes, staleness_weight
from fedshop.messages import ClientMessage

DOWN = 40_000  # bytes of the model each started client receives


def examples(client: int) -> float:
    """Each client's training examples: unequal, so that equal speeds still give unequal times."""
    return 50.0 * (client + 1)


def size(client: int) -> int:
    return 1_000 * (client + 1)


class Trainer:
    """The transport's side of a step: trains the clients it is given (each one's parcel names the
    client and how many times it was trained) and remembers who was started when."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.calls: list[list[int]] = []
        self.times = {}

    def __call__(self, clients: list[int]) -> dict:
        assert not set(clients) & self.schedule.busy(), "a client in flight was restarted"
        self.calls.append(list(clients))
        trained = {}
        for c in clients:
            self.times[c] = self.times.get(c, 0) + 1
            trained[c] = ((c, self.times[c]), size(c))
        return trained


def schedule_of(n_clients: int, epochs: int = 2, **communication) -> Schedule:
    overrides = {f"communication.{k}": v for k, v in communication.items()}
    config = load_config(overrides={"seed": 7, **overrides})
    return Schedule(config, n_clients, examples, epochs)


# -- synchronous ------------------------------------------------------------------------------------


def test_a_synchronous_step_trains_every_reporter_and_waits_for_the_slowest():
    schedule = schedule_of(6, client_speeds="lognormal")
    trainer = Trainer(schedule)
    clock, before = schedule.clock, 0.0
    for step in range(1, 4):
        clients = [0, 2, 3, 5] if step % 2 else [1, 2, 4]
        outcome = schedule.round(clients, trainer, DOWN, concurrency=0)
        assert trainer.calls[-1] == clients
        assert set(outcome.parcels) == set(clients)
        assert outcome.traffic.sent == {c: size(c) for c in clients}
        assert outcome.traffic.received == dict.fromkeys(clients, DOWN)
        slowest = max(
            size(c) / clock.uplink_bytes_per_second[c]
            + DOWN / clock.downlink_bytes_per_second[c]
            + examples(c) * 2 * clock.seconds_per_example[c]
            for c in clients
        )
        assert outcome.clock == pytest.approx(before + slowest, rel=1e-12)
        assert outcome.staleness == {} and outcome.discounts == {}
        before = outcome.clock


def test_a_synchronous_step_sends_the_model_to_dropouts_but_counts_nothing_from_them():
    schedule = schedule_of(40, dropout=0.4, round_timeout=500.0)
    trainer = Trainer(schedule)
    clients = list(range(40))
    outcome = schedule.round(clients, trainer, DOWN, concurrency=0)
    reporters = trainer.calls[-1]
    dropped = set(clients) - set(reporters)
    assert 5 <= len(dropped) <= 30  # 0.4 of 40, within any reasonable draw
    assert set(outcome.parcels) == set(reporters)
    assert outcome.traffic.sent == {c: size(c) for c in reporters}
    assert outcome.traffic.received == dict.fromkeys(clients, DOWN)  # dropouts included
    # Everyone else reports within a second; the server waits out the timeout for the dropouts.
    assert outcome.clock == pytest.approx(500.0)


# -- FedBuff ----------------------------------------------------------------------------------------


def test_fedbuff_keeps_concurrency_in_flight_takes_the_earliest_arrivals_and_discounts_them():
    """A reference record alongside the schedule: every started client's arrival from the clock.
    Each step must return the `buffer_size` earliest arrivals among what was in flight, in arrival
    order, with their staleness (steps since they started) and (1 + s)^-exponent; the slots the
    arrivals freed are refilled as the next step begins."""
    concurrency, buffer, exponent = 5, 3, 0.5
    schedule = schedule_of(
        12, schedule="fedbuff", buffer_size=buffer, concurrency=concurrency,
        client_speeds="lognormal", speed_sigma=1.0, staleness_exponent=exponent,
    )  # fmt: skip
    clock = schedule.clock
    pending: dict[int, tuple[float, int]] = {}  # client → (arrival, step it started at)
    trained_in_step: list[int] = []

    def train(clients: list[int]) -> dict:
        assert not set(clients) & schedule.busy(), "a client in flight was restarted"
        assert len(schedule.in_flight) + len(clients) <= concurrency
        for c in clients:
            duration = (
                DOWN / clock.downlink_bytes_per_second[c]
                + examples(c) * 2 * clock.seconds_per_example[c]
                + size(c) / clock.uplink_bytes_per_second[c]
            )
            pending[c] = (schedule.now + duration, step)
        trained_in_step.extend(clients)
        return {c: ((c, step), size(c)) for c in clients}

    stale_seen = 0
    for step in range(20):
        trained_in_step.clear()
        offered = list(range(12))  # every client is sampled each step: busy ones are skipped
        outcome = schedule.round(offered, train, DOWN, concurrency)
        arrivals = [pending[c][0] for c in outcome.parcels]
        assert len(outcome.parcels) == buffer
        assert arrivals == sorted(arrivals)  # in arrival order
        assert outcome.clock == pytest.approx(arrivals[-1], rel=1e-12)
        left = [pending[c][0] for c in pending if c not in outcome.parcels]
        assert all(a >= arrivals[-1] for a in left)  # nobody still in flight arrived earlier
        assert outcome.staleness == {c: step - pending[c][1] for c in outcome.parcels}
        for c in outcome.parcels:
            assert outcome.parcels[c] == (c, pending[c][1])  # trained when it started
            assert outcome.discounts[c] == pytest.approx((1 + outcome.staleness[c]) ** -exponent)
        assert outcome.traffic.sent == {c: size(c) for c in outcome.parcels}
        assert outcome.traffic.received == dict.fromkeys(trained_in_step, DOWN)
        for c in outcome.parcels:
            del pending[c]
        # The arrivals' slots are refilled as the next step begins.
        assert len(schedule.in_flight) == len(pending) == concurrency - buffer
        stale_seen += sum(s > 0 for s in outcome.staleness.values())
    assert stale_seen > 0  # lognormal speeds: slow clients arrive steps after they started


def test_fedbuff_with_equal_speeds_and_a_full_buffer_is_the_synchronous_schedule():
    n = 5
    buffered = schedule_of(n, schedule="fedbuff", buffer_size=n, concurrency=n)
    synchronous = schedule_of(n)
    for _ in range(4):
        a = buffered.round(range(n), Trainer(buffered), DOWN, n)
        b = synchronous.round(list(range(n)), Trainer(synchronous), DOWN, n)
        assert a.clock == pytest.approx(b.clock, rel=1e-12)
        assert set(a.parcels) == set(b.parcels) == set(range(n))
        assert a.staleness == dict.fromkeys(range(n), 0)
        assert a.discounts == dict.fromkeys(range(n), 1.0)
        assert a.traffic.sent == b.traffic.sent
        assert a.traffic.received == b.traffic.received
        assert buffered.in_flight == []


def test_fedbuff_dropouts_never_arrive_and_give_their_slot_up_at_the_timeout():
    schedule = schedule_of(
        30, schedule="fedbuff", buffer_size=2, concurrency=6, dropout=0.3, round_timeout=50.0
    )
    trainer = Trainer(schedule)
    parcels, lost_starts = [], 0
    for _ in range(25):
        now, calls = schedule.now, len(trainer.calls)
        outcome = schedule.round(range(30), trainer, DOWN, 6)
        started = set(outcome.traffic.received)  # the model went to every client started
        trained = set().union(*trainer.calls[calls:])
        assert trained <= started
        lost = started - trained
        lost_starts += len(lost)
        assert not lost & set(outcome.parcels)  # a dropout never reports
        for pending in schedule.in_flight:  # it holds its slot until the timeout, no longer
            if pending.client in lost:
                assert pending.parcel is None
                assert now + 50.0 <= pending.arrives <= outcome.clock + 50.0
        assert all(p.arrives >= outcome.clock for p in schedule.in_flight)
        parcels += list(outcome.parcels.values())
    assert lost_starts > 0, "with dropout 0.3 some of the started clients drop out"
    assert len(set(parcels)) == len(parcels)  # each trained start arrives once


def test_fedbuff_is_not_stuck_when_every_slot_holds_a_dropout():
    # Seed 7's first start drops out: the one slot is the dropout's until the 10 s timeout.
    schedule = schedule_of(3, schedule="fedbuff", buffer_size=1, concurrency=1, dropout=0.5,
                           round_timeout=10.0)  # fmt: skip
    trainer = Trainer(schedule)
    outcomes = [schedule.round([0, 1, 2], trainer, DOWN, 1) for _ in range(6)]
    assert sum(bool(o.parcels) for o in outcomes) >= 3
    assert outcomes[-1].clock >= 10.0


def test_fedbuff_refills_the_slots_of_dropouts_and_steps_on_a_full_buffer():
    schedule = schedule_of(
        30, schedule="fedbuff", buffer_size=2, concurrency=6, dropout=0.3, round_timeout=50.0
    )
    trainer = Trainer(schedule)
    sizes = [len(schedule.round(range(30), trainer, DOWN, 6).parcels) for _ in range(25)]
    assert sizes == [2] * 25


def test_staleness_discount_and_model_bytes_by_hand():
    assert staleness_weight(0, 0.5) == 1.0
    assert staleness_weight(3, 0.5) == pytest.approx(0.5)
    assert staleness_weight(7, 1.0) == pytest.approx(1 / 8)
    assert staleness_weight(5, 0.0) == 1.0
    message = ClientMessage({"w": torch.tensor([2.0, -4.0])}, weight=3.0, num_examples=3.0,
                            local_steps=2)  # fmt: skip
    half = discounted(message, 0.5)
    assert torch.equal(half.tensors["w"], torch.tensor([1.0, -2.0]))
    assert (half.weight, half.num_examples, half.local_steps) == (3.0, 3.0, 2)
    assert discounted(message, 1.0) is message
    assert model_bytes({"a": torch.zeros(10, 4), "b": torch.zeros(10, dtype=torch.float64)}) == (
        4 * 40 + 4 * 10
    )
