"""Datasets by name: resolve where the files are, load, clean, partition into silos, split."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from fedshop.config import DataConfig
from fedshop.data import online_retail
from fedshop.data.download import fetch
from fedshop.data.interactions import RecDataset, build_dataset
from fedshop.data.partition import assign_silos, home_country
from fedshop.data.split import temporal_split
from fedshop.errors import DataError


def data_dir_from(config: DataConfig) -> str | None:
    """The data directory in force: the config's, else $FEDSHOP_DATA_DIR, else none."""
    return config.data_dir or os.environ.get("FEDSHOP_DATA_DIR") or None


def load_dataset(config: DataConfig) -> RecDataset:
    if config.dataset == "online-retail":
        return load_online_retail(config)
    raise DataError(f"unknown dataset '{config.dataset}'")  # config validation normally stops this


def online_retail_file(config: DataConfig) -> tuple[Path, str]:
    if config.source == "embedded":
        return online_retail.embedded_path(), "embedded copy (UCI Online Retail, CC BY 4.0)"
    if config.source == "download":
        path = fetch(online_retail.OFFICIAL_URL, "online_retail.zip")
        return path, f"official release {online_retail.OFFICIAL_URL}"
    return online_retail.resolve_path(config.path or None, data_dir_from(config))


def load_online_retail(config: DataConfig) -> RecDataset:
    path, origin = online_retail_file(config)
    raw = online_retail.read_raw(path)
    cleaned = online_retail.clean(raw, source=origin)
    purchases = cleaned.purchases
    if purchases.empty:
        raise DataError(f"{path}: no purchases left after cleaning")

    user_codes, user_ids = pd.factorize(purchases["CustomerID"], sort=True)
    item_codes, item_ids = pd.factorize(purchases["StockCode"], sort=True)
    lines = pd.DataFrame(
        {
            "user": user_codes,
            "item": item_codes,
            "day": purchases["InvoiceDate"].dt.normalize().to_numpy(),
            "Country": purchases["Country"].to_numpy(),
        }
    )
    country = home_country(lines).sort_index()
    silos = assign_silos(country, config.min_silo_customers)
    split = temporal_split(lines[["user", "item", "day"]], config.min_train_days, config.validation)

    # The most frequent description of each stock code names the item.
    names = (
        purchases.assign(item=item_codes)
        .groupby("item")["Description"]
        .agg(lambda s: s.value_counts().index[0])
        .reindex(range(len(item_ids)), fill_value="")
        .to_numpy()
    )
    report = {
        "dataset": "online-retail",
        "source": origin,
        "cleaning_rules": online_retail.CLEANING_RULES,
        "cleaning": cleaned.counts,
        "date_range": [
            str(purchases["InvoiceDate"].min()),
            str(purchases["InvoiceDate"].max()),
        ],
        "split_rule": "temporal: each customer's last purchase day is the test basket",
        "split": split.counts,
        "silos": _silo_table(silos.names, silos.user_silo, split),
        "merged_into_rest_of_world": list(silos.merged_countries),
        "min_silo_customers": config.min_silo_customers,
    }
    dataset = build_dataset(
        name="online-retail",
        split=split,
        user_ids=np.asarray(user_ids),
        item_ids=np.asarray(item_ids),
        item_names=names,
        silo_names=silos.names,
        user_silo=silos.user_silo,
        report=report,
    )
    report["catalogue_items"] = dataset.n_items
    return dataset


def _silo_table(names: tuple[str, ...], user_silo: np.ndarray, split) -> list[dict]:
    train_per_user = split.train.groupby("user").size()
    test_users = set(split.test["user"].unique())
    rows = []
    for index, name in enumerate(names):
        members = np.flatnonzero(user_silo == index)
        rows.append(
            {
                "silo": name,
                "customers": len(members),
                "train_interactions": int(train_per_user.reindex(members, fill_value=0).sum()),
                "test_customers": sum(1 for u in members if u in test_users),
            }
        )
    return rows
