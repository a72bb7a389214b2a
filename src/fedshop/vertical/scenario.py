"""Who holds what: a label table and any number of feature tables about some of the same customers.

A `Scenario` is one `LabelTable` (rows with a label, e.g. rentals with their fit) and a list of
`PartyTable`s (one row per customer, any numeric and categorical columns), each with its own id
column. Every table can be written to its own parquet file, with its column types in the file's
metadata, so each party's process can be given only its own file.

`renttherunway_scenario` builds the honest two-party split of RentTheRunway (issue 19): the rental
platform holds the rentals and their fit labels, a partner (say a measurement service) holds one
profile per shopper. Shoppers are split by seed into A (platform only), B (both) and C (partner only),
so that neither party holds all customers of the other. `split_features` spreads one feature table's
columns over several holders (N > 1 feature holders).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fedshop.data.renttherunway import FIT_CLASSES, MEASUREMENT_COLUMNS, RentTheRunway
from fedshop.errors import DataError
from fedshop.seeding import derive_seed
from fedshop.storage.private_files import write_private

_METADATA_KEY = b"fedshop.party_table"


@dataclass(frozen=True)
class Columns:
    """A table's typed columns: the customer id, numeric and categorical inputs, and for a label
    table the label (its classes in index order) and the time that orders rows for the split."""

    id: str
    numeric: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    label: str | None = None
    classes: tuple[str, ...] = ()
    time: str | None = None

    @property
    def inputs(self) -> tuple[str, ...]:
        return (*self.numeric, *self.categorical)

    @property
    def all(self) -> tuple[str, ...]:
        extra = tuple(c for c in (self.label, self.time) if c)
        return (self.id, *self.inputs, *extra)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(data: Mapping) -> Columns:
        return Columns(
            id=str(data["id"]),
            numeric=tuple(data.get("numeric", ())),
            categorical=tuple(data.get("categorical", ())),
            label=data.get("label"),
            classes=tuple(data.get("classes", ())),
            time=data.get("time"),
        )


@dataclass(frozen=True)
class PartyTable:
    """One party's table: only the columns named in `columns`."""

    name: str
    frame: pd.DataFrame
    columns: Columns

    def __post_init__(self) -> None:
        missing = [c for c in self.columns.all if c not in self.frame.columns]
        if missing:
            raise DataError(f"party {self.name!r}: table lacks columns {missing}")
        extra = [c for c in self.frame.columns if c not in self.columns.all]
        if extra:
            raise DataError(f"party {self.name!r}: table has undeclared columns {extra}")

    @property
    def ids(self) -> np.ndarray:
        return np.unique(self.frame[self.columns.id].to_numpy(np.int64))

    def save(self, path: str | Path) -> Path:
        """Write the table to one parquet file, its name and column types in the file's metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pandas(self.frame, preserve_index=False)
        meta = {"name": self.name, "columns": self.columns.to_dict()}
        metadata = {**(table.schema.metadata or {}), _METADATA_KEY: json.dumps(meta).encode()}
        # Owner-only, as every file a party keeps (`storage/private_files.py`).
        buffer = io.BytesIO()
        pq.write_table(table.replace_schema_metadata(metadata), buffer)
        return write_private(path, buffer.getvalue())

    @staticmethod
    def load(path: str | Path) -> PartyTable:
        table = pq.read_table(path)
        raw = (table.schema.metadata or {}).get(_METADATA_KEY)
        if raw is None:
            raise DataError(f"{path}: not a party table (no {_METADATA_KEY.decode()} metadata)")
        meta = json.loads(raw)
        return PartyTable(meta["name"], table.to_pandas(), Columns.from_dict(meta["columns"]))


@dataclass(frozen=True)
class Scenario:
    label: PartyTable  # its columns name a label
    features: tuple[PartyTable, ...]
    info: dict = field(default_factory=dict)  # sizes and the rules that made them (JSON-able)

    def __post_init__(self) -> None:
        if not self.label.columns.label:
            raise DataError(f"party {self.label.name!r} holds no label column")
        names = [self.label.name, *(t.name for t in self.features)]
        if len(set(names)) != len(names):
            raise DataError(f"party names must differ, got {names}")

    def save(self, folder: str | Path) -> dict[str, Path]:
        """Each party's table in its own file, `<folder>/<party>.parquet`."""
        folder = Path(folder)
        return {t.name: t.save(folder / f"{t.name}.parquet") for t in (self.label, *self.features)}

    def aligned_ids(self) -> np.ndarray:
        """The customers every party holds, sorted: what PSI gives all of them (computed in the
        clear here, for the simulator)."""
        ids = self.label.ids
        for table in self.features:
            ids = np.intersect1d(ids, table.ids)
        return ids


PLATFORM_COLUMNS = Columns(
    id="user_id",
    numeric=("size",),
    categorical=("item_id", "category", "rented_for"),
    label="fit",
    classes=FIT_CLASSES,
    time="review_date",
)
PARTNER_COLUMNS = Columns(
    id="user_id",
    numeric=("height_in", "weight_lbs", "bust_size_num", "age"),
    categorical=("bust_size_letter", "body_type"),
)
DEFAULT_FRACTIONS = (0.3, 0.4, 0.3)  # A (platform only), B (both), C (partner only)
# The N = 2 exercise: body measurements at one holder, the shopper's profile at another.
TWO_HOLDERS = {
    "body": ("height_in", "weight_lbs", "bust_size_num", "bust_size_letter"),
    "profile": ("body_type", "age"),
}


