"""Noise that accounts for itself: what a noise stage declares (and the ledger holds) is the noise it
draws, for user-level DP (server noise on the shoppers' sum) and record-level DP (DP-SGD in each silo),
and the round driver refuses a round whose noise differs from what it accounted."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedshop.config import load_config
from fedshop.experiment import open_privacy
from fedshop.fl.client import LocalTask
from fedshop.fl.cross_device import eligible_clients, run_cross_device
from fedshop.fl.dp_local import DpSgd, DpSgdState, dp_sgd_steps
from fedshop.fl.in_process import (
    SiloTransport,
    build_federation,
    start_private_silos,
)
from fedshop.fl.local_round import LocalTraining
from fedshop.fl.rounds import PrivacyAccountingError, RoundDriver
from fedshop.messages import Aggregate
from fedshop.models.spec import get_model
from fedshop.privacy.accounting import event_from_data, event_to_data, gaussian_step, repeated
from fedshop.privacy.noise import GaussianNoise
from fedshop.seeding import NoiseStream, standard_normal
from fedshop.storage.ledger import Ledger

ROUNDS = 2


def _ledger(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.sqlite'}"


@pytest.mark.parametrize(
    "source", [torch.Generator().manual_seed(0), NoiseStream.secret()], ids=["torch", "secret"]
)
def test_gaussian_noise_draws_what_its_event_states(source):
    stage = GaussianNoise(2.0, 0.5, source, sampling_rate=0.1)
    zeros = Aggregate({"w": torch.zeros(200_000, dtype=torch.float64)}, 1.0, 1)
    noisy = stage(zeros)
    # std z·C = 1 on every coordinate, and the event names z and q.
    assert noisy.tensors["w"].std().item() == pytest.approx(1.0, rel=0.01)
    assert noisy.dp_events == (stage.dp_event,) == (gaussian_step(2.0, 0.1),)
    assert stage.dp_event.sampling_probability == 0.1
    assert stage.dp_event.event.noise_multiplier == 2.0


@pytest.mark.parametrize("secret", [False, True], ids=["torch-generator", "noise-stream"])
def test_dp_sgd_draws_one_noise_per_step_and_says_so(retail, secret):
    """The noise stream advances by exactly `steps` full draws over the shared model, each of
    std z·C, and the returned event is the declared one; a run's secret `NoiseStream` alike."""
    silo = retail.silo(1)
    config = load_config(overrides={"model.dim": 8, "model.silo_item_bias": False})
    spec = get_model("mf-bpr")
    shared = spec.init_shared(retail.n_items, config.model, torch.Generator().manual_seed(1))
    private = spec.init_private(
        silo.n_users, retail.n_items, config.model, torch.Generator().manual_seed(2)
    )
    dp = DpSgd(noise_multiplier=1.5, clip=0.2, sampling_rate=0.3, steps=3)
    streams = {s: torch.Generator().manual_seed(i) for i, s in enumerate(DpSgdState.STREAMS)}
    if secret:
        streams |= {"sampling": NoiseStream.secret(), "noise": NoiseStream.secret()}
    state = DpSgdState.start(0.01, streams)
    noise_before = state.noise.get_state()
    _, event = dp_sgd_steps(
        spec, shared, private, silo.train, dp, LocalTraining(1, 1.0, 0.01, 1), state
    )
    assert event == dp.dp_event == repeated(gaussian_step(1.5, 0.3), 3)
    replay = NoiseStream.secret() if secret else torch.Generator()
    replay.set_state(noise_before)
    for _ in range(dp.steps):
        for value in shared.values():
            standard_normal(value.shape, value.dtype, replay)
    assert torch.equal(replay.get_state(), state.noise.get_state())


