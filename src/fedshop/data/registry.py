"""Datasets by name: resolve where the files are, load, clean, partition into silos, split."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from fedshop.config import DataConfig
from fedshop.data import amazon, movielens, online_retail
from fedshop.data.download import fetch
from fedshop.data.interactions import RecDataset, build_dataset
from fedshop.data.partition import assign_silos, home_country
from fedshop.data.split import SplitPairs, leave_last_out, temporal_split
from fedshop.errors import DataError
from fedshop.seeding import derive_seed


def data_dir_from(config: DataConfig) -> str | None:
    """The data directory in force: the config's, else $FEDSHOP_DATA_DIR, else none."""
    return config.data_dir or os.environ.get("FEDSHOP_DATA_DIR") or None


def load_dataset(config: DataConfig, seed: int = 0) -> RecDataset:
    """Load `config.dataset`; `seed` (the run seed) drives the random splits and silo draws."""
    if config.dataset == "online-retail":
        return load_online_retail(config)
    if config.dataset == "movielens-1m":
        return load_movielens(config, seed)
    if config.dataset in amazon.CATEGORIES or config.dataset == amazon.SEQUENTIAL_DATASET:
        return load_amazon(config, seed)
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


def movielens_location(config: DataConfig) -> tuple[Path, str]:
    """The MovieLens-1M folder or zip: data.path, else the data directory, else the official zip."""
    _refuse_embedded(config)
    if config.source == "auto":
        found = movielens.resolve_location(config.path or None, data_dir_from(config))
        if found is not None:
            return found
    path = fetch(movielens.OFFICIAL_URL, movielens.OFFICIAL_ZIP, sha256=movielens.OFFICIAL_SHA256)
    return path, f"official release {movielens.OFFICIAL_URL}"


def load_movielens(config: DataConfig, seed: int = 0) -> RecDataset:
    location, origin = movielens_location(config)
    release = movielens.read_movielens(location)
    ratings = release.ratings
    user_codes, user_ids = pd.factorize(ratings["UserID"], sort=True)
    item_codes, item_ids = pd.factorize(ratings["MovieID"], sort=True)
    held = "the test item" + (", the one before the validation item" if config.validation else "")
    if release.has_timestamps:
        # Equal timestamps keep file order: leave_last_out sorts stably.
        order = ratings["Timestamp"].to_numpy()
        split_rule = (
            f"leave-one-out: each user's most recent rating (by timestamp, ties by file order) is "
            f"{held}; every rating counts as an implicit interaction"
        )
    else:
        order = np.random.default_rng(derive_seed(seed, "split", "movielens-1m")).permutation(
            len(ratings)
        )
        split_rule = (
            f"leave-one-out at random: {release.ratings_file} has no timestamps, so each user's "
            f"held-out rating ({held}) is drawn uniformly at random, seeded by the run seed ({seed}); "
            "every rating counts as an implicit interaction"
        )
    events = pd.DataFrame({"user": user_codes, "item": item_codes, "order": order})
    split = leave_last_out(events, config.validation)

    profiles = release.users.drop_duplicates("UserID").set_index("UserID")
    zip_codes = profiles["Zip"].reindex(user_ids).reset_index(drop=True)
    silos = movielens.zip_zone_silos(zip_codes, config.min_silo_customers)
    titles = release.movies.drop_duplicates("MovieID").set_index("MovieID")["Title"]
    names = titles.reindex(item_ids)
    report = {
        "dataset": "movielens-1m",
        "source": origin,
        "ratings_file": release.ratings_file,
        "cleaning_rules": {
            "ratings": "every rating (1 to 5 stars) counts as an implicit interaction (NCF)",
            "users_without_profile": f"users missing from users.dat go to the "
            f"'{movielens.OTHER_SILO}' silo",
            "rated_movies_without_title": "rated movies missing from movies.dat keep an empty name",
        },
        "cleaning": {
            "ratings": len(ratings),
            "users": len(user_ids),
            "movies_rated": len(item_ids),
            "movies_listed": len(titles),
            "users_without_profile": int(zip_codes.isna().sum()),
            "rated_movies_without_title": int(names.isna().sum()),
        },
        "split_rule": split_rule,
        "split": split.counts,
        "silo_rule": "by the first digit of the user's zip code (US ZIP zones 0 to 9); zones with "
        f"fewer than {config.min_silo_customers} users and zip codes not starting with a digit "
        f"form the '{movielens.OTHER_SILO}' silo",
        "silos": _silo_table(silos.names, silos.user_silo, split),
        "merged_into_other": list(silos.merged_countries),
        "min_silo_customers": config.min_silo_customers,
    }
    if release.has_timestamps:
        report["date_range"] = [
            str(pd.to_datetime(ratings["Timestamp"].min(), unit="s")),
            str(pd.to_datetime(ratings["Timestamp"].max(), unit="s")),
        ]
    return _build(
        "movielens-1m",
        split,
        user_ids,
        item_ids,
        names.fillna("").to_numpy(dtype=object),
        silos.names,
        silos.user_silo,
        report,
    )


