"""Datasets by name: resolve where the files are, load, clean, partition into silos, split."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from fedshop.choices import DATASETS
from fedshop.config import MAX_COLD_START, DataConfig, Environment
from fedshop.data import amazon, movielens, ncf_protocol, online_retail
from fedshop.data.cold_start import RULE as COLD_START_RULE
from fedshop.data.cold_start import build_cohort, draw_cohort
from fedshop.data.download import fetch
from fedshop.data.interactions import RecDataset, build_dataset, with_eval_negatives
from fedshop.data.partition import assign_silos, home_country
from fedshop.data.sequences import build_sequences
from fedshop.data.split import SplitPairs, leave_last_out, leave_random_out, temporal_split
from fedshop.errors import ConfigError, DataError
from fedshop.seeding import derive_seed


def load_dataset(
    config: DataConfig,
    seed: int = 0,
    env: Environment | None = None,
    cold_start: float = 0.0,
    protocol: str = "full",
) -> RecDataset:
    """Load `config.dataset`; `seed` (the run seed) drives the random splits and silo draws; `env`
    (default: the variables as set now) gives the data and cache folders the config leaves open.
    `cold_start` ([eval] cold_start): the fraction of eligible customers held out of training as
    new shoppers (datasets with purchase days only). `protocol` ([eval] protocol): "ncf" replaces
    the split by the NCF paper's published test set (MovieLens-1M only) and attaches its negatives."""
    load = DATASETS.get(config.dataset)  # one of the load_* functions below
    if protocol == "ncf":
        if config.dataset != "movielens-1m":
            raise ConfigError(
                f'[eval] protocol = "ncf" is the NCF paper\'s MovieLens-1M test set; '
                f"{config.dataset} has none (use full or sampled-100)"
            )
        if cold_start:
            raise ConfigError("[eval] cold_start needs purchase days; movielens-1m has none")
        return load_movielens(config, seed, env or Environment.from_os(), ncf=True)
    if not cold_start:
        return load(config, seed, env or Environment.from_os())
    if config.dataset not in DATASETS.names(tag="purchase-days"):
        raise ConfigError(
            f"[eval] cold_start needs purchase days; {config.dataset} has none "
            f"(supported: {', '.join(DATASETS.names(tag='purchase-days'))})"
        )
    if not 0.0 < cold_start <= MAX_COLD_START:
        raise ConfigError(f"[eval] cold_start must be in [0, {MAX_COLD_START}], got {cold_start}")
    return load(config, seed, env or Environment.from_os(), cold_start=cold_start)


def data_dir_from(config: DataConfig, env: Environment) -> str | None:
    """The data directory in force: the config's, else $FEDSHOP_DATA_DIR, else none."""
    return config.data_dir or env.data_dir or None


def online_retail_file(config: DataConfig, env: Environment | None = None) -> tuple[Path, str]:
    env = env or Environment.from_os()
    if config.source == "embedded":
        return online_retail.embedded_path(), "embedded copy (UCI Online Retail, CC BY 4.0)"
    if config.source == "download":
        path = fetch(online_retail.OFFICIAL_URL, "online_retail.zip", cache=env.cache_dir)
        return path, f"official release {online_retail.OFFICIAL_URL}"
    return online_retail.resolve_path(config.path or None, data_dir_from(config, env))


def load_cleaned_retail(
    config: DataConfig | None = None, env: Environment | None = None
) -> online_retail.CleanedRetail:
    """Online Retail, cleaned, from where `config` points (default: $FEDSHOP_DATA_DIR, else the
    embedded copy): the purchases and returns the retail tasks build their tables from."""
    path, origin = online_retail_file(config or DataConfig(), env)
    return online_retail.clean(online_retail.read_raw(path), source=origin)


