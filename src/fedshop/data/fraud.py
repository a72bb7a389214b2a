"""E-commerce fraud (issue "fraud detection", `--task fraud`): the "Fraud ecommerce" table, one row per
user's first purchase with a fraud label, its IP address mapped to a country, one silo per country.

The data: Kaggle dataset vbinh002/fraud-ecommerce (Binh Vu, 2018), originally the "Identifying
fraudulent activities" take-home data challenge. Two files:
- `Fraud_Data.csv`: 151,112 purchases, 14,151 of them fraud; columns FRAUD_COLUMNS;
- `IpAddress_to_Country.csv`: 138,846 numeric IP ranges, each with its country.
No licence is stated by the publisher (Amazon's fraud-dataset-benchmark lists it as "Source license:
None"), so the table is not shipped inside the package unless `embedded/ecommerce_fraud.parquet` is
added; it is read from a data directory (`$FEDSHOP_DATA_DIR` or data.data_dir), folder FOLDER:
- the two published csv files (checked against their published git blob ids, GIT_BLOBS), or
- `fraud-ecommerce.zip`, the Kaggle download holding them, or
- `ecommerce_fraud.parquet`: the two joined (FRAUD_COLUMNS + country), as `scripts/build_fraud_data.py`
  writes it; checked against JOINED_SHA256 when that is set.

`build_fraud_dataset` turns the table into a `TabularDataset(kind="binary")`: silos are countries
(the largest `countries` each a silo, the rest one "Other" silo, unmapped IPs one "Unknown" silo). The
split (FraudSettings.split) is by calendar day by default: every fifth day is a test day, the same days
for every silo, so a burst of purchases on one day stays on one side. A strict time split ("time":
the last fifth of purchases) is offered but leaves little to learn: the table's easiest frauds
(purchases seconds after signup, most from shared devices) all fall in the first fortnight of 2015,
and a model tested on the later months scores near the base rate. "random" stratifies per silo. The
features are fixed transforms of one silo's own rows; the two counts (earlier purchases from the same
device, from the same IP address) look only at the silo's own earlier rows, training rows only for a
training row, so nothing of another silo or of a test row reaches a training row's inputs.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from fedshop.data.tabular import TabularDataset, TabularPart, TabularSilo
from fedshop.errors import DataError

DATASET = "ecommerce_fraud"
FOLDER = "ecommerce_fraud"
FRAUD_CSV = "Fraud_Data.csv"
IP_CSV = "IpAddress_to_Country.csv"
KAGGLE_ZIP = "fraud-ecommerce.zip"
JOINED = "ecommerce_fraud.parquet"
OFFICIAL_PAGE = "https://www.kaggle.com/datasets/vbinh002/fraud-ecommerce"
# Kaggle's download of that page (a zip of the two csv files); it may ask for a Kaggle login.
OFFICIAL_URL = "https://www.kaggle.com/api/v1/datasets/download/vbinh002/fraud-ecommerce"
# Where the two files are fetched from when Kaggle refuses: a public repository holding the published
# bytes, pinned to a commit (the git blob ids below are checked either way).
MIRROR_URL = (
    "https://raw.githubusercontent.com/bruno-raffa/Fraud-Detection/"
    "41a1881bab20efb773fe1928548dc82c61f7e476/{name}"
)
# The published files' git blob ids (sha1 of b"blob <size>\0" + the bytes): the same two ids in six
# public repositories that hold the files (e.g. bruno-raffa/Fraud-Detection @ 41a1881b, Hweihang00/
# DSA4263-Ecommerce-Fraud-Detection @ 595a0a0c : data/raw/), so any copy can be checked byte for byte.
GIT_BLOBS = {
    FRAUD_CSV: "1583f7592875c9b1355c7f7e9b851d63bb486b83",
    IP_CSV: "b1c709cd98f20e120004a994692959a65e529d9c",
}
# sha256 of the joined parquet once one is built and pinned (scripts/build_fraud_data.py prints it).
JOINED_SHA256: str | None = None
PUBLISHED = {"rows": 151_112, "frauds": 14_151, "ip_ranges": 138_846}

FRAUD_COLUMNS = (
    "user_id",
    "signup_time",
    "purchase_time",
    "purchase_value",
    "device_id",
    "source",
    "browser",
    "sex",
    "age",
    "ip_address",
    "class",
)
IP_COLUMNS = ("lower_bound_ip_address", "upper_bound_ip_address", "country")
UNKNOWN = "Unknown"  # an IP address in no published range
OTHER = "Other"  # the countries that are not their own silo

# Fixed vocabularies (the published values); code 0 = anything else.
VOCABULARIES = {
    "source": ("Ads", "Direct", "SEO"),
    "browser": ("Chrome", "FireFox", "IE", "Opera", "Safari"),
    "sex": ("F", "M"),
}
NUMERIC_NAMES = [
    "log_seconds_to_purchase",  # log1p(seconds from signup to purchase) / 16 (120 days ≈ 1)
    "log_purchase_value",  # log1p(purchase value in USD) / 5
    "age",  # years / 100
    "purchase_hour_sin",
    "purchase_hour_cos",
    "purchase_weekday_sin",
    "purchase_weekday_cos",
    "signup_hour_sin",
    "signup_hour_cos",
    "log_device_seen",  # log1p(earlier purchases in this silo from the same device) / 3
    "log_ip_seen",  # log1p(earlier purchases in this silo from the same IP address) / 3
]


SPLITS = ("time", "days", "random")


@dataclass(frozen=True)
class FraudSettings:
    countries: int = 20  # the countries with the most purchases, each its own silo
    rest: str = "other"  # the other countries: "other" (one silo named OTHER) or "drop"
    unknown: str = "silo"  # purchases from unmapped IPs: "silo" (named UNKNOWN), "other" or "drop"
    # "time": one calendar cut, the test period last; "days": every 1/test_fraction-th calendar day
    # (the same days for all silos; a day's purchases stay together); "random": stratified per silo.
    split: str = "days"
    test_fraction: float = 0.2  # time: the cut is the day by which 1 - this of purchases were made
    test_from: str | None = None  # time: an explicit first test day (YYYY-MM-DD) instead
    seed: int = 0  # days and random splits
    verify: bool = True  # check the files' published checksums
    require_complete: bool = True  # the published row and fraud counts, else a DataError

    def __post_init__(self) -> None:
        if self.countries < 0:
            raise DataError(f"countries = {self.countries}: expected >= 0")
        if self.rest not in ("other", "drop"):
            raise DataError(f"rest = {self.rest!r}: expected 'other' or 'drop'")
        if self.unknown not in ("silo", "other", "drop"):
            raise DataError(f"unknown = {self.unknown!r}: expected 'silo', 'other' or 'drop'")
        if self.split not in SPLITS:
            raise DataError(f"split = {self.split!r}: expected one of {SPLITS}")
        if not 0.0 < self.test_fraction < 1.0:
            raise DataError(f"test_fraction = {self.test_fraction}: expected between 0 and 1")


@dataclass(frozen=True)
class FraudTable:
    purchases: pd.DataFrame  # FRAUD_COLUMNS + country, original row order
    source: str  # the file(s) read
    counts: dict = field(default_factory=dict)  # rows, frauds, IP mapping, checksums


def git_blob_sha1(data: bytes) -> str:
    """Git's id of a file with these bytes (what `git hash-object` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def embedded_path() -> Path:
    return Path(str(resources.files("fedshop.data.embedded").joinpath(JOINED)))


