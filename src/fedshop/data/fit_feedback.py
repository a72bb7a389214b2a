"""Size and fit feedback as retailers' silos (issue 20): who rented which size of which product, and
whether it was small, fit or large.

- A *product* is a child product in Misra et al.'s sense: one item in one size. Products, items and
  sizes are a public catalogue, known to every party.
- *Silos* play separate shops. The default key is the occasion a dress was rented for (wedding,
  formal affair, party, everyday, work, date, vacation, other): eight shops of comparable size whose
  customers overlap, which is what makes federation worth it. `category-group` (dresses, tops,
  bottoms, outerwear, one-pieces) is the alternative; dresses then hold 87 % of the records.
- A shopper who rented from several silos is a separate customer of each: every silo keeps its own
  copy of her size (no cross-silo linkage). `FitSilo.users` are the global indices of its customers.
- *Splits*: `temporal` (the default) holds out each shopper's latest feedback for test and, with
  validation, the one before; a shopper with one record only trains. `random` is Misra et al.'s own
  protocol, a random 80:10:10 split of the records.
- *Measurements* (height, weight, bust, age, body type) describe the shopper; they are scaled by fixed
  constants written here, not by statistics of the data, so no party learns another's distribution.

Everything cleaning removes or re-routes is counted in the data report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fedshop.config import DataConfig, Environment, FitConfig
from fedshop.data.renttherunway import DATASET, FIT_CLASSES, RentTheRunway, load_renttherunway
from fedshop.errors import DataError
from fedshop.seeding import derive_seed

SILO_KEYS = ("rented-for", "category-group")
SPLITS = ("temporal", "random")
OTHER = "other"

# RentTheRunway's 68 categories in five shops; anything else (e.g. "print", "for") goes to "other".
CATEGORY_GROUPS = {
    "dresses": "dress gown sheath shift maxi mini shirtdress frock midi ballgown kaftan caftan",
    "tops": "top blouse shirt tank tunic tee t-shirt cami sweater cardigan pullover turtleneck "
    "sweatshirt sweatershirt hoodie knit henley buttondown crewneck blouson kimono",
    "bottoms": "skirt skirts pants pant culottes culotte leggings legging trouser trousers tight "
    "jogger jeans skort sweatpants",
    "outerwear": "jacket coat blazer down vest bomber cape poncho peacoat trench parka duster "
    "overcoat",
    "one-pieces": "jumpsuit romper suit overalls combo",
}
_GROUP_OF = {
    category: group for group, names in CATEGORY_GROUPS.items() for category in names.split()
}

# A priori scales of the numeric measurements (US adult women, rounded), not fitted to the data.
MEASUREMENT_SCALES = {
    "height_in": (65.0, 3.0),
    "weight_lbs": (140.0, 25.0),
    "bust_size_num": (34.0, 2.0),
    "age": (35.0, 10.0),
}
# The catalogue size a product is labelled with (RentTheRunway: 0 to 58), on the same a priori scale.
CATALOGUE_SIZE_SCALE = (12.0, 8.0)


def size_feature(sizes: np.ndarray) -> np.ndarray:
    """Catalogue sizes as the models read them (float32, centred and scaled by fixed constants)."""
    centre, scale = CATALOGUE_SIZE_SCALE
    return ((np.asarray(sizes, dtype=np.float64) - centre) / scale).astype(np.float32)


BUST_LETTERS = ("aa", "a", "b", "c", "d", "d+", "dd", "ddd/e", "f", "g", "h")
BODY_TYPES = (
    "hourglass", "athletic", "petite", "pear", "straight & narrow", "full bust", "apple",
)  # fmt: skip


@dataclass(frozen=True)
class FitRecords:
    """Rentals as aligned arrays: global shopper index, product index, label (0 small, 1 fit,
    2 large)."""

    user: np.ndarray
    product: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.label)

    def take(self, index: np.ndarray) -> FitRecords:
        return FitRecords(self.user[index], self.product[index], self.label[index])

    @staticmethod
    def concat(parts: list[FitRecords]) -> FitRecords:
        if not parts:
            return FitRecords(*(np.zeros(0, np.int64) for _ in range(3)))
        return FitRecords(*(np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS))

    def class_counts(self) -> list[int]:
        return np.bincount(self.label, minlength=len(FIT_CLASSES)).tolist()


_FIELDS = ("user", "product", "label")


@dataclass(frozen=True)
class FitSilo:
    """One shop: its own records, split, and its customers (sorted global indices)."""

    index: int
    name: str
    train: FitRecords
    validation: FitRecords
    test: FitRecords
    users: np.ndarray

    @property
    def n_users(self) -> int:
        return len(self.users)

    def local(self, records: FitRecords) -> np.ndarray:
        """The rows of `records`' shoppers in this silo's own tables."""
        return np.searchsorted(self.users, records.user)

    def heldout(self, split: str) -> FitRecords:
        return self.validation if split == "validation" else self.test


@dataclass(frozen=True)
class FitDataset:
    name: str
    source: str
    user_ids: np.ndarray  # original shopper id per global index
    item_ids: np.ndarray  # original item id per item index
    product_item: np.ndarray  # item index of each product
    product_size: np.ndarray  # the catalogue size of each product
    measurements: np.ndarray  # (shoppers, features) float32, scaled, missing as 0 plus a flag
    measurement_names: tuple[str, ...]
    silos: tuple[FitSilo, ...]
    report: dict = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_products(self) -> int:
        return len(self.product_item)

    @property
    def n_silos(self) -> int:
        return len(self.silos)

    @property
    def silo_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.silos)

    def pooled(self, split: str) -> FitRecords:
        """Every silo's records of `split` ("train", "validation", "test") together."""
        return FitRecords.concat([getattr(s, split) for s in self.silos])

    def products_of(self, item: int) -> np.ndarray:
        """The products (sizes) of item index `item`, smallest size first."""
        products = np.flatnonzero(self.product_item == item)
        return products[np.argsort(self.product_size[products], kind="stable")]


