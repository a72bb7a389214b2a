"""Fake shoppers promoting target items (issue 21): the attacks, ER@10 and the cross-device defences."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedshop.config import ConfigError, load_config
from fedshop.eval.exposure import exposure
from fedshop.fl.device_robust import (
    ClientUpdates,
    RowBound,
    SimilarityFilter,
    collect_updates,
)
from fedshop.fl.fake_shoppers import FakeShoppers, choose_targets, fake_count
from fedshop.fl.local_round import LocalTraining, draw_round
from fedshop.fl.vectorised import vectorised_sum
from fedshop.models.spec import get_model

ML_DEVICE = "configs/movielens-cross-device.toml"


# ---- ER@10 -------------------------------------------------------------------------------------


def test_exposure_on_a_hand_made_score_table():
    # 4 shoppers × 12 items; targets 10 and 11; top 10 with the training items excluded.
    train = sp.csr_matrix(
        np.array(
            [
                [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # item 0 bought: 11 candidates left
                [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1],  # bought both targets: not counted
                [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],  # bought target 10 only
                [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # no training item: not a shopper
            ],
            dtype=np.float32,
        )
    )
    scores = torch.tensor(
        [
            # shopper 0: targets rank last but item 0 is excluded, so 10 of 11 candidates fit in
            # the top 10 and one target is left out, the other in: exposed.
            [9, 8, 7, 6, 5, 4, 3, 2, 1, 0.5, 0.1, -1.0],
            [0] * 12,
            # shopper 2: target 10 is its own (excluded); with items 1 and 10 excluded only 10
            # candidates remain, so target 11 is in the top 10 though it scores lowest.
            [9, 9, 8, 7, 6, 5, 4, 3, 2, 1.5, 99, -5.0],
            [0] * 12,
        ]
    )
    result = exposure(lambda rows: scores[torch.from_numpy(rows)], train, [10, 11], k=10)
    assert result.shoppers == 2  # shoppers 0 and 2
    assert result.exposed == 2
    # Top 5: shopper 0's targets are out, shopper 2's target 11 is last: ER@5 = 0.
    assert exposure(lambda r: scores[torch.from_numpy(r)], train, [10, 11], k=5).ratio == 0.0
    # One target raised into shopper 0's top 5: ER@5 = 1/2.
    scores[0, 11] = 100.0
    assert exposure(lambda r: scores[torch.from_numpy(r)], train, [10, 11], k=5).ratio == 0.5


def test_targets_are_unpopular_and_drawn_by_the_seed():
    rng = np.random.default_rng(0)
    train = sp.csr_matrix((rng.random((200, 50)) < np.linspace(0.01, 0.6, 50)).astype(np.float32))
    popularity = np.asarray(train.sum(0)).ravel()
    targets = choose_targets(train, 3, seed=7)
    assert len(set(targets.tolist())) == 3
    assert (popularity[targets] < np.median(popularity)).all() and (popularity[targets] >= 1).all()
    assert (choose_targets(train, 3, seed=7) == targets).all()
    assert not (choose_targets(train, 3, seed=8) == targets).all()


# ---- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"attack.kind": "fedrecattack", "federated.mode": "cross-silo"}, "cross-device"),
        ({"attack.kind": "sign-flip"}, "cross-silo"),
        ({"federated.robust": "median"}, "for cross-device shoppers choose one of"),
        ({"federated.robust": "similarity", "protection.kind": "secagg"}, "each shopper's own"),
        ({"federated.robust": "row-bound", "protection.kind": "secagg"}, "hides from the server"),
        ({"attack.kind": "a-hum", "protection.kind": "secagg"}, "not simulated under"),
        ({"attack.kind": "a-hum", "model.name": "neumf"}, "mf-bpr"),
        ({"attack.kind": "a-hum", "attack.targets": 5, "attack.rows": 3}, "at least targets"),
        ({"attack.fake_fraction": 0.0}, "fake_fraction"),
        ({"attack.kind": "a-hum", "attack.fake_fraction": 2.0}, "fake shoppers per genuine"),
        ({"attack.known_fraction": 1.5}, "known_fraction"),
        ({"federated.similarity_threshold": 1.5}, "similarity_threshold"),
        ({"federated.max_rows": 0}, "max_rows"),
    ],
)
def test_invalid_combinations_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ML_DEVICE, overrides)


def test_cross_silo_refuses_the_shopper_defences():
    with pytest.raises(ConfigError, match="is for cross-device runs"):
        load_config(overrides={"federated.robust": "row-bound"})


def test_fake_count_is_a_share_of_the_genuine_shoppers():
    attack = load_config(ML_DEVICE, {"attack.kind": "a-hum", "attack.fake_fraction": 0.05}).attack
    assert fake_count(attack, 6040) == 302
    assert fake_count(attack, 10) == 1


# ---- the defences on hand-made updates ---------------------------------------------------------


def _updates(rows, owner, deltas, weights) -> ClientUpdates:
    count = len(weights)
    return ClientUpdates(
        rows=torch.tensor(rows),
        owner=torch.tensor(owner),
        items={"item_embedding": torch.tensor(deltas, dtype=torch.float32)},
        dense={},
        weights=torch.tensor(weights, dtype=torch.float32),
        clients=torch.arange(count),
    )


def test_similarity_filter_drops_look_alikes_and_keeps_the_others():
    g = torch.Generator().manual_seed(0)
    honest = [torch.randn(5, 8, generator=g) for _ in range(4)]
    rows, owner, deltas = [], [], []
    for c, d in enumerate(honest):
        items = torch.randperm(100, generator=g)[:5].tolist()
        rows += items
        owner += [c] * 5
        deltas += d.tolist()
    push = torch.randn(8, generator=g)
    for c in (4, 5, 6):  # three fakes pushing item 99 the same way (a little noise each)
        rows.append(99)
        owner.append(c)
        deltas.append((push + 0.01 * torch.randn(8, generator=g)).tolist())
    updates = _updates(rows, owner, deltas, [1.0] * 7)
    stage = SimilarityFilter(0.9, n_items=100, seed=1)
    kept = stage(updates)
    assert kept.clients.tolist() == [0, 1, 2, 3]
    assert stage.last_dropped == [4, 5, 6]
    assert set(kept.rows.tolist()) == set(rows[:20])


def test_row_bound_clips_rows_and_caps_how_many_a_client_moves():
    # Client 0 moves 3 small rows; client 1 moves one row far and two small ones.
    deltas = [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [100.0, 0.0], [0.0, 1.0], [0.0, 0.5]]
    updates = _updates([0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 1, 1], deltas, [1.0, 1.0])
    out = RowBound(multiple=2.0, max_rows=2)(updates)
    # Median row norm 1: the far row is clipped to 2; each client keeps its 2 largest rows.
    norms = dict(
        zip(out.rows.tolist(), out.items["item_embedding"].norm(dim=1).tolist(), strict=True)
    )
    assert sorted(out.rows.tolist()) == [0, 1, 3, 4]
    assert norms[3] == pytest.approx(2.0)
    assert norms[0] == pytest.approx(1.0)


# ---- on MovieLens-100K -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ml100k(data_dir):
    from fedshop.data.datasets import load_dataset
    from fedshop.data.interactions import for_protocol

    config = load_config(ML_DEVICE, {"data.dataset": "movielens-100k", "eval.protocol": "full"})
    return for_protocol(load_dataset(config.data, seed=1), "full", "test", 1)


def test_collected_updates_sum_to_the_streamed_round(ml100k):
    config = load_config(ML_DEVICE, {"data.dataset": "movielens-100k", "model.dim": 8})
    spec = get_model("mf-bpr")
    g = torch.Generator().manual_seed(0)
    shared = spec.init_model(ml100k.n_items, config.model, g)
    users = spec.init_users(ml100k.n_users, config.model, g)
    clients = torch.arange(0, 300, 3)
    batch = draw_round(ml100k.train, clients, 2, 1, torch.Generator().manual_seed(1))
    training = LocalTraining(2, 2.0, 0.01, 1)
    streamed, _ = vectorised_sum(spec, shared, users, batch, training)
    collected, new_users = collect_updates(spec, shared, users, batch, training)
    total = collected.total(shared)
    assert total.weight == pytest.approx(streamed.weight)
    for k in shared:
        torch.testing.assert_close(total.tensors[k], streamed.tensors[k], atol=1e-5, rtol=1e-4)
    assert new_users["user_embedding"].shape == (100, 8)


def test_fake_updates_keep_to_the_attackers_budget(ml100k):
    config = load_config(
        ML_DEVICE,
        {"data.dataset": "movielens-100k", "attack.kind": "fedrecattack", "attack.rows": 20},
    )
    spec = get_model("mf-bpr")
    shared = spec.init_model(ml100k.n_items, config.model, torch.Generator().manual_seed(0))
    attacker = FakeShoppers.register(config.attack, ml100k.train, config.seed)
    assert attacker.first_id == ml100k.n_users and attacker.count == fake_count(config.attack, 943)
    sent = attacker(1, attacker.ids[:6], shared, typical_norm=0.5)
    torch.testing.assert_close(sent.norms().float(), torch.full((6,), 0.5))
    assert torch.bincount(sent.owner).max() <= 20
    for c in range(6):  # every fake moves every target's row
        assert set(attacker.targets.tolist()) <= set(sent.rows[sent.owner == c].tolist())
    assert (sent.weights == attacker.claimed_examples).all()


def _run(ml100k, **overrides):
    from fedshop.fl.cross_device import run_cross_device

    config = load_config(
        ML_DEVICE,
        {
            "data.dataset": "movielens-100k",
            "eval.protocol": "full",
            "federated.rounds": 4,
            "eval.eval_every": 100,
            "federated.personalise_epochs": 1,
            "model.dim": 16,
            **overrides,
        },
    )
    run = run_cross_device(ml100k, config)
    targets = choose_targets(ml100k.train, config.attack.targets, config.seed)
    er = exposure(lambda rows: run.scores(torch.from_numpy(rows)), ml100k.train, targets)
    return run, er.ratio


@pytest.fixture(scope="module")
def runs(ml100k):
    return {
        "clean": _run(ml100k),
        "fedrecattack": _run(ml100k, **{"attack.kind": "fedrecattack"}),
        # A-hum knows no shopper: it needs more rounds to get going.
        "a-hum": _run(
            ml100k, **{"attack.kind": "a-hum", "attack.fake_fraction": 0.1, "federated.rounds": 8}
        ),
        "defended": _run(
            ml100k, **{"attack.kind": "fedrecattack", "federated.robust": "similarity"}
        ),
    }


def test_attacks_raise_exposure_and_the_defence_lowers_it(runs):
    er10 = {name: er for name, (_, er) in runs.items()}
    assert er10["fedrecattack"] > er10["clean"] + 0.2, er10
    assert er10["a-hum"] > er10["clean"] + 0.05, er10
    assert er10["defended"] < er10["fedrecattack"] / 2, er10


def test_fake_shoppers_take_part_but_are_never_evaluated(runs, ml100k):
    clean, _ = runs["clean"]
    attacked, _ = runs["fedrecattack"]
    fakes = attacked.fakes
    assert fakes is not None and fakes.count == fake_count(attacked_config_attack(), 943)
    # Sampled like everyone else: every round's clients hold the fakes (all clients each round).
    assert set(fakes.ids.tolist()) <= set(attacked.history[0].clients)
    # No fake has a user row, and the evaluated shoppers are exactly the clean run's.
    assert attacked.user_tables["user_embedding"].shape[0] == ml100k.n_users
    for silo, sums in attacked.final.items():
        assert sums.users == clean.final[silo].users
    # The similarity defence left the fakes out of the sum.
    defended, _ = runs["defended"]
    assert not set(fakes.ids.tolist()) & set(defended.history[-1].clients)


def attacked_config_attack():
    return load_config(ML_DEVICE, {"attack.kind": "fedrecattack"}).attack


def test_metrics_get_an_attack_block(runs):
    from fedshop.experiment import fake_shopper_block

    run, er10 = runs["fedrecattack"]
    config = load_config(ML_DEVICE, {"attack.kind": "fedrecattack"})
    block = fake_shopper_block(config, run)
    assert block["er@10"] == pytest.approx(er10)
    assert block["targets"] == run.fakes.targets.tolist()
    assert block["fake_shoppers"] == run.fakes.count
    assert block["kind"] == "fedrecattack" and block["defence"] == "none"
    assert fake_shopper_block(config, runs["clean"][0]) is None


def test_camouflage_spends_its_share_of_the_budget_on_other_rows(ml100k):
    config = load_config(
        ML_DEVICE,
        {"data.dataset": "movielens-100k", "attack.kind": "a-hum", "attack.camouflage": 0.5},
    )
    spec = get_model("mf-bpr")
    shared = spec.init_model(ml100k.n_items, config.model, torch.Generator().manual_seed(0))
    attacker = FakeShoppers.register(config.attack, ml100k.train, config.seed)
    sent = attacker(1, attacker.ids[:4], shared, typical_norm=0.5)
    torch.testing.assert_close(sent.norms().float(), torch.full((4,), 0.5))
    assert torch.bincount(sent.owner).max() <= config.attack.rows
    # The crafted part (targets and the rows the loss moves) keeps half the squared norm.
    crafted = sent.row_norms().pow(2)[: len(sent.rows) - 4 * (config.attack.rows // 2)]
    assert float(crafted.sum()) == pytest.approx(4 * 0.5 * 0.25, rel=1e-3)