def amazon_file(config: DataConfig) -> tuple[Path, str]:
    """The Amazon file: data.path, else the data directory, else the official raw reviews."""
    _refuse_embedded(config)
    if config.dataset == amazon.SEQUENTIAL_DATASET:
        if config.source == "download":
            raise DataError(
                f"{amazon.SEQUENTIAL_DATASET} has no official download; set data.path to a file "
                "with one 'user item item ...' line per user"
            )
    elif config.source == "download":
        return _download_amazon(amazon.CATEGORIES[config.dataset])
    found = amazon.resolve_path(config.dataset, config.path or None, data_dir_from(config))
    if found is not None:
        return found
    return _download_amazon(amazon.CATEGORIES[config.dataset])


def load_amazon(config: DataConfig, seed: int = 0) -> RecDataset:
    path, origin = amazon_file(config)
    sequences = amazon.read_sequences(path)
    events = sequences.events
    # Codes in order of first appearance: sequential files number users and items that way.
    user_codes, user_ids = pd.factorize(events["user"])
    item_codes, item_ids = pd.factorize(events["item"])
    split = leave_last_out(
        pd.DataFrame({"user": user_codes, "item": item_codes, "order": events["position"]}),
        config.validation,
    )
    held = "the test item" + (", the one before the validation item" if config.validation else "")
    shard_names, user_shard = amazon.random_shards(
        len(user_ids), config.silos, derive_seed(seed, "silos", "random-shards")
    )
    report = {
        "dataset": config.dataset,
        "source": origin,
        "file_format": sequences.file_format,
        "cleaning_rules": {
            "interactions": "every item in a user's sequence counts as an implicit interaction",
        },
        "cleaning": {
            "interactions": len(events),
            "users": len(user_ids),
            "items": len(item_ids),
        },
        "split_rule": f"leave-one-out: each user's last item in time order is {held}; users "
        "with no item left to train on keep everything in training and are not evaluated",
        "split": split.counts,
        "silo_rule": f"no natural silo key: users are dealt at random into {config.silos} shards "
        f"of equal size, seeded by the run seed ({seed})",
        "silos": _silo_table(shard_names, user_shard, split),
    }
    if sequences.time_range is not None:
        report["date_range"] = [str(pd.to_datetime(t, unit="s")) for t in sequences.time_range]
    item_ids = np.asarray(item_ids, dtype=object)
    return _build(
        config.dataset, split, user_ids, item_ids, item_ids, shard_names, user_shard, report
    )


def _download_amazon(category: str) -> tuple[Path, str]:
    url = amazon.official_url(category)
    return fetch(url, amazon.raw_filename(category)), f"official release {url}"


def _refuse_embedded(config: DataConfig) -> None:
    if config.source == "embedded":
        raise DataError(
            f"{config.dataset} has no embedded copy (only online-retail ships with the package); "
            'set data.source = "auto" or "download"'
        )


def _build(
    name: str,
    split: SplitPairs,
    user_ids: pd.Index | np.ndarray,
    item_ids: pd.Index | np.ndarray,
    item_names: np.ndarray,
    silo_names: tuple[str, ...],
    user_silo: np.ndarray,
    report: dict,
) -> RecDataset:
    dataset = build_dataset(
        name=name,
        split=split,
        user_ids=np.asarray(user_ids),
        item_ids=np.asarray(item_ids),
        item_names=item_names,
        silo_names=silo_names,
        user_silo=user_silo,
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
