"""Size and fit prediction (issue 20): data as shops, metrics, models, federated rounds, CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from fedshop.cli import app
from fedshop.config import ConfigError, load_config
from fedshop.data.fit_feedback import FitRecords, build_fit_dataset, load_fit_dataset
from fedshop.data.partition import slug
from fedshop.data.renttherunway import RentTheRunway, clean, load_renttherunway
from fedshop.errors import DataError
from fedshop.eval.auc import macro_auc
from fedshop.eval.fit_metrics import FitCounts, summarise_fit
from fedshop.fit_experiment import run_fit_experiment
from fedshop.fl.aggregation import fedavg_pipeline, fednova_pipeline, with_row_means
from fedshop.fl.fit_local import per_customer_updates
from fedshop.messages import ClientMessage
from fedshop.models.fit import FIT_MODELS, Batch, batched, gather, record_losses
from fedshop.report.fit_run import write_fit_run
from fedshop.storage.audit import LOG_FILE, Verified, read_entries, verify_run

SMALL = {"fit.max_shoppers": 3000, "federated.rounds": 2}


def fit_config(data_dir, **overrides):
    return load_config(
        overrides={
            "task": "fit",
            "data.dataset": "renttherunway",
            "data.data_dir": str(data_dir),
            **SMALL,
            **overrides,
        }
    )


@pytest.fixture(scope="module")
def small(data_dir):
    config = fit_config(data_dir)
    return config, load_fit_dataset(config.data, config.fit, config.seed)


def rentals_frame(rows):
    """A tiny RentTheRunway table in the cleaned file's columns."""
    base = {
        "rating": 10.0,
        "age": 30.0,
        "bust_size_num": 34.0,
        "height_in": 65.0,
        "weight_lbs": 130.0,
        "rented_for": "party",
        "category": "dress",
        "body_type": "petite",
        "bust_size_letter": "b",
    }
    frame = pd.DataFrame([{**base, **row} for row in rows])
    frame["review_date"] = pd.to_datetime(frame["review_date"])
    return frame


def test_shops_share_shoppers_and_the_split_holds_out_each_latest_record(small):
    _, data = small
    report = data.report
    assert data.n_silos == 8 and report["shoppers_in_several_silos"]["in_two_or_more"] > 0
    test = data.pooled("test")
    train = data.pooled("train")
    # One held-out record per shopper with two or more, and it is her latest.
    assert len(np.unique(test.user)) == len(test)
    counts = np.bincount(np.concatenate([train.user, test.user]), minlength=data.n_users)
    assert set(test.user) == set(np.flatnonzero(counts >= 2))
    # Every silo's records belong to its own customers only.
    for silo in data.silos:
        for part in (silo.train, silo.test):
            assert np.isin(part.user, silo.users).all()


def test_bad_input_is_counted_not_lost():
    raw = rentals_frame(
        [
            {"fit": "fit", "user_id": 1, "item_id": 10, "size": 8, "review_date": "2017-01-01"},
            {"fit": "small", "user_id": 1, "item_id": 11, "size": 4, "review_date": "2017-02-01"},
            {"fit": None, "user_id": 2, "item_id": 10, "size": 8, "review_date": "2017-01-01"},
            {
                "fit": "large",
                "user_id": 3,
                "item_id": 10,
                "size": None,
                "review_date": "2017-01-01",
            },
            {
                "fit": "fit",
                "user_id": 4,
                "item_id": 12,
                "size": 12,
                "review_date": "2017-03-01",
                "rented_for": None,
                "category": "print",
            },
        ]
    )
    rentals, counts = clean(raw)
    data = build_fit_dataset(RentTheRunway(rentals, "frame", counts))
    cleaning = data.report["cleaning"]
    assert cleaning["dropped_no_fit_label"] == 1
    assert cleaning["dropped_unknown_size"] == 1
    assert cleaning["silo_key_missing_to_other"] == 1
    assert cleaning["shoppers_with_one_record_train_only"] == 1  # shopper 4 trains only
    assert sorted(data.silo_names) == ["other", "party"]
    test = data.pooled("test")
    assert len(test) == 1 and data.user_ids[test.user[0]] == 1  # her later record
    groups = build_fit_dataset(RentTheRunway(rentals, "frame", counts), silos="category-group")
    assert groups.report["cleaning"]["category_not_in_a_group_to_other"] == 1
    # A category missing from a shop: its held-out product is counted as unseen there.
    table = {row["silo"]: row for row in data.report["silos"]}
    assert table["party"]["test_product_unseen_in_silo"] == 1


