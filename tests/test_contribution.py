"""Each silo's contribution (issue 21, item 3): GTG-Shapley and leave-one-out from the rounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedshop.config import ConfigError, load_config
from fedshop.fl.client import SiloClient
from fedshop.fl.contribution import (
    CachedUtility,
    exact_shapley,
    gtg_shapley,
    leave_one_out,
)
from fedshop.fl.in_process import run_cross_silo


def game(players: list[int]):
    """A small non-additive game: each player's worth plus a bonus for pairs (0, 1)."""
    worth = {0: 3.0, 1: 1.0, 2: 0.5, 3: -1.0}

    def v(subset: frozenset[int]) -> float:
        return sum(worth[i] for i in subset) + (2.0 if {0, 1} <= subset else 0.0)

    return v


def test_exact_shapley_of_a_known_game():
    players = [0, 1, 2, 3]
    values = exact_shapley(players, game(players))
    # The pair bonus is shared equally; the rest is each player's own worth.
    assert values == pytest.approx({0: 4.0, 1: 2.0, 2: 0.5, 3: -1.0})
    assert leave_one_out(players, game(players)) == pytest.approx({0: 5.0, 1: 3.0, 2: 0.5, 3: -1.0})


def test_gtg_converges_to_exact_and_truncation_saves_evaluations():
    players = [0, 1, 2, 3]
    rng = np.random.default_rng(0)
    estimate = gtg_shapley(players, game(players), 2000, 0.0, rng)
    assert estimate.values == pytest.approx(exact_shapley(players, game(players)), abs=0.1)
    # Efficiency of every permutation: the values sum to v(N) − v(∅) exactly without truncation.
    assert sum(estimate.values.values()) == pytest.approx(3.5 + 2.0)
    # A game where one player holds all the value: with truncation a permutation stops as soon as
    # that player is in, and the others are never evaluated after it.
    dominant = CachedUtility(lambda s: 1.0 if 0 in s else 0.0)
    truncated = gtg_shapley(list(range(8)), dominant, 8, 0.05, np.random.default_rng(1))
    assert truncated.values[0] == pytest.approx(1.0) and dominant.evaluations < 2**8 / 4


def small_config(**overrides):
    """Four silos (the smallest countries merged), a small model, a few rounds."""
    return load_config(
        overrides={
            "seed": 2,
            "model.dim": 8,
            "data.max_silos": 4,
            "federated.rounds": 3,
            "methods": ["federated"],
            "federated.personalise_epochs": 0,
            **overrides,
        }
    )


@pytest.fixture(scope="module")
def retail4():
    from fedshop.data.datasets import load_dataset

    return load_dataset(small_config().data, seed=2)


@pytest.fixture(scope="module")
def exact_run(retail4):
    config = small_config(**{"contribution.method": "exact", "contribution.round_tolerance": 0.0})
    return run_cross_silo(retail4, config)


def test_exact_and_gtg_agree_on_the_same_rounds(exact_run):
    """GTG-Shapley (no truncation, many permutations) on the exact run's own round evaluations
    gives the exact values; with the default truncation it stays close."""
    meter_rounds = exact_run.contribution["per_round"]
    for record in meter_rounds:
        assert not record["skipped"]
    block = exact_run.contribution
    assert block["method"] == "exact Shapley" and block["evaluations"] == 3 * 2**4
    names = list(block["per_silo"])
    for r, record in enumerate(meter_rounds):
        utilities = exact_run_utilities(exact_run, r)
        players = sorted(next(s for s in utilities if len(s) == len(names)))
        exact = exact_shapley(players, utilities.__getitem__)
        assert [exact[i] for i in players] == pytest.approx(
            [record["shapley"][names[i]] for i in players]
        )
        rng = np.random.default_rng(r)
        gtg = gtg_shapley(players, utilities.__getitem__, 2000, 0.0, rng).values
        scale = max(abs(v) for v in exact.values())
        for i in players:
            assert gtg[i] == pytest.approx(exact[i], abs=0.1 * scale), names[i]