def silo_key(rentals: pd.DataFrame, key: str) -> tuple[pd.Series, dict[str, int]]:
    """Each rental's shop under `key`, and how many rentals went to "other" for want of one."""
    if key == "rented-for":
        shop = rentals["rented_for"].astype("string").str.strip().str.lower()
        missing = shop.isna() | (shop == "")
        counts = {"silo_key_missing_to_other": int(missing.sum())}
        # "party: cocktail" appears in some copies of the release: the same occasion as "party".
        shop = shop.str.replace(r"^party:.*$", "party", regex=True)
        return shop.where(~missing, OTHER), counts
    if key == "category-group":
        category = rentals["category"].astype("string").str.strip().str.lower()
        shop = category.map(_GROUP_OF)
        unknown = shop.isna()
        counts = {"category_not_in_a_group_to_other": int(unknown.sum())}
        return shop.where(~unknown, OTHER).astype("string"), counts
    raise DataError(f"[fit] silos must be one of {', '.join(SILO_KEYS)}; got '{key}'")


def measurement_matrix(rentals: pd.DataFrame, user_codes: np.ndarray, n_users: int):
    """Each shopper's measurements (her last non-missing value of each), scaled by the a priori
    constants; a missing value is 0 with its flag set. Returns (matrix, feature names)."""
    by_user = rentals.assign(_user=user_codes).groupby("_user", sort=True)
    columns, names = [], []
    for name, (centre, scale) in MEASUREMENT_SCALES.items():
        value = by_user[name].last().reindex(range(n_users)).to_numpy(dtype=np.float64)
        missing = np.isnan(value)
        columns += [np.where(missing, 0.0, (value - centre) / scale), missing.astype(float)]
        names += [name, f"{name}_missing"]
    for name, levels in (("bust_size_letter", BUST_LETTERS), ("body_type", BODY_TYPES)):
        value = by_user[name].last().reindex(range(n_users)).astype("string")
        for level in levels:
            columns.append((value == level).fillna(False).to_numpy(dtype=float))
            names.append(f"{name}={level}")
    return np.stack(columns, axis=1).astype(np.float32), tuple(names)