def test_missing_data_offline_is_one_clear_error(offline, monkeypatch):
    monkeypatch.delenv("FEDSHOP_DATA_DIR", raising=False)
    with pytest.raises(DataError, match=r"could not download .*renttherunway_final_data"):
        load_renttherunway(offline, download=True)
    with pytest.raises(DataError, match="no RentTheRunway file"):
        load_renttherunway(offline)


def test_binned_auc_matches_the_exact_statistic_and_adds_across_shops():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 5000)
    logits = rng.normal(size=(5000, 3)) + 0.8 * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    exact, per_class = macro_auc(probs, labels)
    counts = FitCounts.of(probs, labels)
    assert abs(counts.means()["auc_macro"] - exact) < 1e-3
    for k in range(3):
        assert abs(counts.class_auc(k) - per_class[k]) < 1e-3
    halves = FitCounts.of(probs[:2000], labels[:2000]) + FitCounts.of(probs[2000:], labels[2000:])
    assert halves.means() == counts.means()
    summary = summarise_fit({"a": FitCounts.of(probs[:100], labels[:100]), "b": counts})
    assert summary["records"] == 5100 and summary["silos_evaluated"] == 2
    assert np.trace(np.asarray(summary["confusion"])) == round(summary["accuracy"] * 5100)


@pytest.mark.parametrize("base", [fedavg_pipeline, fednova_pipeline])
def test_row_means_average_each_row_over_the_clients_that_changed_it(base):
    pipeline = with_row_means(base(), ("rows",))
    first = ClientMessage(
        {"rows": torch.tensor([[1.0], [0.0]]), "w": torch.tensor([2.0])},
        1.0,
        num_examples=3,
        local_steps=2,
    )
    second = ClientMessage(
        {"rows": torch.tensor([[3.0], [4.0]]), "w": torch.tensor([0.0])},
        1.0,
        num_examples=1,
        local_steps=2,
    )
    mean = pipeline.aggregate([pipeline.on_client(first), pipeline.on_client(second)])
    # Row 0: both changed it, example-weighted (3·1 + 1·3)/4; row 1: only the second client.
    assert torch.allclose(mean["rows"], torch.tensor([[1.5], [4.0]]))
    assert torch.allclose(mean["w"], torch.tensor([1.5]))  # dense weights: the usual mean
    assert set(mean) == {"rows", "w"}


@pytest.mark.parametrize("name", sorted(FIT_MODELS))
def test_per_customer_updates_are_the_clipped_sums_of_each_customers_gradient(name):
    model = FIT_MODELS[name]
    g = torch.Generator().manual_seed(0)
    shared = model.init_shared(20, 6, 5, 3, g)
    private = model.init_private(4, 3, g)
    measurements = torch.randn(4, 5, generator=g)
    batch = Batch(
        torch.tensor([0, 0, 1, 2, 2, 2]),
        torch.tensor([1, 1, 5, 7, 8, 19]),
        torch.tensor([0, 0, 2, 3, 3, 5]),
        torch.tensor([0, 1, 2, 1, 1, 0]),
        torch.tensor([-0.5, -0.5, 0.0, 0.25, 1.0, 2.0]),
    )
    customer = torch.tensor([0, 0, 1, 2, 2, 2])
    clip = 0.05
    totals, _ = per_customer_updates(
        model, shared, private, measurements, batch, customer, 3, 1e-3, clip
    )
    expected = {k: torch.zeros_like(v) for k, v in shared.items()}
    for c in range(3):
        params = {k: v.clone().requires_grad_(True) for k, v in shared.items()}
        part = batch.take(torch.nonzero(customer == c).flatten())
        rows = gather(model, params, private, measurements, part)
        dense = batched({n: params[n] for n in model.dense_names(params)}, len(part))
        loss = record_losses(model, rows, dense, part.label, 1e-3).sum()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        update = {
            k: -(g if g is not None else torch.zeros_like(params[k]))
            for k, g in zip(params, grads, strict=True)
        }
        norm = torch.sqrt(sum(u.pow(2).sum() for u in update.values()))
        scale = min(1.0, clip / float(norm))
        for k in expected:
            expected[k] += scale * update[k]
    for k in expected:
        assert torch.allclose(totals[k], expected[k], atol=1e-6), k