def exact_run_utilities(run, r: int) -> dict:
    return run.contribution_rounds[r].utilities


def test_shapley_values_are_efficient(exact_run):
    """Per round, the silos' Shapley values sum to the round's utility gain v(N) − v(∅)."""
    for record in exact_run.contribution["per_round"]:
        total = sum(record["shapley"].values())
        assert total == pytest.approx(record["full"] - record["empty"], abs=1e-9)
    block = exact_run.contribution
    summed = sum(v["shapley"] for v in block["per_silo"].values())
    assert summed == pytest.approx(block["utility_gain"], abs=1e-9)
    # Leave-one-out from the same evaluations: v(N) − v(N ∖ i).
    names = list(block["per_silo"])
    for r, record in enumerate(block["per_round"]):
        utilities = exact_run_utilities(exact_run, r)
        full = frozenset(range(len(names)))
        for i, name in enumerate(names):
            expected = utilities[full] - utilities[full - {i}]
            assert record["leave_one_out"][name] == pytest.approx(expected)


@pytest.fixture(scope="module")
def germany_attacks(retail4) -> dict[str, dict[str, float]]:
    """Per attack (and none), each silo's exact Shapley value when Germany (a middle-sized silo)
    attacks: every subset of every round valued, on all customers."""
    from fedshop.fl.poisoning import PoisonedSilo

    config = small_config(
        **{"federated.rounds": 4, "contribution.method": "exact", "contribution.customers": 0}
    )
    bad = retail4.silo_names.index("Germany")
    values = {}
    for attack in ("none", "free-ride", "sign-flip"):

        def hook(clients, attack=attack):
            if attack == "none":
                return clients
            return [PoisonedSilo(c, attack, 10.0, config.seed) if i == bad else c
                    for i, c in enumerate(clients)]  # fmt: skip

        block = run_cross_silo(retail4, config, clients_hook=hook).contribution
        values[attack] = {silo: v["shapley"] for silo, v in block["per_silo"].items()}
    return values


def test_a_sign_flipping_silo_has_the_lowest_value_and_a_negative_one(germany_attacks):
    shapley = germany_attacks["sign-flip"]
    assert min(shapley, key=shapley.get) == "Germany" and shapley["Germany"] < 0, shapley


def test_a_free_riding_silo_loses_its_value(germany_attacks):
    """In this four-silo case, free-riding, Germany is worth less than when it took part honestly,
    and less than nothing. It is not the lowest: the honest "Rest of world" silo's updates are
    worth about as little (below zero) to a utility that is mostly the United Kingdom's customers.
    Nor does this hold everywhere: in benchmarks/contribution.py (11 silos, GTG, 10 rounds) honest
    France is worth less than free-riding France."""
    honest, riding = germany_attacks["none"], germany_attacks["free-ride"]
    assert riding["Germany"] < 0 and riding["Germany"] < honest["Germany"], (honest, riding)
    assert riding["Germany"] < riding["United Kingdom"]


def test_metrics_json_carries_each_silos_value(retail4):
    """Through `run_experiment` and the run folder's metrics.json: the storefront that [attack]
    draws (here the United Kingdom) flips its updates, and its value is the lowest, negative."""
    from fedshop.experiment import run_experiment
    from fedshop.fl.poisoning import attacker_silos
    from fedshop.report.run_folder import metrics_document

    config = small_config(**{"attack.kind": "sign-flip", "federated.rounds": 2})
    block = metrics_document(run_experiment(config, retail4))["contribution"]
    attacker = retail4.silo_names[attacker_silos(config.attack, retail4.n_silos, config.seed)[0]]
    assert block["available"] and block["method"] == "GTG-Shapley"
    assert block["utility"] == "ndcg@10" and block["split"] == "test"
    assert set(block["per_silo"]) == set(retail4.silo_names)
    shapley = {silo: v["shapley"] for silo, v in block["per_silo"].items()}
    assert min(shapley, key=shapley.get) == attacker and shapley[attacker] < 0