def test_record_level_rounds_release_exactly_the_silos_noise(retail, tmp_path):
    config = load_config(
        overrides={
            "methods": ["federated"], "model.dim": 8, "federated.rounds": ROUNDS,
            "privacy.mode": "record", "privacy.noise_multiplier": 1.2, "privacy.budget": 1e3,
            "privacy.local_steps": 2, "privacy.ledger_url": _ledger(tmp_path),
            "federated.personalise_epochs": 0,
        }
    )  # fmt: skip
    guard = open_privacy(config, retail)
    run = build_federation(retail, config)
    start_private_silos(run.clients, config, guard.plan)
    task = LocalTask.of_run(config, guard.plan)
    transport = SiloTransport(run.clients, task, "test", 0, None)
    seen = []

    class Watching(SiloTransport):
        def train(self, *args):
            reply = super().train(*args)
            seen.append(reply.client_dp_events)
            return reply

    watching = Watching(
        **{f.name: getattr(transport, f.name) for f in dataclasses.fields(transport)}
    )
    RoundDriver(config, run.server, watching, guard).run_all()
    # Every silo, every round, drew the plan's DP-SGD noise; the ledger holds that event per round.
    assert len(seen) == ROUNDS
    for events in seen:
        assert set(events) == set(range(retail.n_silos))
        assert set(events.values()) == {guard.plan.round_event}
    steps = [step for step, _ in guard.history]
    assert steps == [-1, *range(1, ROUNDS + 1)]  # the counts' release, then each round
    assert guard.epsilon == pytest.approx(guard.plan.planned_epsilon())
    assert Ledger(_ledger(tmp_path)).balances()[0].spent_epsilon == pytest.approx(guard.epsilon)


def test_a_silo_adding_other_noise_than_accounted_is_refused(retail, tmp_path):
    config = load_config(
        overrides={
            "methods": ["federated"], "model.dim": 8, "federated.rounds": 1,
            "privacy.mode": "record", "privacy.noise_multiplier": 1.2, "privacy.budget": 1e3,
            "privacy.ledger_url": _ledger(tmp_path), "federated.personalise_epochs": 0,
        }
    )  # fmt: skip
    guard = open_privacy(config, retail)
    run = build_federation(retail, config)
    start_private_silos(run.clients, config, guard.plan)
    task = LocalTask.of_run(config, guard.plan)
    # The silos run half the planned noise while the ledger is written for the plan.
    weaker = LocalTask(task.epochs, dp=dataclasses.replace(task.dp, noise_multiplier=0.6))

    class Underclaiming(SiloTransport):
        @property
        def client_dp_event(self):
            return task.dp.dp_event

    transport = Underclaiming(run.clients, weaker, "test", 0, None)
    before = {k: v.clone() for k, v in run.server.shared.items()}
    with pytest.raises(PrivacyAccountingError, match="the round is not applied"):
        RoundDriver(config, run.server, transport, guard).run_all()
    assert all(torch.equal(before[k], v) for k, v in run.server.shared.items())


def test_user_level_rounds_release_exactly_the_servers_noise(retail, tmp_path):
    config = load_config(
        overrides={
            "methods": ["federated"], "model.dim": 8, "federated.rounds": ROUNDS,
            "federated.mode": "cross-device", "federated.clients_per_round": 500,
            "privacy.mode": "user", "privacy.noise_multiplier": 0.8, "privacy.clip": 0.3,
            "privacy.budget": 1e3, "privacy.ledger_url": _ledger(tmp_path),
            "federated.personalise_epochs": 0, "eval.eval_every": 100,
        }
    )  # fmt: skip
    guard = open_privacy(config, retail)
    run = run_cross_device(retail, config, guard=guard)
    pool = len(eligible_clients(retail.train))
    expected = gaussian_step(0.8, 500 / pool)
    assert guard.plan.round_event == expected
    assert [step for step, _ in guard.history] == list(range(1, ROUNDS + 1))
    # Poisson sampling at the accounted rate: about q·n shoppers a round.
    sizes = [len(record.clients) for record in run.history]
    assert all(abs(size - 500) < 5 * np.sqrt(500) for size in sizes)


def test_events_cross_the_network_unchanged():
    for event in (gaussian_step(1.1), gaussian_step(0.7, 0.05), repeated(gaussian_step(2, 0.1), 5)):
        assert event_from_data(event_to_data(event)) == event