def test_federated_fit_trains_and_keeps_each_shops_sizes_at_home(small):
    config, data = small
    config = fit_config(config.data.data_dir, **{"fit.methods": ["federated", "majority"]})
    result = run_fit_experiment(config, data)
    federated = result.methods["federated"].summary
    assert federated["auc_macro"] > result.methods["majority"].summary["silo_mean_auc_macro"]
    assert set(federated) >= {"auc_macro", "silo_mean_auc_macro", "accuracy", "recall_small"}
    shared = result.weights["federated/shared"]
    assert not {"user_size", "user_bias"} & set(shared)
    for silo in data.silos:
        own = result.weights[f"federated/silo-{slug(silo.name)}"]
        assert own["user_size"].shape[0] == silo.n_users
        assert torch.equal(own["users"], torch.from_numpy(silo.users))


def test_fit_under_record_dp_and_secure_aggregation_states_epsilon(small, tmp_path):
    config, data = small
    config = fit_config(
        config.data.data_dir,
        **{
            "fit.methods": ["federated"],
            "privacy.mode": "record",
            "privacy.epsilon": 8.0,
            "privacy.local_steps": 2,
            "privacy.budget": 50.0,
            "protection.kind": "secagg",
        },
    )
    result = run_fit_experiment(config, data)
    assert 0 < result.privacy.epsilon <= 8.0 + 1e-6
    assert result.protection.kind == "secagg"
    assert np.isfinite(result.methods["federated"].summary["auc_macro"])
    # Its audit log verifies; under SecAgg the server holds no shop's message (no message hashes),
    # each round states the ε spent so far.
    write_fit_run(tmp_path, result)
    assert isinstance(verify_run(tmp_path), Verified)
    rounds = [e["body"] for e in read_entries(tmp_path / LOG_FILE) if e["kind"] == "round"]
    assert len(rounds) == 2 and all(r["messages"] is None and r["epsilon"] > 0 for r in rounds)


def test_config_names_what_a_fit_run_cannot_do(data_dir):
    with pytest.raises(ConfigError, match="fit feedback"):
        load_config(overrides={"task": "fit", "data.dataset": "movielens-1m"})
    with pytest.raises(ConfigError, match="--task fit"):
        load_config(overrides={"data.dataset": "renttherunway"})
    with pytest.raises(ConfigError, match="cross-silo"):
        fit_config(data_dir, **{"federated.mode": "cross-device"})
    with pytest.raises(ConfigError, match=r"\[fit\] model"):
        fit_config(data_dir, **{"fit.model": "k-nn"})


def test_fedshop_train_task_fit_writes_a_run_folder(data_dir, tmp_path):
    out = tmp_path / "fit"
    small_toml = tmp_path / "small.toml"
    small_toml.write_text("[fit]\nmax_shoppers = 2000\n")
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--task",
            "fit",
            "--dataset",
            "renttherunway",
            "--data-dir",
            str(data_dir),
            "--rounds",
            "2",
            "--out",
            str(out),
            "--config",
            str(small_toml),
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    for method in ("federated", "centralized", "local_only", "majority", "1-lv-lr"):
        assert {"auc_macro", "silo_mean_auc_macro", "accuracy", "recall_fit"} <= set(
            metrics[method]
        )
    assert set(metrics["per_silo"]) == set(metrics["bytes_per_round_per_silo"])
    report = (out / "report.html").read_text()
    assert "Confusion matrices" in report and "<svg" in report
    serving = json.loads((out / "serving.json").read_text())
    assert serving["task"] == "fit" and serving["silos"]
    assert (out / "products.csv").exists()
    assert isinstance(verify_run(out), Verified)  # its audit log (test_audit.py flips its bytes)


def test_fit_records_concat_of_nothing_is_empty():
    assert len(FitRecords.concat([])) == 0