def load_online_retail(
    config: DataConfig, seed: int, env: Environment, cold_start: float = 0.0
) -> RecDataset:
    path, origin = online_retail_file(config, env)
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
    silos = assign_silos(country, config.min_silo_customers, config.max_silos)
    user_silo, all_user_ids, all_user_silo = silos.user_silo, np.asarray(user_ids), silos.user_silo
    cohort = None
    if cold_start:
        # New shoppers leave before the split: no matrix, user index or catalogue sees them.
        days = lines[["user", "day"]].drop_duplicates().groupby("user").size()
        days = days.reindex(range(len(user_ids)), fill_value=0).to_numpy()
        cohort = draw_cohort(days, silos.user_silo, silos.names, cold_start, seed)
        cohort_lines = lines[lines["user"].isin(cohort)]
        lines, kept = _without_users(lines, cohort, len(user_ids))
        user_ids, user_silo = all_user_ids[kept], all_user_silo[kept]
    split = temporal_split(lines[["user", "item", "day"]], config.min_train_days, config.validation)

    # The most frequent description of each stock code names the item.
    names = (
        purchases.assign(item=item_codes)
        .groupby("item")["Description"]
        .agg(lambda s: s.value_counts().index[0])
        .reindex(range(len(item_ids)), fill_value="")
        .to_numpy()
    )
    # The typical unit price: the median over the item's purchase lines (robust to the odd
    # wholesale or mistyped line).
    prices = (
        purchases.assign(item=item_codes)
        .groupby("item")["UnitPrice"]
        .median()
        .reindex(range(len(item_ids)))
        .to_numpy(dtype=np.float64)
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
        "silos": _silo_table(silos.names, user_silo, split),
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
        user_silo=user_silo,
        report=report,
        item_prices=prices,
    )
    report["catalogue_items"] = dataset.n_items
    if cohort is not None:
        cold, counts = build_cohort(
            cohort_lines, cohort, all_user_ids, all_user_silo,
            np.unique(split.train["item"].to_numpy()),
        )  # fmt: skip
        report["cold_start"] = {
            "rule": COLD_START_RULE,
            "fraction": cold_start,
            "eligible": int((days >= 2).sum()),
            **counts,
            "per_silo": {
                name: {
                    "held_out": int((all_user_silo[cohort] == index).sum()),
                    "evaluated": int((cold.silo == index).sum()),
                }
                for index, name in enumerate(silos.names)
            },
        }
        dataset = replace(dataset, cold=cold)
    return dataset


def _without_users(
    lines: pd.DataFrame, users: np.ndarray, n_users: int
) -> tuple[pd.DataFrame, np.ndarray]:
    """`lines` without `users`' rows, the others renumbered 0, 1, …; and the kept users' old codes."""
    kept = np.setdiff1d(np.arange(n_users), users)
    renumber = np.full(n_users, -1, dtype=np.int64)
    renumber[kept] = np.arange(len(kept))
    rest = lines[~lines["user"].isin(users)]
    return rest.assign(user=renumber[rest["user"].to_numpy()]), kept


def movielens_location(config: DataConfig, env: Environment | None = None) -> tuple[Path, str]:
    """The MovieLens folder or zip: data.path, else the data directory, else the official zip."""
    env = env or Environment.from_os()
    _refuse_embedded(config)
    release = movielens.RELEASES[config.dataset]
    if config.source == "auto":
        data_dir = data_dir_from(config, env)
        found = movielens.resolve_location(config.path or None, data_dir, release)
        if found is not None:
            return found
    path = fetch(
        release.official_url,
        release.official_zip,
        sha256=release.official_sha256,
        cache=env.cache_dir,
    )
    return path, f"official release {release.official_url}"