def find_source(data_dir: str | Path | None) -> Path | None:
    """The table in `data_dir`/FOLDER (joined parquet, the two csv files, or the Kaggle zip), else
    the embedded copy when the package has one, else None."""
    if data_dir:
        base = Path(data_dir).expanduser() / FOLDER
        for name in (JOINED, FRAUD_CSV, KAGGLE_ZIP):
            if (base / name).is_file():
                return base / name
    embedded = embedded_path()
    return embedded if embedded.is_file() else None


def locate(data_dir: str | Path | None, download: bool = False) -> Path:
    found = find_source(data_dir)
    if found is not None:
        return found
    where = (
        f"put {FRAUD_CSV} and {IP_CSV} (or {KAGGLE_ZIP}, or {JOINED}) from {OFFICIAL_PAGE} "
        f"in <data dir>/{FOLDER}/ and set FEDSHOP_DATA_DIR (or data.data_dir)"
    )
    looked = f"no e-commerce fraud table in {Path(data_dir) / FOLDER}" if data_dir else (
        "no data directory (FEDSHOP_DATA_DIR) and no embedded copy"
    )  # fmt: skip
    if not download:
        raise DataError(f"{looked}: {where}")
    from fedshop.data.download import fetch

    try:
        return fetch(OFFICIAL_URL, f"{FOLDER}/{KAGGLE_ZIP}")
    except DataError as kaggle:
        try:
            fetch(MIRROR_URL.format(name=IP_CSV), f"{FOLDER}/{IP_CSV}")  # read beside the other
            return fetch(MIRROR_URL.format(name=FRAUD_CSV), f"{FOLDER}/{FRAUD_CSV}")
        except DataError as mirror:
            raise DataError(f"{looked}; and {kaggle}; and {mirror}; {where}") from None