def split_users(
    users: np.ndarray, fractions: Sequence[float], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted ids of A, B, C: the sorted distinct ids in a random order from the seed, the first
    round(f_A·n) to A, the next round(f_B·n) to B, the rest to C."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-9:
        raise DataError(f"user fractions (A, B, C) must be ≥ 0 and sum to 1, got {fractions}")
    users = np.unique(np.asarray(users, dtype=np.int64))
    order = np.random.default_rng(derive_seed(seed, "vertical", "users")).permutation(len(users))
    shuffled = users[order]
    n_a = round(fractions[0] * len(users))
    n_b = round(fractions[1] * len(users))
    parts = shuffled[:n_a], shuffled[n_a : n_a + n_b], shuffled[n_a + n_b :]
    return tuple(np.sort(p) for p in parts)  # type: ignore[return-value]


def latest_profiles(rentals: pd.DataFrame, columns: Sequence[str], id_column: str = "user_id"):
    """One row per customer: each column's value on the customer's latest record that has one
    (records ordered by review date, ties by file order). Customers with none of the columns are
    dropped; returns (profiles, number dropped)."""
    ordered = rentals.sort_values("review_date", kind="stable")
    profiles = ordered.groupby(id_column, observed=True)[list(columns)].last()
    empty = profiles.isna().all(axis=1)
    profiles = profiles.loc[~empty].reset_index()
    profiles[id_column] = profiles[id_column].astype(np.int64)
    return profiles, int(empty.sum())


def renttherunway_scenario(
    data: RentTheRunway,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    platform: str = "platform",
    partner: str = "partner",
) -> Scenario:
    """The platform (label holder) gets the rentals of A ∪ B with their fit label; the partner gets
    one profile per customer of B ∪ C. `data.rentals` may be a subsample of customers."""
    rentals = data.rentals
    a, b, c = split_users(rentals["user_id"].to_numpy(), fractions, seed)
    users = rentals["user_id"].to_numpy(np.int64)
    on_platform = rentals.loc[np.isin(users, np.concatenate([a, b])), list(PLATFORM_COLUMNS.all)]
    on_partner = rentals.loc[np.isin(users, np.concatenate([b, c]))]
    profiles, dropped = latest_profiles(on_partner, MEASUREMENT_COLUMNS)
    label = PartyTable(platform, on_platform.reset_index(drop=True), PLATFORM_COLUMNS)
    feature = PartyTable(partner, profiles[list(PARTNER_COLUMNS.all)], PARTNER_COLUMNS)
    info = {
        "dataset": "renttherunway",
        "source": data.source,
        "cleaning": dict(data.counts),
        "customers": len(np.unique(users)),
        "rentals": len(rentals),
        "fractions": {"A": fractions[0], "B": fractions[1], "C": fractions[2]},
        "customers_A": len(a),
        "customers_B": len(b),
        "customers_C": len(c),
        "platform_rentals": len(on_platform),
        "partner_profiles": len(profiles),
        "partner_dropped_without_measurements": dropped,
        "rule": (
            f"distinct user ids sorted, permuted by numpy default_rng(derive_seed({seed}, "
            "'vertical', 'users')); the first round(f_A n) are A (platform only), the next "
            "round(f_B n) B (both), the rest C (partner only). The platform holds the rentals of "
            "A and B (user, item, size, category, rented for, review date, fit); the partner one "
            "profile per customer of B and C (each measurement from the latest record that has "
            "it)."
        ),
    }
    return Scenario(label, (feature,), info)


def split_features(
    scenario: Scenario, groups: Mapping[str, Sequence[str]] = TWO_HOLDERS, which: int = 0
) -> Scenario:
    """The same scenario with feature table `which` split by column into one holder per group
    (each keeps every customer of the original, so the intersection does not change)."""
    source = scenario.features[which]
    cols = source.columns
    named = [c for group in groups.values() for c in group]
    if sorted(named) != sorted(cols.inputs):
        raise DataError(f"groups {dict(groups)} must cover {list(cols.inputs)} exactly once")
    holders = []
    for name, group in groups.items():
        columns = replace(
            cols,
            numeric=tuple(c for c in cols.numeric if c in group),
            categorical=tuple(c for c in cols.categorical if c in group),
        )
        holders.append(PartyTable(name, source.frame[list(columns.all)].copy(), columns))
    features = (*scenario.features[:which], *holders, *scenario.features[which + 1 :])
    info = {**scenario.info, "feature_groups": {k: list(v) for k, v in groups.items()}}
    return Scenario(scenario.label, features, info)


def temporal_test_mask(
    times: np.ndarray, ids: np.ndarray, test_fraction: float
) -> tuple[np.ndarray, str]:
    """The latest `test_fraction` of rows by time are the test set: rows ordered by (time, id, file
    order) and the last ceil(fraction · n) taken, so ties at the cut fall deterministically."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test fraction must be in (0, 1), got {test_fraction}")
    n = len(times)
    order = np.lexsort((np.arange(n), np.asarray(ids), np.asarray(times)))
    test = np.zeros(n, dtype=bool)
    test[order[n - int(np.ceil(test_fraction * n)) :]] = True
    rule = (
        f"rows ordered by (time, customer id, file order); the last ceil({test_fraction} n) "
        "are the test set"
    )
    return test, rule
