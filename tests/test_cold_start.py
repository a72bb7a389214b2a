"""New shoppers ([eval] cold_start): held out of training entirely, then served by basket fold-in."""

import json

import numpy as np
import pytest

from fedshop.config import DataConfig, load_config
from fedshop.data import online_retail
from fedshop.data.datasets import load_dataset, online_retail_file
from fedshop.errors import ConfigError
from fedshop.experiment import run_experiment
from fedshop.models.fold_in import FoldInSettings
from fedshop.report.run_folder import metrics_document, write_run

FRACTION = 0.1


@pytest.fixture(scope="module")
def cold_retail():
    return load_dataset(DataConfig(validation=True), seed=3, cold_start=FRACTION)


@pytest.fixture(scope="module")
def full_retail():
    return load_dataset(DataConfig(validation=True), seed=3)


def items_of(dataset, matrix, row) -> set[str]:
    return set(dataset.item_ids[matrix.indices[matrix.indptr[row] : matrix.indptr[row + 1]]])


def test_new_shoppers_never_reach_training(cold_retail, full_retail):
    cold = cold_retail.cold
    held_out = set(cold.held_out_ids)
    report = cold_retail.report["cold_start"]
    assert len(held_out) == report["held_out"] > 0
    assert set(cold.customer_ids) <= held_out and cold.n_customers == report["evaluated"]
    # No user index, so no row of the train, validation or test matrix, belongs to one of them.
    assert held_out.isdisjoint(cold_retail.user_ids)
    for matrix in (cold_retail.train, cold_retail.test, cold_retail.validation):
        assert matrix.shape[0] == len(cold_retail.user_ids)
    assert len(cold_retail.user_ids) + len(held_out) == len(full_retail.user_ids)
    # Everyone else keeps exactly the purchases they had without a cold-start cohort.
    row_in_full = {cid: r for r, cid in enumerate(full_retail.user_ids)}
    rng = np.random.default_rng(0)
    for row in rng.choice(len(cold_retail.user_ids), 200, replace=False):
        full_row = row_in_full[cold_retail.user_ids[row]]
        for name in ("train", "test", "validation"):
            mine = items_of(cold_retail, getattr(cold_retail, name), row)
            theirs = items_of(full_retail, getattr(full_retail, name), full_row)
            # The catalogue loses the items only new shoppers bought; nothing else changes.
            assert mine == theirs & set(cold_retail.item_ids)


def test_baskets_and_targets_follow_the_purchase_days(cold_retail):
    cold = cold_retail.cold
    path, _ = online_retail_file(DataConfig())
    purchases = online_retail.clean(online_retail.read_raw(path)).purchases
    purchases = purchases.assign(day=purchases["InvoiceDate"].dt.normalize())
    catalogue = set(cold_retail.item_ids)
    for row in range(0, cold.n_customers, 25):
        mine = purchases[purchases["CustomerID"] == cold.customer_ids[row]]
        days = sorted(mine["day"].unique())
        first = set(mine.loc[mine["day"] == days[0], "StockCode"]) & catalogue
        second = set(mine.loc[mine["day"] == days[1], "StockCode"]) & catalogue
        assert items_of(cold_retail, cold.basket, row) == first
        assert items_of(cold_retail, cold.target, row) == second - first
        assert cold_retail.silo_names[cold.silo[row]] in cold_retail.silo_names


def test_every_storefront_gets_new_shoppers_and_the_report_counts_them(cold_retail):
    report = cold_retail.report["cold_start"]
    per_silo = report["per_silo"]
    assert list(per_silo) == list(cold_retail.silo_names)
    assert all(counts["held_out"] >= 1 for counts in per_silo.values())
    assert sum(c["held_out"] for c in per_silo.values()) == report["held_out"]
    assert sum(c["evaluated"] for c in per_silo.values()) == report["evaluated"]
    skipped = report["empty_basket_skipped"] + report["empty_target_skipped"]
    assert report["evaluated"] + skipped == report["held_out"]
    # ceil(10%) of each storefront's eligible customers: about a tenth overall, never less.
    assert FRACTION * report["eligible"] <= report["held_out"] < FRACTION * report["eligible"] + 15
    assert report["fraction"] == FRACTION and "first purchase day" in report["rule"]


def test_the_run_seed_draws_the_cohort(cold_retail):
    again = load_dataset(DataConfig(validation=True), seed=3, cold_start=FRACTION)
    other = load_dataset(DataConfig(validation=True), seed=4, cold_start=FRACTION)
    assert np.array_equal(again.cold.held_out_ids, cold_retail.cold.held_out_ids)
    assert (again.cold.basket != cold_retail.cold.basket).nnz == 0
    assert set(other.cold.held_out_ids) != set(cold_retail.cold.held_out_ids)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"eval.cold_start": 0.6}, "[eval] cold_start must be in [0, 0.5]"),
        ({"eval.cold_start": -0.1}, "[eval] cold_start must be in [0, 0.5]"),
        (
            {"eval.cold_start": 0.1, "data.dataset": "movielens-1m"},
            "movielens-1m does not",
        ),
        (
            {"eval.cold_start": 0.1, "data.dataset": "amazon-toys"},
            "needs purchase days",
        ),
        ({"eval.cold_start": 0.1, "methods": ["popularity"]}, 'add "federated"'),
    ],
)
def test_impossible_cold_start_settings_are_refused(overrides, fragment):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=overrides)
    assert fragment in str(error.value)