def load_fraud(
    data_dir: str | Path | None = None,
    path: str | Path | None = None,
    download: bool = False,
    verify: bool = True,
    require_complete: bool = True,
) -> FraudTable:
    """The purchases with their country, from `path` (a joined parquet, Fraud_Data.csv with
    IpAddress_to_Country.csv beside it, or the Kaggle zip), else from `data_dir` (not given:
    $FEDSHOP_DATA_DIR), else the embedded copy, else (with `download`) Kaggle's download."""
    if path is None and data_dir is None:
        from fedshop.config import Environment

        data_dir = Environment.from_os().data_dir or None
    file = Path(path).expanduser() if path else locate(data_dir, download)
    if not file.is_file():
        raise DataError(f"e-commerce fraud file not found: {file}")
    counts: dict = {}
    if file.suffix == ".parquet":
        purchases = _read_joined(file, verify, counts)
    else:
        fraud_bytes, ip_bytes = _read_pair(file)
        if verify:
            _check_blob(FRAUD_CSV, fraud_bytes, file)
            _check_blob(IP_CSV, ip_bytes, file)
        counts["checksum"] = "git blob ids match the published files" if verify else "not checked"
        purchases = parse_purchases(_read_csv(fraud_bytes, FRAUD_CSV), counts)
        ranges = parse_ranges(_read_csv(ip_bytes, IP_CSV), counts)
        purchases["country"] = map_countries(purchases["ip_address"].to_numpy(), ranges)
    unmapped = purchases["country"] == UNKNOWN
    counts.update(
        rows=len(purchases),
        frauds=int(purchases["class"].sum()),
        unmapped_ips=int(unmapped.sum()),
        unmapped_frauds=int(purchases.loc[unmapped, "class"].sum()),
        countries=int(purchases.loc[~unmapped, "country"].nunique()),
    )
    if require_complete and (counts["rows"], counts["frauds"]) != (
        PUBLISHED["rows"],
        PUBLISHED["frauds"],
    ):
        raise DataError(
            f"{file}: {counts['rows']:,} purchases with {counts['frauds']:,} frauds, the published "
            f"table has {PUBLISHED['rows']:,} with {PUBLISHED['frauds']:,} (a partial copy? pass "
            "require_complete=False to use it anyway)"
        )
    return FraudTable(purchases, str(file), counts)


def _read_pair(file: Path) -> tuple[bytes, bytes]:
    """The bytes of the two csv files: from the zip, or `file` and its neighbour."""
    if file.suffix == ".zip":
        try:
            with zipfile.ZipFile(file) as archive:
                members = {Path(name).name: name for name in archive.namelist()}
                missing = [n for n in (FRAUD_CSV, IP_CSV) if n not in members]
                if missing:
                    raise DataError(f"{file}: no {', '.join(missing)} inside")
                return archive.read(members[FRAUD_CSV]), archive.read(members[IP_CSV])
        except zipfile.BadZipFile as exc:
            raise DataError(f"cannot read {file}: {exc}") from None
    ip_file = file.with_name(IP_CSV)
    if not ip_file.is_file():
        raise DataError(f"{file}: {IP_CSV} must sit beside it (the IP ranges of the countries)")
    return file.read_bytes(), ip_file.read_bytes()


def _check_blob(name: str, data: bytes, where: Path) -> None:
    actual = git_blob_sha1(data)
    if actual != GIT_BLOBS[name]:
        raise DataError(
            f"{name} in {where.parent if where.suffix != '.zip' else where} is not the published "
            f"file (git blob {actual}, published {GIT_BLOBS[name]}); use the original from "
            f"{OFFICIAL_PAGE}, or pass verify=False to read it anyway"
        )


def _read_csv(data: bytes, name: str) -> pd.DataFrame:
    try:
        return pd.read_csv(io.BytesIO(data), encoding="utf-8-sig", dtype=str)
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot read {name}: {exc}") from None


