"""A server that does not trust every party (issue 21): garbage refused, robust aggregation rules."""

from __future__ import annotations

import math

import pytest
import torch

from fedshop.config import ConfigError, load_config
from fedshop.fl.client import LocalTask
from fedshop.fl.in_process import (
    SiloTransport,
    build_federation,
    run_cross_silo,
    server_pipeline,
)
from fedshop.fl.robust import (
    BadMessageError,
    CoordinateMedian,
    MultiKrum,
    NormBound,
    TrimmedMean,
    check_message,
    expected_layout,
    screen,
)
from fedshop.fl.rounds import RoundDriver
from fedshop.messages import AggregationPipeline, ClientMessage, mean_of, sum_messages


def message(values, weight=1.0) -> ClientMessage:
    """A client's staged message whose own update is `values` (tensors = update · weight)."""
    update = torch.tensor(values, dtype=torch.float32)
    return ClientMessage({"w": update * weight}, weight, num_examples=weight, local_steps=1)


def honest_and_one_attacker() -> list[ClientMessage]:
    honest = [message([1.0, 1.0]), message([1.2, 0.8]), message([0.8, 1.1]), message([1.1, 0.9])]
    return [*honest, message([-100.0, 100.0])]


def test_each_rule_computes_what_its_paper_says():
    updates = [message([1.0, 10.0]), message([2.0, 20.0]), message([100.0, -5.0], weight=3.0)]
    assert torch.allclose(mean_of(CoordinateMedian()(updates))["w"], torch.tensor([2.0, 10.0]))
    five = [message([float(v)]) for v in (1, 2, 3, 4, 100)]
    # 20 % trimmed at each end of five values: one from each end, the mean of 2, 3, 4.
    assert torch.allclose(mean_of(TrimmedMean(0.2)(five))["w"], torch.tensor([3.0]))
    # Norm bound: [3, 4] (norm 5) becomes [0.6, 0.8]; [0.3, 0.4] stays; weighted mean 1:1.
    bounded = mean_of(NormBound(1.0)([message([3.0, 4.0]), message([0.3, 0.4])]))["w"]
    assert torch.allclose(bounded, torch.tensor([0.45, 0.6]))


def test_robust_rules_resist_one_attacker_where_the_mean_does_not():
    messages = honest_and_one_attacker()
    plain = mean_of(sum_messages(messages))["w"]
    assert plain.abs().max() > 15  # one attacker moves the mean anywhere
    for rule in (CoordinateMedian(), TrimmedMean(0.2), MultiKrum(1), NormBound(2.0)):
        robust = mean_of(rule(messages))["w"]
        assert torch.allclose(robust, torch.tensor([1.0, 1.0]), atol=0.6), type(rule).__name__


def test_krum_leaves_the_attacker_out():
    messages = honest_and_one_attacker()
    estimate = mean_of(MultiKrum(1)(messages))["w"]
    honest = mean_of(sum_messages(messages[:4]))["w"]
    assert torch.allclose(estimate, honest, atol=1e-5)


def test_rules_refuse_too_few_updates():
    with pytest.raises(Exception, match="Krum tolerates"):
        MultiKrum(2)([message([1.0])] * 3)


@pytest.mark.parametrize(
    "bad, reason",
    [
        (ClientMessage({"w": torch.tensor([math.nan, 1.0])}, 1.0, 1.0, 1), "NaN or infinite"),
        (ClientMessage({"w": torch.tensor([math.inf, 1.0])}, 1.0, 1.0, 1), "NaN or infinite"),
        (ClientMessage({"w": torch.zeros(3)}, 1.0, 1.0, 1), "layout"),
        (ClientMessage({"v": torch.zeros(2)}, 1.0, 1.0, 1), "layout"),
        (ClientMessage({"w": torch.zeros(2)}, -1.0, 1.0, 1), "not negative"),
        (ClientMessage({"w": torch.tensor([1e6, 0.0])}, 1.0, 1.0, 1), "above the bound"),
    ],
)
def test_garbage_is_refused_with_its_reason(bad, reason):
    layout = expected_layout(AggregationPipeline(), {"w": torch.zeros(2)})
    with pytest.raises(BadMessageError, match=reason):
        check_message(bad, layout, max_norm=1000.0)
    kept, refused = screen({0: message([1.0, 2.0]), 1: bad}, layout, max_norm=1000.0)
    assert list(kept) == [0] and reason.split()[0] in refused[1]


def small_config(**overrides):
    return load_config(
        overrides={
            "seed": 2,
            "model.dim": 8,
            "federated.rounds": 2,
            "methods": ["federated"],
            "federated.personalise_epochs": 0,
            **overrides,
        }
    )


def test_a_silo_sending_garbage_is_refused_and_the_round_goes_on(retail):
    config = small_config()
    run = build_federation(retail, config)
    assert run.server.pipeline.summation is server_pipeline(config).summation
    saboteur = run.clients[1]
    honest_fit = saboteur.fit

    def garbage(shared, task):  # the attack: a well-formed message full of NaN
        sent = honest_fit(shared, task)
        return ClientMessage(
            {k: v * math.nan for k, v in sent.tensors.items()},
            sent.weight,
            sent.num_examples,
            sent.local_steps,
        )

    saboteur.fit = garbage
    logged: list[str] = []
    transport = SiloTransport(run.clients, LocalTask.of_run(config), "test", 0, log=logged.append)
    record = RoundDriver(config, run.server, transport).run_round()
    assert 1 not in record.clients and len(record.clients) == len(run.clients) - 1
    assert all(bool(torch.isfinite(v).all()) for v in run.server.shared.values())
    assert any(
        f"silo {saboteur.name}'s update refused" in line and "NaN" in line for line in logged
    )