def split_records(
    rentals: pd.DataFrame, user_codes: np.ndarray, kind: str, validation: bool, seed: int
) -> tuple[np.ndarray, dict[str, int]]:
    """0 train, 1 validation, 2 test for every rental, and what the rule did."""
    part = np.zeros(len(rentals), dtype=np.int8)
    if kind == "random":
        draw = np.random.default_rng(derive_seed(seed, "fit", "random-split")).random(len(part))
        part[draw >= 0.8] = 2
        if validation:
            part[(draw >= 0.7) & (draw < 0.8)] = 1  # 70:10:20 → 80:10:10 of all records
            part[(draw >= 0.8) & (draw < 0.9)] = 0
            part[draw >= 0.9] = 2
        return part, {}
    if kind != "temporal":
        raise DataError(f"[fit] split must be one of {', '.join(SPLITS)}; got '{kind}'")
    # Latest first within each shopper; equal dates keep the file's order (later rows are later).
    order = pd.DataFrame(
        {"user": user_codes, "date": rentals["review_date"].to_numpy(), "row": np.arange(len(part))}
    ).sort_values(["user", "date", "row"], ascending=[True, False, False], na_position="last")
    rank = order.groupby("user", sort=False).cumcount().to_numpy()
    sizes = np.bincount(user_codes)[order["user"].to_numpy()]
    rows = order["row"].to_numpy()
    part[rows[(rank == 0) & (sizes >= 2)]] = 2
    if validation:
        part[rows[(rank == 1) & (sizes >= 3)]] = 1
    return part, {
        "shoppers_with_one_record_train_only": int((np.bincount(user_codes) == 1).sum()),
        "rentals_without_date_ranked_oldest": int(rentals["review_date"].isna().sum()),
    }