def load_movielens(
    config: DataConfig, seed: int, env: Environment, ncf: bool = False
) -> RecDataset:
    """MovieLens-1M or -100K: leave-one-out by data.leave_out, one silo per US ZIP zone.

    With `ncf` (MovieLens-1M), the NCF paper's test pairs and negatives instead (see ncf_protocol)."""
    release = movielens.RELEASES[config.dataset]
    location, origin = movielens_location(config, env)
    data = movielens.read_movielens(location, release)
    ratings = data.ratings
    user_codes, user_ids = pd.factorize(ratings["UserID"], sort=True)
    item_codes, item_ids = pd.factorize(ratings["MovieID"], sort=True)
    # Equal timestamps keep file order: leave_last_out sorts stably.
    order = ratings["Timestamp"].to_numpy() if data.has_timestamps else None
    events = pd.DataFrame({"user": user_codes, "item": item_codes, "order": order})
    no_order = None if data.has_timestamps else f"{data.ratings_file} has no timestamps"
    ncf_negatives = None
    if ncf:
        split, split_rule, ncf_negatives, ncf_source = _ncf_split(
            config, seed, env, location, data, events, user_ids, no_order
        )
        origin += f"; test set: {ncf_source}"
    else:
        split, split_rule = _leave_one_out(
            config,
            seed,
            events,
            unit="rating",
            latest="most recent rating (by timestamp, ties by file order)",
            no_order=no_order,
        )
    split_rule += "; every rating counts as an implicit interaction"

    profiles = data.users.drop_duplicates("UserID").set_index("UserID")
    zip_codes = profiles["Zip"].reindex(user_ids).reset_index(drop=True)
    silos = movielens.zip_zone_silos(zip_codes, config.min_silo_customers)
    titles = data.movies.drop_duplicates("MovieID").set_index("MovieID")["Title"]
    names = titles.reindex(item_ids)
    report = {
        "dataset": config.dataset,
        "source": origin,
        "ratings_file": data.ratings_file,
        "cleaning_rules": {
            "ratings": "every rating (1 to 5 stars) counts as an implicit interaction (NCF)",
            "users_without_profile": f"users missing from {release.users_file} go to the "
            f"'{movielens.OTHER_SILO}' silo",
            "rated_movies_without_title": f"rated movies missing from {release.movies_file} keep "
            "an empty name",
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
    if data.has_timestamps:
        report["date_range"] = [
            str(pd.to_datetime(ratings["Timestamp"].min(), unit="s")),
            str(pd.to_datetime(ratings["Timestamp"].max(), unit="s")),
        ]
    dataset = _build(
        config.dataset,
        split,
        user_ids,
        item_ids,
        names.fillna("").to_numpy(dtype=object),
        silos.names,
        silos.user_silo,
        report,
        keep_all_items=ncf,
    )
    if ncf_negatives is None:
        return dataset
    return _with_ncf_negatives(dataset, ncf_negatives, seed, report)


def _ncf_split(
    config: DataConfig,
    seed: int,
    env: Environment,
    location: Path,
    data: movielens.MovieLens,
    events: pd.DataFrame,
    user_ids: pd.Index,
    no_order: str | None,
) -> tuple[SplitPairs, str, pd.DataFrame, str]:
    """The NCF test pairs as the test split, every other rating as training (minus a validation
    item per user when asked for). Returns the split, its rule, the negatives (user code, MovieID)
    and where the test files came from."""
    folder, source = ncf_protocol.locate(data_dir_from(config, env), location, env.cache_dir)
    test_set = ncf_protocol.read_test_set(folder, source)
    user_codes = events["user"].to_numpy()
    codes, rows, negative_movies = ncf_protocol.align(test_set, data.ratings, user_codes, user_ids)
    held = np.zeros(len(events), dtype=bool)
    held[rows] = True
    remaining = events.loc[~held].reset_index(drop=True)
    counts = {"users": len(user_ids), "ncf_test_pairs": len(rows)}
    rule = (
        "NCF protocol (He et al., WWW 2017): each user's test pair is the one in "
        f"{ncf_protocol.TEST_RATING} (their latest rating), ranked against the 99 negatives of "
        f"{ncf_protocol.TEST_NEGATIVE}; training is every other rating"
    )
    validation = None
    if config.validation:
        carved, carve_rule = _leave_one_out(
            replace(config, validation=False),
            seed,
            remaining,
            unit="rating",
            latest="most recent remaining rating",
            no_order=no_order,
        )
        remaining, validation = carved.train, carved.test
        rule += (
            "; validation (carved from training only, never from the test files): "
            + carve_rule.split(": ", 1)[1].replace("the test item", "the validation item")
        )
    train = remaining[["user", "item"]].drop_duplicates().reset_index(drop=True)
    test = pd.DataFrame({"user": codes, "item": events["item"].to_numpy()[rows]})
    # As in NCF's own code, the catalogue is every rated movie: a test or negative item nobody
    # rated in training stays (with its untrained vector) rather than leaving the test set.
    counts["test_items_unseen_in_training_kept"] = int(
        (~test["item"].isin(np.unique(train["item"].to_numpy()))).sum()
    )
    counts["train_pairs"] = len(train)
    counts["test_pairs"] = len(test)
    counts["test_users"] = int(test["user"].nunique())
    if validation is not None:
        counts["validation_pairs"] = len(validation)
        counts["validation_users"] = int(validation["user"].nunique())
    negatives = pd.DataFrame(
        {
            "user": np.repeat(codes, negative_movies.shape[1]),
            "movie": negative_movies.ravel(),
        }
    )
    split = SplitPairs(train=train, test=test, validation=validation, counts=counts)
    return split, rule, negatives, source


def _with_ncf_negatives(
    dataset: RecDataset, negatives: pd.DataFrame, seed: int, report: dict
) -> RecDataset:
    """Attach the published negatives (test) and, with a validation split, 99 fresh negatives per
    user drawn like NCF drew its own: among the items the user never rated."""
    position = pd.Series(np.arange(dataset.n_items), index=dataset.item_ids)
    item = position.reindex(negatives["movie"].to_numpy()).to_numpy()
    known = ~np.isnan(item)
    per_user = ncf_protocol.NEGATIVES_PER_USER
    test_negatives = np.full((dataset.n_users, per_user), -1, dtype=np.int64)
    users = negatives["user"].to_numpy().reshape(-1, per_user)[:, 0]
    test_negatives[users] = np.where(known, item, -1).astype(np.int64).reshape(-1, per_user)
    user_rows = negatives["user"].to_numpy()
    counts = report["split"]
    counts["ncf_negatives"] = len(item)
    counts["ncf_negatives_not_in_catalogue"] = int((~known).sum())
    for name, matrix in (("training", dataset.train), ("test", dataset.test)):
        rated = np.asarray(matrix.tocsr()[user_rows[known], item[known].astype(np.int64)]).ravel()
        # As published; NCF's evaluation scores a duplicate of the test item once, as we do.
        counts[f"ncf_negatives_rated_in_{name}_kept"] = int((rated > 0).sum())
    validation_negatives = None
    if dataset.validation is not None:  # drawn as sampled-100 draws them, 99 per user
        validation_negatives = with_eval_negatives(dataset, per_user, seed).eval_negatives
    return replace(
        dataset, eval_negatives=test_negatives, validation_negatives=validation_negatives
    )


def amazon_file(config: DataConfig, env: Environment | None = None) -> tuple[Path, str]:
    """The Amazon file: data.path, else the data directory, else the official raw reviews."""
    env = env or Environment.from_os()
    _refuse_embedded(config)
    if config.dataset == amazon.SEQUENTIAL_DATASET:
        if config.source == "download":
            raise DataError(
                f"{amazon.SEQUENTIAL_DATASET} has no official download; set data.path to a file "
                "with one 'user item item ...' line per user"
            )
    elif config.source == "download":
        return _download_amazon(amazon.CATEGORIES[config.dataset], env)
    found = amazon.resolve_path(config.dataset, config.path or None, data_dir_from(config, env))
    if found is not None:
        return found
    return _download_amazon(amazon.CATEGORIES[config.dataset], env)


def load_amazon(config: DataConfig, seed: int, env: Environment) -> RecDataset:
    path, origin = amazon_file(config, env)
    sequences = amazon.read_sequences(path)
    events = sequences.events
    # Codes in order of first appearance: sequential files number users and items that way.
    user_codes, user_ids = pd.factorize(events["user"])
    item_codes, item_ids = pd.factorize(events["item"])
    coded = pd.DataFrame({"user": user_codes, "item": item_codes, "order": events["position"]})
    split, split_rule = _leave_one_out(
        config, seed, coded, unit="item", latest="last item in time order"
    )
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
        "split_rule": split_rule,
        "split": split.counts,
        "silo_rule": f"no natural silo key: users are dealt at random into {config.silos} shards "
        f"of equal size, seeded by the run seed ({seed})",
        "silos": _silo_table(shard_names, user_shard, split),
    }
    if sequences.time_range is not None:
        report["date_range"] = [str(pd.to_datetime(t, unit="s")) for t in sequences.time_range]
    item_ids = np.asarray(item_ids, dtype=object)
    dataset = _build(
        config.dataset, split, user_ids, item_ids, item_ids, shard_names, user_shard, report
    )
    if config.leave_out != "last":  # sequences follow the time-ordered split only
        return dataset
    catalogue = np.unique(split.train["item"].to_numpy())
    held = 2 if config.validation else 1
    return replace(dataset, sequences=build_sequences(coded, len(user_ids), catalogue, held))


def _leave_one_out(
    config: DataConfig,
    seed: int,
    events: pd.DataFrame,
    unit: str,
    latest: str,
    no_order: str | None = None,
) -> tuple[SplitPairs, str]:
    """Split `events` (user, item, order) as `config.leave_out` says; the split and its rule text.

    `unit` names an interaction ("rating", "item") and `latest` what "last" means for the data.
    `no_order` says why the events have no meaningful order (then `order` is ignored): "last" then
    falls back to random, and the rule text says so. Random draws use the run seed, labelled by the
    dataset, so the same seed gives the same split.
    """
    validation = config.validation
    if config.leave_out == "last" and no_order is None:
        held = "the test item" + (", the one before the validation item" if validation else "")
        split = leave_last_out(events, validation)
        rule = f'leave-one-out, last (data.leave_out = "last"): each user\'s {latest} is {held}'
    else:
        split = leave_random_out(events, derive_seed(seed, "split", config.dataset), validation)
        if config.leave_out == "random":
            why = 'data.leave_out = "random"'
        else:
            why = f'data.leave_out = "last" is impossible: {no_order}'
        held = f"one {unit} drawn uniformly at random from the user's {unit}s is the test item"
        if validation:
            held += f" and a second random {unit} the validation item"
        rule = (
            f"leave-one-out at random ({why}): for each user, {held}, seeded by the run seed "
            f"({seed})"
        )
    rule += (
        f"; users with no {unit} left to train on keep everything in training and are not evaluated"
    )
    return split, rule


def _download_amazon(category: str, env: Environment) -> tuple[Path, str]:
    url = amazon.official_url(category)
    path = fetch(url, amazon.raw_filename(category), cache=env.cache_dir)
    return path, f"official release {url}"


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
    keep_all_items: bool = False,
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
        keep_all_items=keep_all_items,
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