@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "krum", "norm-bound"])
def test_robust_rules_train_the_real_federation(retail, rule):
    config = small_config(**{"federated.robust": rule, "federated.robust_bound": 5.0})
    result = run_cross_silo(retail, config)
    assert result.final is not None
    assert all(bool(torch.isfinite(v).all()) for v in result.server.shared.values())
    assert sum(s.users for s in result.final.values()) > 0


def test_config_names_what_robust_rules_cannot_do():
    with pytest.raises(ConfigError, match="hides from the server"):
        load_config(overrides={"federated.robust": "median", "protection.kind": "secagg"})
    with pytest.raises(ConfigError, match="cross-silo"):
        load_config(
            overrides={
                "federated.robust": "krum",
                "federated.mode": "cross-device",
                "model.silo_item_bias": False,
            }
        )
    with pytest.raises(ConfigError, match="robust_trim"):
        load_config(overrides={"federated.robust_trim": 0.5})
    with pytest.raises(ConfigError, match="robust must be one of"):
        load_config(overrides={"federated.robust": "bulyan"})


def test_a_poisoning_storefront_rewrites_only_its_own_messages(retail):
    from fedshop.fl.aggregation import STEPS_KEY
    from fedshop.fl.poisoning import PoisonedSilo, attacker_silos, poison

    config = small_config(**{"attack.kind": "sign-flip", "attack.scale": 10.0})
    run = build_federation(retail, config)
    clients = poison(config)(run.clients)
    bad = attacker_silos(config.attack, len(clients), config.seed)
    assert bad == attacker_silos(config.attack, len(clients), config.seed) and len(bad) == 1
    assert [isinstance(c, PoisonedSilo) for c in clients] == [i in bad for i in range(len(clients))]
    attacker = clients[bad[0]]
    honest_twin = build_federation(retail, config).clients[bad[0]]
    task = LocalTask.of_run(config)
    sent, honest = attacker.fit(run.server.shared, task), honest_twin.fit(run.server.shared, task)
    for name, tensor in sent.tensors.items():
        expected = honest.tensors[name] * (1 if name == STEPS_KEY else -10.0)
        assert torch.allclose(tensor, expected), name
    assert attacker.name == honest_twin.name  # otherwise the same silo


def test_attacks_are_experiments_of_the_simulator():
    from fedshop.deploy import check_deployable
    from fedshop.errors import FedShopError

    with pytest.raises(FedShopError, match="simulator"):
        check_deployable(load_config(overrides={"attack.kind": "scale"}))
    with pytest.raises(ConfigError, match="cross-silo"):
        load_config(
            overrides={
                "attack.kind": "scale",
                "federated.mode": "cross-device",
                "model.silo_item_bias": False,
            }
        )
    with pytest.raises(ConfigError, match=r"\[attack\] kind"):
        load_config(overrides={"attack.kind": "backdoor"})


def test_a_storefront_with_fake_customers_trains_on_them_and_keeps_them_out_of_its_files(retail):
    import numpy as np

    from fedshop.fl.poisoning import FakePurchasesSilo, attacker_silos, poison

    config = small_config(**{"attack.kind": "fake-purchases", "attack.fake_fraction": 0.5})
    run = build_federation(retail, config)
    clients = poison(config)(run.clients)
    (bad,) = attacker_silos(config.attack, len(clients), config.seed)
    attacker = clients[bad]
    assert isinstance(attacker, FakePurchasesSilo)
    genuine = retail.silo(bad)
    fakes = attacker.honest.data.n_users - genuine.n_users
    assert fakes == max(1, round(0.5 * genuine.n_users))
    # Every fake customer bought every target; the targets are items the storefront itself sold.
    fake_rows = attacker.honest.data.train[genuine.n_users :]
    assert (fake_rows[:, attacker.targets].toarray() == 1).all()
    assert (np.asarray(genuine.train[:, attacker.targets].sum(axis=0)).ravel() > 0).all()
    # Its files and evaluation are the genuine storefront's: no fake row, no fake customer scored.
    attacker.fit(run.server.shared, LocalTask.of_run(config))
    state = attacker.private_state()
    assert state["user_embedding"].shape[0] == genuine.n_users
    assert attacker.name == genuine.name and attacker.data.n_users == genuine.n_users
    evaluated = attacker.evaluate(run.server.shared).users
    assert evaluated == int((genuine.test.getnnz(axis=1) > 0).sum())


def test_a_promotion_run_reports_its_exposure_and_its_audit_log_verifies(retail, tmp_path):
    """The attacker's fake customers stay out of its files, so the run folder is consistent: the
    attacking storefront signs its own files like every other, and the log verifies."""
    from fedshop.experiment import run_experiment
    from fedshop.report.run_folder import write_run
    from fedshop.storage.audit import Verified, verify_run

    config = small_config(**{"attack.kind": "fake-purchases", "attack.targets": 3})
    result = run_experiment(config, retail)
    attack = result.attack
    assert attack["attackers"] and len(attack["targets"]) == 3
    assert 0.0 <= attack["er@10"] <= 1.0 and attack["shoppers"] > 0
    assert set(attack["per_silo"]) == set(retail.silo_names) - set(attack["attackers"])
    write_run(tmp_path, result)
    assert isinstance(verify_run(tmp_path), Verified)