def _read_joined(file: Path, verify: bool, counts: dict) -> pd.DataFrame:
    if verify and JOINED_SHA256 is not None:
        from fedshop.data.download import sha256_of

        if sha256_of(file) != JOINED_SHA256:
            raise DataError(f"{file} does not match its pinned sha256 {JOINED_SHA256}")
        counts["checksum"] = "sha256 matches the pinned joined copy"
    else:
        counts["checksum"] = "not checked (no pinned sha256)"
    try:
        raw = pd.read_parquet(file)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {file}: {exc}") from None
    if "country" not in raw.columns:
        raise DataError(f"{file}: no country column (expected {FRAUD_COLUMNS} + country)")
    purchases = parse_purchases(raw.drop(columns=["country"]), counts)
    purchases["country"] = raw.loc[purchases.index, "country"].astype(str).to_numpy()
    return purchases.reset_index(drop=True)


def parse_purchases(raw: pd.DataFrame, counts: dict | None = None) -> pd.DataFrame:
    """FRAUD_COLUMNS typed; a DataError for missing columns or labels other than 0/1. Rows with a
    missing or unreadable value are dropped and counted (the published table has none)."""
    missing = [c for c in FRAUD_COLUMNS if c not in raw.columns]
    if missing:
        raise DataError(f"{FRAUD_CSV}: missing columns {missing} (expected {list(FRAUD_COLUMNS)})")
    frame = raw.loc[:, list(FRAUD_COLUMNS)].copy()
    for column in ("signup_time", "purchase_time"):
        frame[column] = _times(frame[column])
    for column in ("user_id", "purchase_value", "age", "ip_address", "class"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    incomplete = frame.isna().any(axis=1)
    if counts is not None:
        counts["dropped_incomplete"] = int(incomplete.sum())
    frame = frame.loc[~incomplete]
    labels = frame["class"].to_numpy()
    if not np.isin(labels, (0, 1)).all():
        raise DataError(f"{FRAUD_CSV}: class must be 0 or 1, found {sorted(set(labels) - {0, 1})}")
    frame["user_id"] = frame["user_id"].astype(np.int64)
    frame["age"] = frame["age"].astype(np.int64)
    frame["class"] = frame["class"].astype(np.int8)
    frame["purchase_value"] = frame["purchase_value"].astype(np.float64)
    frame["ip_address"] = frame["ip_address"].astype(np.float64)
    for column in ("device_id", "source", "browser", "sex"):
        frame[column] = frame[column].astype(str).str.strip()
    return frame.reset_index(drop=True)


def _times(values: pd.Series) -> pd.Series:
    """Published format first (2015-02-24 22:55:49); re-saved copies (2/24/2015 22:55) otherwise."""
    if pd.api.types.is_datetime64_any_dtype(values):
        return values
    try:
        return pd.to_datetime(values, format="%Y-%m-%d %H:%M:%S")
    except (ValueError, TypeError):
        return pd.to_datetime(values, format="mixed", errors="coerce")


def parse_ranges(raw: pd.DataFrame, counts: dict | None = None) -> pd.DataFrame:
    """IP_COLUMNS typed and sorted by lower bound; a DataError for missing columns. Ranges with an
    unreadable bound or ending before they start are dropped and counted (re-saved copies have a few
    bounds rounded to 3 digits by a spreadsheet)."""
    missing = [c for c in IP_COLUMNS if c not in raw.columns]
    if missing:
        raise DataError(f"{IP_CSV}: missing columns {missing} (expected {list(IP_COLUMNS)})")
    ranges = raw.loc[:, list(IP_COLUMNS)].copy()
    for column in IP_COLUMNS[:2]:
        ranges[column] = pd.to_numeric(ranges[column], errors="coerce")
    bad = ranges.isna().any(axis=1) | (ranges[IP_COLUMNS[1]] < ranges[IP_COLUMNS[0]])
    ranges = ranges.loc[~bad]
    ranges["country"] = ranges["country"].astype(str).str.strip()
    ranges = ranges.sort_values(IP_COLUMNS[0], kind="stable").reset_index(drop=True)
    if counts is not None:
        lower = ranges[IP_COLUMNS[0]].to_numpy()
        upper = ranges[IP_COLUMNS[1]].to_numpy()
        counts["ip_ranges"] = len(ranges)
        counts["ip_ranges_dropped"] = int(bad.sum())
        counts["ip_ranges_overlapping"] = int((lower[1:] <= upper[:-1]).sum())
    return ranges


def map_countries(ip: np.ndarray, ranges: pd.DataFrame) -> np.ndarray:
    """Each numeric IP address's country: the range with lower <= ip <= upper, found by binary
    search over the ranges sorted by lower bound (the last one starting at or below ip), UNKNOWN
    where that range ends below ip or there is none."""
    ip = np.asarray(ip, np.float64)
    if not len(ranges):
        return np.full(len(ip), UNKNOWN, dtype=object)
    lower = ranges[IP_COLUMNS[0]].to_numpy(np.float64)
    upper = ranges[IP_COLUMNS[1]].to_numpy(np.float64)
    country = ranges["country"].to_numpy(object)
    at = np.searchsorted(lower, ip, side="right") - 1
    safe = np.clip(at, 0, None)
    held = (at >= 0) & (ip <= upper[safe])
    return np.where(held, country[safe], UNKNOWN).astype(object)


def assign_silos(countries: pd.Series, settings: FraudSettings) -> tuple[pd.Series, list[str]]:
    """Each purchase's silo name (None: dropped) and the silo order: the `countries` largest
    countries by purchases (ties by name), then OTHER, then UNKNOWN."""
    sizes = countries[countries != UNKNOWN].value_counts()
    ranked = sorted(sizes.items(), key=lambda item: (-item[1], item[0]))
    own = [name for name, _ in ranked[: settings.countries]]
    silo = countries.where(countries.isin(own) | (countries == UNKNOWN), OTHER)
    if settings.rest == "drop":
        silo = silo.where(silo != OTHER, None)
    if settings.unknown == "other":
        silo = silo.where(countries != UNKNOWN, None if settings.rest == "drop" else OTHER)
    elif settings.unknown == "drop":
        silo = silo.where(countries != UNKNOWN, None)
    present = set(silo.dropna())
    order = [name for name in [*own, OTHER, UNKNOWN] if name in present]
    return silo, order


def test_cut(purchase_time: pd.Series, settings: FraudSettings) -> pd.Timestamp:
    """The first day of the test period: `test_from`, else the day by which 1 - test_fraction of
    all purchases were made (one calendar date that every silo uses)."""
    if settings.test_from:
        return pd.Timestamp(settings.test_from)
    return purchase_time.quantile(1.0 - settings.test_fraction).floor("D")


def test_days(purchase_time: pd.Series, settings: FraudSettings) -> tuple[np.ndarray, int]:
    """Which purchases fall on a test day: every round(1 / test_fraction)-th calendar day counted
    from the first purchase's, starting at day `seed` (the same days for every silo; spread evenly,
    so each month, the first fortnight's bursts included, gives its share of test days)."""
    day = purchase_time.dt.floor("D")
    index = ((day - day.min()) // pd.Timedelta(days=1)).to_numpy()
    period = max(2, round(1.0 / settings.test_fraction))
    is_test = index % period == settings.seed % period
    return is_test, len(np.unique(index[is_test]))


def build_fraud_dataset(
    settings: FraudSettings | None = None,
    data_dir: str | Path | None = None,
    path: str | Path | None = None,
    download: bool = False,
    table: FraudTable | None = None,
) -> TabularDataset:
    """The e-commerce fraud table as one silo per country (see the module docstring)."""
    settings = settings or FraudSettings()
    if table is None:
        table = load_fraud(data_dir, path, download, settings.verify, settings.require_complete)
    purchases = table.purchases
    silo_of, order = assign_silos(purchases["country"], settings)
    report: dict = {
        "source": table.source,
        "settings": asdict(settings),
        **table.counts,
        "dropped_by_silo_rule": int(silo_of.isna().sum()),
    }
    if settings.split == "time":
        cut = test_cut(purchases["purchase_time"], settings)
        report["test_from"] = str(cut.date())
        is_test_all = (purchases["purchase_time"] >= cut).to_numpy()
    elif settings.split == "days":
        is_test_all, report["test_days"] = test_days(purchases["purchase_time"], settings)
    silos, summary = [], []
    for index, name in enumerate(order):
        rows = purchases.loc[(silo_of == name).to_numpy()]
        if settings.split in ("time", "days"):
            is_test = is_test_all[rows.index.to_numpy()]
        else:
            is_test = _random_test(rows["class"].to_numpy(), settings, index)
        categorical, numeric = silo_features(rows, is_test)
        target = rows["class"].to_numpy(np.float32)
        extra = {
            "user_id": rows["user_id"].to_numpy(np.int64),
            "purchase_time": rows["purchase_time"].to_numpy("datetime64[s]").astype(np.int64),
        }
        whole = TabularPart(categorical, numeric, target, extra)
        train, test = whole.take(np.flatnonzero(~is_test)), whole.take(np.flatnonzero(is_test))
        silos.append(TabularSilo(index, name, train, test))
        summary.append(
            {
                "silo": name,
                "countries": int(rows["country"].nunique()),
                "train_rows": len(train),
                "train_frauds": int(train.target.sum()),
                "test_rows": len(test),
                "test_frauds": int(test.target.sum()),
            }
        )
    report["silos"] = summary
    return TabularDataset(
        name=DATASET,
        kind="binary",
        silos=silos,
        categorical_names=list(VOCABULARIES),
        cardinalities=[len(v) + 1 for v in VOCABULARIES.values()],
        numeric_names=list(NUMERIC_NAMES),
        report=report,
    )


def _random_test(labels: np.ndarray, settings: FraudSettings, silo_index: int) -> np.ndarray:
    """A stratified random test share of one silo's rows (seeded by the seed and the silo)."""
    rng = np.random.default_rng([settings.seed, silo_index])
    is_test = np.zeros(len(labels), bool)
    for value in (0, 1):
        rows = np.flatnonzero(labels == value)
        take = round(settings.test_fraction * len(rows))
        is_test[rng.choice(rows, size=take, replace=False)] = True
    return is_test


def silo_features(rows: pd.DataFrame, is_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One silo's categorical codes and numeric features (NUMERIC_NAMES), from its own rows only.

    The device and IP counts are as of each purchase, in purchase-time order (ties: row order): a
    training row counts the silo's earlier training rows, a test row the silo's earlier rows of
    either split (what the shop had seen by then; no label is used). So no test row changes a
    training row's features, and a test row sees no later purchase."""
    categorical = np.stack(
        [_codes(rows[name], vocabulary) for name, vocabulary in VOCABULARIES.items()], axis=1
    ) if len(rows) else np.zeros((0, len(VOCABULARIES)), np.int64)  # fmt: skip
    signup, purchase = rows["signup_time"], rows["purchase_time"]
    seconds = (purchase - signup).dt.total_seconds().clip(lower=0).to_numpy(np.float64)
    hour = (purchase.dt.hour + purchase.dt.minute / 60.0).to_numpy(np.float64)
    weekday = purchase.dt.day_of_week.to_numpy(np.float64)
    signup_hour = (signup.dt.hour + signup.dt.minute / 60.0).to_numpy(np.float64)
    device = _earlier_count(rows, "device_id", is_test)
    ip = _earlier_count(rows, "ip_address", is_test)
    numeric = np.stack(
        [
            np.log1p(seconds) / 16.0,
            np.log1p(rows["purchase_value"].to_numpy(np.float64)) / 5.0,
            rows["age"].to_numpy(np.float64) / 100.0,
            *_cycle(hour, 24.0),
            *_cycle(weekday, 7.0),
            *_cycle(signup_hour, 24.0),
            np.log1p(device) / 3.0,
            np.log1p(ip) / 3.0,
        ],
        axis=1,
    ) if len(rows) else np.zeros((0, len(NUMERIC_NAMES)))  # fmt: skip
    return categorical, numeric


def _codes(values: pd.Series, vocabulary: tuple[str, ...]) -> np.ndarray:
    lookup = {name: code for code, name in enumerate(vocabulary, start=1)}
    return values.map(lookup).fillna(0).to_numpy(np.int64)


def _cycle(values: np.ndarray, period: float) -> tuple[np.ndarray, np.ndarray]:
    angle = 2.0 * np.pi * values / period
    return np.sin(angle), np.cos(angle)


def _earlier_count(rows: pd.DataFrame, key: str, is_test: np.ndarray) -> np.ndarray:
    """Per row, the silo's earlier purchases with the same `key` (see `silo_features`)."""
    n = len(rows)
    order = np.lexsort((np.arange(n), rows["purchase_time"].to_numpy()))
    keys = rows[key].to_numpy()[order]
    test_sorted = is_test[order]
    everyone = pd.Series(keys).groupby(keys, sort=False).cumcount().to_numpy()
    train_keys = keys[~test_sorted]
    train_only = pd.Series(train_keys).groupby(train_keys, sort=False).cumcount().to_numpy()
    counts_sorted = np.empty(n, np.int64)
    counts_sorted[test_sorted] = everyone[test_sorted]
    counts_sorted[~test_sorted] = train_only
    counts = np.empty(n, np.int64)
    counts[order] = counts_sorted
    return counts.astype(np.float64)