def build_fit_dataset(
    data: RentTheRunway,
    silos: str = "rented-for",
    split: str = "temporal",
    validation: bool = False,
    seed: int = 0,
    max_shoppers: int = 0,
) -> FitDataset:
    rentals = data.rentals
    counts = dict(data.counts)
    no_size = rentals["size"].isna()
    counts["dropped_unknown_size"] = int(no_size.sum())
    rentals = rentals.loc[~no_size].reset_index(drop=True)
    if max_shoppers:
        shoppers = np.sort(rentals["user_id"].unique())
        if max_shoppers < len(shoppers):
            rng = np.random.default_rng(derive_seed(seed, "fit", "shoppers"))
            kept = rng.choice(shoppers, size=max_shoppers, replace=False)
            rentals = rentals.loc[rentals["user_id"].isin(kept)].reset_index(drop=True)
            counts["shoppers_left_out_by_max_shoppers"] = len(shoppers) - max_shoppers
    if rentals.empty:
        raise DataError(f"{data.source}: no rental with a fit label and a size is left")
    user_codes, user_ids = pd.factorize(rentals["user_id"], sort=True)
    item_codes, item_ids = pd.factorize(rentals["item_id"], sort=True)
    product_keys = pd.MultiIndex.from_arrays([item_codes, rentals["size"].to_numpy()])
    product_codes, products = pd.factorize(product_keys, sort=True)
    labels = rentals["fit"].cat.codes.to_numpy().astype(np.int64)
    shop, silo_counts = silo_key(rentals, silos)
    counts.update(silo_counts)
    part, split_counts = split_records(rentals, user_codes, split, validation, seed)
    counts.update(split_counts)
    measurements, names = measurement_matrix(rentals, user_codes, len(user_ids))

    records = FitRecords(user_codes.astype(np.int64), product_codes.astype(np.int64), labels)
    sizes = shop.value_counts()
    ordered = sorted(sizes.index, key=lambda name: (-sizes[name], name))
    built = []
    shop_values = shop.to_numpy()
    for index, name in enumerate(ordered):
        mine = shop_values == name
        parts = [records.take(np.flatnonzero(mine & (part == p))) for p in (0, 1, 2)]
        users = np.unique(records.user[mine])
        built.append(FitSilo(index, str(name), *parts, users=users))
    dataset = FitDataset(
        name=DATASET,
        source=data.source,
        user_ids=np.asarray(user_ids),
        item_ids=np.asarray(item_ids),
        product_item=np.asarray(products.get_level_values(0), dtype=np.int64),
        product_size=np.asarray(products.get_level_values(1), dtype=np.float64),
        measurements=measurements,
        measurement_names=names,
        silos=tuple(built),
    )
    report = {
        "dataset": DATASET,
        "task": "fit",
        "source": data.source,
        "cleaning": counts,
        "cleaning_rules": {
            "fit_label": "rentals without small/fit/large are dropped",
            "size": "rentals without a size are dropped: a product is an item in one size",
            "silo_key": f"silos by {silos}; rentals without one go to '{OTHER}'",
        },
        "split_rule": (
            "temporal: each shopper's latest feedback (by review date) is the test record"
            + (", the one before it validation" if validation else "")
            + "; shoppers with one record only train"
            if split == "temporal"
            else "random: 80:10:10 of all records (Misra et al. 2018), seeded by the run seed"
        ),
        "shoppers": dataset.n_users,
        "items": len(item_ids),
        "products": dataset.n_products,
        "labels": dict(zip(FIT_CLASSES, records.class_counts(), strict=True)),
        "silos": silo_table(dataset),
        "shoppers_in_several_silos": _shared_shoppers(dataset),
    }
    return FitDataset(**{**dataset.__dict__, "report": report})


def silo_table(dataset: FitDataset) -> list[dict]:
    """Per silo: customers, records per split and label, and held-out records whose product or
    shopper the silo never saw in training (what a shop alone cannot know)."""
    rows = []
    for silo in dataset.silos:
        seen_products = np.zeros(dataset.n_products, dtype=bool)
        seen_products[silo.train.product] = True
        seen_users = np.zeros(dataset.n_users, dtype=bool)
        seen_users[silo.train.user] = True
        test = silo.test
        rows.append(
            {
                "silo": silo.name,
                "customers": silo.n_users,
                "train": len(silo.train),
                "validation": len(silo.validation),
                "test": len(test),
                "train_labels": dict(zip(FIT_CLASSES, silo.train.class_counts(), strict=True)),
                "test_product_unseen_in_silo": int((~seen_products[test.product]).sum()),
                "test_shopper_unseen_in_silo": int((~seen_users[test.user]).sum()),
            }
        )
    return rows


def _shared_shoppers(dataset: FitDataset) -> dict[str, int]:
    per_user = np.zeros(dataset.n_users, dtype=np.int64)
    for silo in dataset.silos:
        per_user[silo.users] += 1
    return {"in_two_or_more": int((per_user >= 2).sum()), "max_silos": int(per_user.max())}


def load_fit_dataset(
    config: DataConfig, fit: FitConfig, seed: int, env: Environment | None = None
) -> FitDataset:
    """The fit dataset a run's [data] and [fit] sections name: data.path, else the data directory
    ([data] data_dir, else $FEDSHOP_DATA_DIR), else (source auto or download) the official release."""
    env = env or Environment.from_os()
    if config.source == "embedded":
        raise DataError("RentTheRunway is not embedded (research use): give a data directory")
    data = load_renttherunway(
        None if config.source == "download" else (config.data_dir or env.data_dir or None),
        config.path or None,
        download=config.source in ("auto", "download"),
    )
    return build_fit_dataset(data, fit.silos, fit.split, config.validation, seed, fit.max_shoppers)