def test_a_dataset_without_purchase_days_is_refused_by_the_loader():
    with pytest.raises(ConfigError, match="movielens-100k has none"):
        load_dataset(DataConfig(dataset="movielens-100k"), cold_start=0.1)


# The smallest run whose item vectors carry taste: with the suite's usual quick model (dim 8, two
# rounds) a folded-in vector ranks like the model's item biases and fold-in only ties popularity.
SMALL = {
    "seed": 5,
    "model.dim": 32,
    "federated.rounds": 4,
    "federated.personalise_epochs": 1,
    "methods": ["federated"],
    "eval.cold_start": FRACTION,
}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    config = load_config(overrides=SMALL)
    dataset = load_dataset(config.data, seed=config.seed, cold_start=config.eval.cold_start)
    folder = tmp_path_factory.mktemp("cold-run")
    write_run(folder, run_experiment(config, dataset))
    return dataset, folder


def test_the_run_folder_reports_new_shoppers(small_run):
    dataset, folder = small_run
    block = json.loads((folder / "metrics.json").read_text())["cold_start"]
    assert block["customers"] == dataset.cold.n_customers
    for method in ("fold_in", "popularity", "trained"):
        assert block[method]["users"] == dataset.cold.n_customers
        assert 0.0 <= block[method]["hr@10"] <= 1.0
    settings = FoldInSettings()
    assert block["settings"] == {"steps": settings.steps, "lr": settings.lr, "l2": settings.l2}
    assert block["fold_in_ms_median"] > 0 and block["trained_epochs"] == 4
    assert block["ratios"]["fold_in/popularity"]["hr@10"] == pytest.approx(
        block["fold_in"]["hr@10"] / block["popularity"]["hr@10"]
    )
    per_silo = block["per_silo"]
    assert set(per_silo) == set(dataset.silo_names)
    assert sum(s["fold_in"]["users"] for s in per_silo.values()) == block["customers"]
    page = (folder / "report.html").read_text()
    assert "New shoppers (cold start)" in page and "Basket fold-in" in page
    report = json.loads((folder / "data_report.json").read_text())
    assert report["cold_start"]["evaluated"] == block["customers"]


def test_fold_in_beats_popularity_for_new_shoppers(small_run):
    """Measured on this run (seed 5, 268 new shoppers): HR@10 0.452 against 0.369 (1.22×),
    NDCG@10 1.37×. The asserted margins leave room for float differences between machines; a
    fold-in that did nothing (the model's item biases and offsets alone) or ranked by popularity
    fails them."""
    block = json.loads((small_run[1] / "metrics.json").read_text())["cold_start"]
    ratios = block["ratios"]["fold_in/popularity"]
    assert ratios["hr@10"] > 1.1, ratios
    assert ratios["ndcg@10"] > 1.2, ratios


def test_without_cold_start_nothing_changes(full_retail, tmp_path):
    assert full_retail.cold is None and "cold_start" not in full_retail.report
    result = run_experiment(load_config(overrides={"methods": ["popularity"]}), full_retail)
    assert result.cold_start is None
    write_run(tmp_path, result)
    assert "cold_start" not in json.loads((tmp_path / "metrics.json").read_text())
    assert "New shoppers" not in (tmp_path / "report.html").read_text()


def test_new_shoppers_under_differential_privacy(cold_retail, tmp_path):
    """Under DP the cohort is evaluated like any held-out data; the model has no storefront offsets
    (off under DP) and the guarantee covers only the customers who trained."""
    config = load_config(
        overrides={
            "methods": ["federated"], "model.dim": 8, "federated.rounds": 1,
            "federated.personalise_epochs": 0, "privacy.mode": "record", "privacy.epsilon": 8.0,
            "privacy.local_steps": 2, "privacy.budget": 20.0, "eval.cold_start": FRACTION,
            "privacy.ledger_url": f"sqlite:///{tmp_path / 'ledger.sqlite'}", "seed": 3,
        }
    )  # fmt: skip
    assert config.model.silo_item_bias is False
    result = run_experiment(config, cold_retail)
    assert result.privacy.protected_units == cold_retail.n_users  # new shoppers never trained
    block = metrics_document(result)["cold_start"]
    assert block["customers"] == cold_retail.cold.n_customers
    for method in ("fold_in", "popularity", "trained"):
        assert 0.0 <= block[method]["hr@10"] <= 1.0
