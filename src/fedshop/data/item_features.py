"""Item side features: public catalogue data that every party may know (no shopper's data).

A sparse items × features matrix (1.0 where the item has the feature), its rows aligned with a
dataset's item indices, so that a model can place an item it never saw bought (`models/features.py`)
and a baseline can rank new products by the popularity of their features (`fedshop.cold_items`).

- Amazon (amazon-toys, amazon-beauty, amazon-sequential): `<Category>_item2attributes.json` next to
  the interactions file (the S3-Rec release: {"item id": [attribute id, ...]}, the same item ids as
  the `user item item ...` lines). Attributes are anonymised brand and category ids in one id
  space; duplicates within an item are dropped. A missing file is a DataError that names the path
  looked for (a model that needs features cannot run without them; other models never read it).
- online-retail: the words of the item's description (lower case, letters only, at least 3
  letters, used by at least `MIN_WORD_ITEMS` catalogue items) and its unit-price bucket (one of
  `PRICE_BUCKETS` quantile buckets of the catalogue's median unit prices).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from fedshop.config import DataConfig, Environment
from fedshop.data.interactions import RecDataset
from fedshop.errors import DataError

MIN_WORD_ITEMS = 2  # a description word is a feature when at least this many items use it
PRICE_BUCKETS = 8  # quantile buckets of the catalogue's unit prices


@dataclass(frozen=True)
class ItemFeatures:
    matrix: sp.csr_matrix  # items × features, 1.0 where the item has the feature
    names: tuple[str, ...]  # one per column, "kind:value" (attribute:25, word:heart, price:3)
    source: str  # where they came from, for the data report

    @property
    def n_features(self) -> int:
        return self.matrix.shape[1]

    def report(self) -> dict:
        """Counts for the data report."""
        per_item = np.diff(self.matrix.indptr)
        kinds: dict[str, int] = {}
        for name in self.names:
            kind = name.split(":", 1)[0]
            kinds[kind] = kinds.get(kind, 0) + 1
        return {
            "source": self.source,
            "items": int(self.matrix.shape[0]),
            "features": self.n_features,
            "features_by_kind": kinds,
            "item_feature_pairs": int(self.matrix.nnz),
            "mean_features_per_item": float(per_item.mean()) if len(per_item) else 0.0,
            "max_features_per_item": int(per_item.max()) if len(per_item) else 0,
            "items_without_features": int((per_item == 0).sum()),
        }


def load_item_features(
    dataset: RecDataset, config: DataConfig, env: Environment | None = None
) -> ItemFeatures:
    """The features of `dataset`'s catalogue (rows aligned with its item indices)."""
    if config.dataset == "online-retail":
        if dataset.item_prices is None:
            raise DataError("online-retail without item prices: cannot build its item features")
        return retail_features(dataset.item_names, dataset.item_prices)
    if config.dataset.startswith("amazon-"):
        from fedshop.data.datasets import amazon_file

        path, _ = amazon_file(config, env or Environment.from_os())
        return amazon_attributes(attributes_path(Path(path)), dataset.item_ids)
    raise DataError(
        f"{config.dataset} has no item features (they exist for online-retail and the Amazon "
        "datasets with an *_item2attributes.json file)"
    )


def attributes_path(interactions: Path) -> Path:
    """Where the attributes of an Amazon interactions file are: `<stem>_item2attributes.json`."""
    return interactions.with_name(f"{interactions.stem}_item2attributes.json")


def amazon_attributes(path: Path, item_ids: np.ndarray) -> ItemFeatures:
    if not path.is_file():
        raise DataError(
            f"item features: {path} not found. Amazon item features come from the S3-Rec "
            "*_item2attributes.json file next to the interactions file; without it only models "
            'without item features run (e.g. [model] name = "mf-bpr")'
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a JSON object of item -> attribute ids: {exc}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path} is not a JSON object of item -> attribute ids")
    attributes = sorted({int(a) for values in raw.values() for a in values})
    column = {a: c for c, a in enumerate(attributes)}
    rows, cols = [], []
    for row, item in enumerate(item_ids):
        for a in dict.fromkeys(raw.get(str(item), ())):  # first appearance order, no duplicates
            rows.append(row)
            cols.append(column[int(a)])
    names = tuple(f"attribute:{a}" for a in attributes)
    return ItemFeatures(_binary(rows, cols, len(item_ids), len(names)), names, str(path))


_WORD = re.compile(r"[a-z]{3,}")


def retail_features(item_names: np.ndarray, item_prices: np.ndarray) -> ItemFeatures:
    """Description words used by at least MIN_WORD_ITEMS items, and a unit-price bucket."""
    words = [sorted(set(_WORD.findall(str(name).lower()))) for name in item_names]
    usage: dict[str, int] = {}
    for item_words in words:
        for word in item_words:
            usage[word] = usage.get(word, 0) + 1
    vocabulary = sorted(w for w, n in usage.items() if n >= MIN_WORD_ITEMS)
    column = {w: c for c, w in enumerate(vocabulary)}
    rows, cols = [], []
    for row, item_words in enumerate(words):
        for word in item_words:
            if word in column:
                rows.append(row)
                cols.append(column[word])
    prices = np.asarray(item_prices, dtype=np.float64)
    known = np.isfinite(prices)
    edges = np.quantile(prices[known], np.linspace(0, 1, PRICE_BUCKETS + 1)[1:-1])
    bucket = np.searchsorted(edges, prices, side="right")
    base = len(vocabulary)
    for row in np.flatnonzero(known):
        rows.append(int(row))
        cols.append(base + int(bucket[row]))
    names = tuple(f"word:{w}" for w in vocabulary) + tuple(
        f"price:{b}" for b in range(PRICE_BUCKETS)
    )
    source = (
        f"description words (in >= {MIN_WORD_ITEMS} items) and {PRICE_BUCKETS} unit-price "
        "quantile buckets"
    )
    return ItemFeatures(_binary(rows, cols, len(item_names), len(names)), names, source)


def _binary(rows: list[int], cols: list[int], n_items: int, n_features: int) -> sp.csr_matrix:
    matrix = sp.csr_matrix(
        (np.ones(len(rows), np.float32), (np.asarray(rows, np.int64), np.asarray(cols, np.int64))),
        shape=(n_items, n_features),
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    matrix.sort_indices()
    return matrix