def test_no_contribution_under_secure_aggregation(retail4):
    config = small_config(**{"protection.kind": "secagg", "federated.rounds": 1})
    run = run_cross_silo(retail4, config)
    assert run.contribution["available"] is False
    assert "only the sum" in run.contribution["reason"]


def test_method_none_adds_no_evaluation_and_contribution_changes_nothing(retail4, monkeypatch):
    calls = []
    evaluate = SiloClient.evaluate

    def counted(self, *args, **kwargs):
        calls.append(self.name)
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(SiloClient, "evaluate", counted)
    config = small_config(**{"federated.rounds": 2})
    off_config = small_config(**{"federated.rounds": 2, "contribution.method": "none"})
    off = run_cross_silo(retail4, off_config)
    # Without contribution: each round's evaluation and the final one, every silo once each.
    assert len(calls) == (2 + 1) * retail4.n_silos
    assert off.contribution == {"available": False, "reason": off.contribution["reason"]}
    assert "none" in off.contribution["reason"]
    calls.clear()
    on = run_cross_silo(retail4, config)
    assert len(calls) > (2 + 1) * retail4.n_silos and on.contribution["available"]
    # Valuing the rounds reads the silos' updates and evaluates; it changes no training.
    for name, tensor in off.server.shared.items():
        assert torch.equal(tensor, on.server.shared[name]), name
    assert on.final == off.final


def test_the_report_shows_the_contribution(exact_run):
    from fedshop.report.html import contribution_section

    page = contribution_section(exact_run.contribution)
    assert "Contribution of each silo" in page and "exact Shapley" in page
    for silo in exact_run.contribution["per_silo"]:
        assert silo in page
    assert "secure" in contribution_section({"available": False, "reason": "secure sums"})


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("method", "banzhaf", "method must be one of"),
        ("utility", "recall@20", "utility must be one of"),
        ("permutations", 0, "permutations must be at least 1"),
        ("tolerance", 1.0, "tolerance must be in"),
        ("customers", -1, "customers must be at least 0"),
    ],
)
def test_config_refuses_bad_contribution_settings(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides={f"contribution.{key}": value})


def test_free_ride_sends_noise_of_an_honest_norm_with_its_real_weight(retail4):
    from fedshop.fl.aggregation import STEPS_KEY
    from fedshop.fl.client import LocalTask
    from fedshop.fl.in_process import build_federation
    from fedshop.fl.poisoning import PoisonedSilo

    config = small_config()
    run, twin = build_federation(retail4, config), build_federation(retail4, config)
    rider = PoisonedSilo(run.clients[1], "free-ride", config.attack.scale, config.seed)
    task = LocalTask.of_run(config)
    sent, honest = rider.fit(run.server.shared, task), twin.clients[1].fit(run.server.shared, task)
    assert sent.weight == honest.weight and sent.num_examples == honest.num_examples
    for name, tensor in sent.tensors.items():
        if name == STEPS_KEY:
            assert torch.equal(tensor, honest.tensors[name])
        else:
            assert float(tensor.norm()) == pytest.approx(float(honest.tensors[name].norm()))
            cosine = torch.nn.functional.cosine_similarity(
                tensor.flatten(), honest.tensors[name].flatten(), dim=0
            )
            assert abs(float(cosine)) < 0.2, name  # noise: no direction of the honest update


def test_cross_device_runs_say_why_they_have_no_contribution(retail4):
    from fedshop.experiment import run_experiment

    config = small_config(
        **{"federated.mode": "cross-device", "federated.rounds": 1, "model.silo_item_bias": False}
    )
    block = run_experiment(config, retail4).contribution
    assert block["available"] is False and "cross-device" in block["reason"]
