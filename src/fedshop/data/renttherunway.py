"""RentTheRunway clothing fit (Misra, Wan, McAuley, RecSys 2018): one row per rental with its fit label.

Read from a data directory (`$FEDSHOP_DATA_DIR` or the config's data_dir), never shipped (research use):
- `renttherunway/renttherunway_clean.parquet`: the cleaned copy described in shared/data/SOURCES.md
  (columns already typed: weight in lbs, height in inches, bust size split into number and letter), or
- `renttherunway/renttherunway_final_data.json.gz`: the official release (one JSON object a line, sizes
  as text such as "137lbs", `5' 8"`, "34d"), parsed here into the same columns.

`load_renttherunway` returns the rentals with canonical column names and what cleaning removed. It
knows nothing about parties or models: the vertical scenario (issue 19) and size/fit (issue 20) both
start from it.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fedshop.errors import DataError

OFFICIAL_PAGE = "https://cseweb.ucsd.edu/~jmcauley/datasets.html#clothing_fit"
# The release linked from that page (no published checksum: the first download's digest is pinned).
OFFICIAL_URL = "https://mcauleylab.ucsd.edu/public_datasets/data/renttherunway/renttherunway_final_data.json.gz"
FOLDER = "renttherunway"
DATASET = "renttherunway"  # its name in [data] dataset (fit feedback: --task fit)
CANDIDATES = ("renttherunway_clean.parquet", "renttherunway_final_data.json.gz")
FIT_CLASSES = ("small", "fit", "large")  # label order: class index = position here

# Canonical columns and their kinds (what every file is turned into).
ID_COLUMNS = ("user_id", "item_id")
NUMERIC_COLUMNS = ("rating", "size", "age", "bust_size_num", "height_in", "weight_lbs")
CATEGORICAL_COLUMNS = ("rented_for", "category", "body_type", "bust_size_letter")
COLUMNS = ("fit", *ID_COLUMNS, *NUMERIC_COLUMNS, *CATEGORICAL_COLUMNS, "review_date")
# What describes the shopper rather than the rental (the same on each of a shopper's records).
MEASUREMENT_COLUMNS = (
    "height_in",
    "weight_lbs",
    "bust_size_num",
    "bust_size_letter",
    "body_type",
    "age",
)

# The official json's keys → canonical names (values still text; parsed below).
_RAW_KEYS = {
    "fit": "fit",
    "user_id": "user_id",
    "item_id": "item_id",
    "rating": "rating",
    "rented for": "rented_for",
    "category": "category",
    "size": "size",
    "age": "age",
    "body type": "body_type",
    "bust size": "bust_size",
    "height": "height",
    "weight": "weight",
    "review_date": "review_date",
}


@dataclass(frozen=True)
class RentTheRunway:
    rentals: pd.DataFrame  # COLUMNS, one row per rental, fit ∈ FIT_CLASSES, original order kept
    source: str  # the file read
    counts: dict[str, int] = field(default_factory=dict)  # rows read, dropped by each rule, kept


def find_file(data_dir: str | Path | None) -> Path:
    """The RentTheRunway file in `data_dir`, or a DataError saying where to put one."""
    where = (
        f"put renttherunway_clean.parquet (see shared/data/SOURCES.md) or the official "
        f"renttherunway_final_data.json.gz ({OFFICIAL_PAGE}) in <data dir>/{FOLDER}/"
    )
    if not data_dir:
        raise DataError(f"RentTheRunway needs a data directory (FEDSHOP_DATA_DIR): {where}")
    base = Path(data_dir).expanduser()
    for name in CANDIDATES:
        if (base / FOLDER / name).is_file():
            return base / FOLDER / name
    raise DataError(f"no RentTheRunway file in {base / FOLDER}: {where}")


def locate(data_dir: str | Path | None, download: bool = True) -> Path:
    """The file in `data_dir`; without one, the official release downloaded into the cache (a
    DataError naming both places when neither works, e.g. offline)."""
    try:
        return find_file(data_dir)
    except DataError as missing:
        if not download:
            raise
        from fedshop.data.download import fetch

        try:
            return fetch(OFFICIAL_URL, f"{FOLDER}/{CANDIDATES[1]}")
        except DataError as failed:
            raise DataError(f"{missing}; and {failed}") from None


def load_renttherunway(
    data_dir: str | Path | None = None, path: str | Path | None = None, download: bool = False
):
    """Read and clean the rentals from `path`, else from `data_dir` (see `find_file`), else (with
    `download`) from the official release."""
    file = Path(path) if path else locate(data_dir, download)
    if not file.is_file():
        raise DataError(f"RentTheRunway file not found: {file}")
    try:
        raw = read_official(file) if file.name.endswith(".json.gz") else pd.read_parquet(file)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {file}: {exc}") from None
    rentals, counts = clean(raw, str(file))
    return RentTheRunway(rentals, str(file), counts)


def clean(raw: pd.DataFrame, source: str = "frame") -> tuple[pd.DataFrame, dict[str, int]]:
    """Canonical columns and types; drop rentals without a fit label or a user/item id (counted)."""
    missing = [c for c in COLUMNS if c not in raw.columns]
    if missing:
        raise DataError(f"{source}: missing RentTheRunway columns {missing}")
    frame = raw.loc[:, list(COLUMNS)].copy()
    counts = {"rows_read": len(frame)}
    fit = frame["fit"].astype("string").str.strip().str.lower()
    unlabelled = ~fit.isin(FIT_CLASSES)
    counts["dropped_no_fit_label"] = int(unlabelled.sum())
    no_id = frame["user_id"].isna() | frame["item_id"].isna()
    counts["dropped_no_user_or_item"] = int((no_id & ~unlabelled).sum())
    keep = ~(unlabelled | no_id)
    frame = frame.loc[keep].reset_index(drop=True)
    frame["fit"] = pd.Categorical(fit[keep].to_numpy(), categories=FIT_CLASSES)
    for column in ID_COLUMNS:
        frame[column] = frame[column].astype(np.int64)
    for column in NUMERIC_COLUMNS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(np.float64)
    for column in CATEGORICAL_COLUMNS:
        frame[column] = frame[column].astype("string").str.strip().str.lower().astype("category")
    frame["review_date"] = pd.to_datetime(frame["review_date"], errors="coerce")
    counts["rows_without_review_date"] = int(frame["review_date"].isna().sum())
    counts["rows_kept"] = len(frame)
    return frame, counts


def read_official(path: Path) -> pd.DataFrame:
    """The official json.gz (one JSON object a line) in canonical columns, sizes parsed to numbers."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return parse_official(records)


def parse_official(records: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame([{new: r.get(old) for old, new in _RAW_KEYS.items()} for r in records])
    bust = frame["bust_size"].astype("string").str.extract(r"^\s*(\d+)\s*([a-zA-Z+/]*)")
    frame["bust_size_num"] = pd.to_numeric(bust[0], errors="coerce")
    frame["bust_size_letter"] = bust[1].where(bust[1].str.len() > 0)
    frame["height_in"] = frame["height"].map(_inches)
    frame["weight_lbs"] = pd.to_numeric(
        frame["weight"].astype("string").str.extract(r"(\d+(?:\.\d+)?)")[0], errors="coerce"
    )
    frame["review_date"] = pd.to_datetime(frame["review_date"], format="%B %d, %Y", errors="coerce")
    return frame.drop(columns=["bust_size", "height", "weight"])


def _inches(text: object) -> float:
    """`5' 8"` → 68.0; anything else → NaN."""
    match = re.match(r"^\s*(\d+)\s*'\s*(\d+)?", str(text)) if isinstance(text, str) else None
    if not match:
        return float("nan")
    return 12.0 * int(match.group(1)) + int(match.group(2) or 0)
