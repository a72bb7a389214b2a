"""What a run folder keeps for serving (format 1): the catalogue with prices, each storefront's
customer map beside its user tables (owner-only), and serving.json."""

import io
import json
import stat

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

from fedshop.config import DataConfig
from fedshop.data.datasets import online_retail_file
from fedshop.experiment import slug
from serving_runs import trained_run


def silo_files(folder, name):
    stem = folder / "models" / "federated" / f"silo-{slug(name)}"
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".customers.npz")


def read_customers(path):
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


@pytest.mark.parametrize("kind", ["retail-mf-cross-silo", "retail-gmf-cross-device"])
def test_each_silo_maps_its_rows_to_its_customers_and_their_training_purchases(kind):
    run = trained_run(kind)
    dataset = run.result.dataset
    index_of_customer = {str(c): u for u, c in enumerate(dataset.user_ids)}
    covered = []
    for position, name in enumerate(dataset.silo_names):
        tables_path, customers_path = silo_files(run.folder, name)
        for path in (tables_path, customers_path):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path  # owner-only
        tables = load_file(str(tables_path))
        customers = read_customers(customers_path)
        assert set(customers) == {"customer_ids", "history_indptr", "history_items"}
        ids = customers["customer_ids"]
        assert ids.dtype.kind == "U"  # text, no pickled objects
        users = np.array([index_of_customer[c] for c in ids])
        # Row r of the user tables is customer ids[r]: the silo's customers in the silo's order.
        assert np.array_equal(users, tables["users"].numpy())
        assert np.array_equal(users, dataset.silo(position).users)
        assert (dataset.user_silo[users] == position).all()
        assert len(tables["user_embedding"]) == len(ids)
        # Each row's history is exactly that customer's training purchases.
        expected = dataset.train[users]
        assert np.array_equal(customers["history_indptr"], expected.indptr)
        assert np.array_equal(customers["history_items"], expected.indices)
        assert customers["history_items"].dtype == np.int64
        covered.extend(users)
    assert sorted(covered) == list(range(dataset.n_users))  # every customer, once


def test_a_cross_device_run_writes_per_storefront_tables_not_one_devices_file():
    run = trained_run("retail-gmf-cross-device")
    models = run.folder / "models" / "federated"
    assert not (models / "devices.safetensors").exists()
    names = sorted(p.name for p in models.glob("silo-*.safetensors"))
    assert names == sorted(f"silo-{slug(n)}.safetensors" for n in run.result.dataset.silo_names)
    # Cross-device has no storefront offsets: a shopper's taste is their own vector.
    assert "silo_item_bias" not in load_file(str(models / names[0]))


def test_serving_json_says_what_to_load():
    run = trained_run("retail-mf-cross-silo")
    serving = json.loads((run.folder / "serving.json").read_text())
    dataset = run.result.dataset
    assert serving == {
        "format": 1,
        "model": "mf-bpr",
        "mode": "cross-silo",
        "n_items": dataset.n_items,
        "silos": [{"name": n, "slug": slug(n)} for n in dataset.silo_names],
    }
    device = json.loads(
        (trained_run("retail-gmf-cross-device").folder / "serving.json").read_text()
    )
    assert (device["model"], device["mode"]) == ("gmf", "cross-device")


def test_catalogue_prices_are_median_unit_prices_from_the_raw_file():
    run = trained_run("retail-mf-cross-silo")
    catalogue = pd.read_csv(
        run.folder / "catalogue.csv", dtype={"item_id": str}, keep_default_na=False,
        na_values={"price": [""]},
    )  # fmt: skip
    assert list(catalogue.columns) == ["index", "item_id", "name", "price"]
    assert list(catalogue["item_id"]) == list(run.result.dataset.item_ids)
    assert catalogue["price"].notna().all()  # every item bought in training has a price
    # Computed here from the raw file with pandas alone: purchase lines of known customers, no
    # cancellations, positive quantity and price.
    raw = pd.read_parquet(online_retail_file(DataConfig())[0])
    lines = raw[
        raw["CustomerID"].notna()
        & ~raw["InvoiceNo"].astype(str).str.startswith("C")
        & (raw["Quantity"] > 0)
        & (raw["UnitPrice"] > 0)
    ]
    medians = lines.groupby(lines["StockCode"].astype(str))["UnitPrice"].median()
    rng = np.random.default_rng(0)
    picked = ["85123A", "22423", "47566", *rng.choice(catalogue["item_id"], 5, replace=False)]
    prices = catalogue.set_index("item_id")["price"]
    for item in picked:
        assert prices[item] == pytest.approx(medians[item]), item
    # The dataset keeps them aligned with the catalogue order too.
    assert np.allclose(run.result.dataset.item_prices, catalogue["price"].to_numpy())


def test_a_dataset_without_prices_leaves_the_price_empty(data_dir):
    run = trained_run("ml100k-neumf-cross-device")
    lines = (run.folder / "catalogue.csv").read_text().splitlines()
    assert lines[0] == "index,item_id,name,price"
    assert all(line.endswith(",") for line in lines[1:])
    assert run.result.dataset.item_prices is None
