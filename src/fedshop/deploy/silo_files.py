"""One silo's data as a file of its own: what a storefront keeps on its own host in a deployment.

The file holds the silo's customers' training, held-out and evaluation rows over the shared item
catalogue (whose ids every party agrees on in advance) and nothing about other silos. A Flower client
app reads exactly one such file, named in its node config.

A fit run's file (`write_fit_silo_file`) holds one shop's fit records, its own customers (by their
ids, not the trial's global indices) and their measurements, and the public product catalogue.

A retail task's file (`write_table_silo_file`: demand, returns, fraud) holds one storefront's table
rows, training and held-out, and the table's public schema (what it predicts, its columns, each
categorical column's vocabulary size): what the network's shape depends on, no other storefront's
rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from fedshop.data.fit_feedback import FitDataset, FitRecords, FitSilo
from fedshop.data.interactions import RecDataset, SiloData
from fedshop.data.tabular import TabularDataset, TabularPart, TabularSilo
from fedshop.errors import FedShopError
from fedshop.storage.private_files import private_writer

FORMAT = "fedshop-silo/1"
FIT_FORMAT = "fedshop-fit-silo/1"
FIT_SPLITS = ("train", "validation", "test")
TABLE_FORMAT = "fedshop-table-silo/1"
TABLE_SPLITS = ("train", "test")
_RECORD_FIELDS = ("user", "product", "label")


class SiloFileError(FedShopError):
    """A silo data file that is missing, unreadable or of another format."""


def write_silo_file(path: Path, dataset: RecDataset, index: int) -> Path:
    """Write silo `index` of `dataset` to `path` (.npz), readable by its owner only: it holds the
    silo's customers' purchases."""
    silo = dataset.silo(index)
    arrays: dict[str, np.ndarray] = {
        "users": silo.users,
        "item_ids": np.asarray(dataset.item_ids).astype(str),
    }
    for part in ("train", "test", "validation"):
        matrix = getattr(silo, part)
        if matrix is not None:
            arrays.update(_csr_arrays(part, matrix))
    if silo.eval_negatives is not None:
        arrays["eval_negatives"] = silo.eval_negatives
    meta = {"format": FORMAT, "name": silo.name, "index": index, "dataset": dataset.name}
    return _write_arrays(path, arrays, meta)


def _write_arrays(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Owner-only .npz with the metadata as a JSON string: no pickle, a reader loads numbers."""
    arrays["meta"] = np.array(json.dumps(meta))
    with private_writer(path) as f:
        np.savez_compressed(f, **arrays)
    return path


def _read_arrays(path: str | Path, *expected: str) -> tuple[dict[str, np.ndarray], dict]:
    """A silo file's arrays and metadata, checked to be of one of the formats `expected`."""
    path = Path(path)
    if not path.is_file():
        raise SiloFileError(f"silo data file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(str(arrays["meta"]))
    except (OSError, ValueError, KeyError) as error:
        raise SiloFileError(f"{path} is not a FedShop silo data file ({error})") from None
    if meta.get("format") not in expected:
        wanted = " or ".join(map(repr, expected))
        raise SiloFileError(f"{path} has format {meta.get('format')!r}; expected {wanted}")
    return arrays, meta


def read_any_silo_file(
    path: str | Path,
) -> tuple[SiloData | FitSiloData | TableSiloData, dict]:
    """A node's silo file, a recommender's, a fit run's or a retail task's (its node config names
    one file)."""
    arrays, meta = _read_arrays(path, FORMAT, FIT_FORMAT, TABLE_FORMAT)
    if meta["format"] == FIT_FORMAT:
        return _fit_silo_data(arrays, meta, path)
    if meta["format"] == TABLE_FORMAT:
        return _table_silo_data(arrays, meta, path)
    return _silo_data(arrays, meta)


def read_silo_file(path: str | Path) -> tuple[SiloData, dict]:
    """The silo's data and the file's metadata (name, index, dataset, catalogue digest)."""
    return _silo_data(*_read_arrays(path, FORMAT))


def _silo_data(arrays: dict[str, np.ndarray], meta: dict) -> tuple[SiloData, dict]:
    meta["catalogue_digest"] = catalogue_digest(arrays["item_ids"])
    meta["n_items"] = len(arrays["item_ids"])
    silo = SiloData(
        name=meta["name"],
        users=arrays["users"],
        train=_csr(arrays, "train"),
        test=_csr(arrays, "test"),
        validation=_csr(arrays, "validation") if "validation_data" in arrays else None,
        eval_negatives=arrays.get("eval_negatives"),
    )
    return silo, meta


def catalogue_digest(item_ids: np.ndarray) -> str:
    """Parties check that they index the same catalogue the same way before training together."""
    return hashlib.sha256("\n".join(map(str, item_ids)).encode()).hexdigest()[:16]


def _csr_arrays(name: str, matrix: sp.csr_matrix) -> dict[str, np.ndarray]:
    return {
        f"{name}_data": matrix.data,
        f"{name}_indices": matrix.indices,
        f"{name}_indptr": matrix.indptr,
        f"{name}_shape": np.array(matrix.shape),
    }


def _csr(arrays: dict[str, np.ndarray], name: str) -> sp.csr_matrix:
    shape = tuple(int(x) for x in arrays[f"{name}_shape"])
    return sp.csr_matrix(
        (arrays[f"{name}_data"], arrays[f"{name}_indices"], arrays[f"{name}_indptr"]), shape=shape
    )


@dataclass(frozen=True)
class FitSiloData:
    """One shop's part of a fit run, as its own host holds it. The silo's `users` and its records'
    `user` are the shop's own customer ids (sorted), so `FitSilo.local` finds their rows."""

    silo: FitSilo
    measurements: np.ndarray  # (customers, features), in the order of silo.users
    measurement_names: tuple[str, ...]
    item_ids: np.ndarray  # the public catalogue: item ids, each product's item and size
    product_item: np.ndarray
    product_size: np.ndarray

    @property
    def name(self) -> str:
        return self.silo.name

    @property
    def n_users(self) -> int:
        return self.silo.n_users

    @property
    def users(self) -> np.ndarray:
        """The shop's customers by their own ids (int64, sorted): the rows of its private tables."""
        return self.silo.users


def write_fit_silo_file(path: Path, dataset: FitDataset, index: int) -> Path:
    """Write shop `index` of `dataset` to `path` (.npz), owner-only: its customers' records and
    measurements, under their own ids, and the public catalogue; nothing of other shops."""
    silo = dataset.silos[index]
    customer_ids = np.asarray(dataset.user_ids, dtype=np.int64)
    arrays: dict[str, np.ndarray] = {
        "customer_ids": customer_ids[silo.users],  # sorted: user_ids are sorted, so are users
        "measurements": dataset.measurements[silo.users],
        "item_ids": np.asarray(dataset.item_ids, dtype=np.int64),
        "product_item": dataset.product_item,
        "product_size": dataset.product_size,
    }
    for split in FIT_SPLITS:
        records: FitRecords = getattr(silo, split)
        arrays[f"{split}_user"] = customer_ids[records.user]
        arrays[f"{split}_product"] = records.product
        arrays[f"{split}_label"] = records.label
    meta = {
        "format": FIT_FORMAT, "name": silo.name, "index": index, "dataset": dataset.name,
        "measurement_names": list(dataset.measurement_names),
    }  # fmt: skip
    return _write_arrays(path, arrays, meta)


def read_fit_silo_file(path: str | Path) -> tuple[FitSiloData, dict]:
    """The shop's data and the file's metadata (name, index, dataset, catalogue digest, shapes)."""
    arrays, meta = _read_arrays(path, FIT_FORMAT)
    return _fit_silo_data(arrays, meta, path)


def _fit_silo_data(
    arrays: dict[str, np.ndarray], meta: dict, path: str | Path
) -> tuple[FitSiloData, dict]:
    try:
        parts = [
            FitRecords(*(arrays[f"{split}_{f}"].astype(np.int64) for f in _RECORD_FIELDS))
            for split in FIT_SPLITS
        ]  # fmt: skip
        names = tuple(str(n) for n in meta["measurement_names"])
        silo = FitSilo(int(meta["index"]), str(meta["name"]), *parts, users=arrays["customer_ids"])
        data = FitSiloData(
            silo, arrays["measurements"].astype(np.float32), names, arrays["item_ids"],
            arrays["product_item"].astype(np.int64), arrays["product_size"],
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as error:
        raise SiloFileError(f"{path} is not a complete fit silo file ({error})") from None
    meta["catalogue_digest"] = fit_catalogue_digest(data)
    meta["n_items"], meta["n_products"] = len(data.item_ids), len(data.product_item)
    meta["n_features"] = len(names)
    return data, meta


def fit_catalogue_digest(data: FitSiloData) -> str:
    """The products (item, size) and the measurement features: what the shared model indexes."""
    products = [f"{i}:{s!r}" for i, s in zip(data.product_item, data.product_size, strict=True)]
    lines = [*map(str, data.item_ids), "products", *products, "features", *data.measurement_names]
    return catalogue_digest(np.asarray(lines))


@dataclass(frozen=True)
class TableSiloData:
    """One storefront's part of a retail task (demand, returns, fraud), as its own host holds it:
    its rows and the table's public schema."""

    silo: TabularSilo
    dataset: str
    kind: str
    horizon: int
    categorical_names: tuple[str, ...]
    cardinalities: tuple[int, ...]
    numeric_names: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.silo.name

    @property
    def n_users(self) -> int:
        """Its training rows (a table silo's count of what it holds; it has no customer table)."""
        return len(self.silo.train)

    def schema(self):
        """The public shape the network needs (`fl.tabular_silo.TableSchema`)."""
        from fedshop.fl.tabular_silo import TableSchema

        return TableSchema(self.kind, self.horizon, self.cardinalities, len(self.numeric_names))


def write_table_silo_file(path: Path, dataset: TabularDataset, index: int) -> Path:
    """Write storefront `index` of `dataset` to `path` (.npz), owner-only: its own rows (training
    and held-out, with each row's extra values) and the table's public schema."""
    silo = dataset.silos[index]
    arrays: dict[str, np.ndarray] = {}
    for split in TABLE_SPLITS:
        part: TabularPart = getattr(silo, split)
        arrays[f"{split}_categorical"] = part.categorical
        arrays[f"{split}_numeric"] = part.numeric
        arrays[f"{split}_target"] = part.target
        for name, values in part.extra.items():
            arrays[f"{split}_extra/{name}"] = np.asarray(values)
    meta = {
        "format": TABLE_FORMAT, "name": silo.name, "index": index, "dataset": dataset.name,
        "kind": dataset.kind, "horizon": int(dataset.horizon),
        "categorical_names": list(dataset.categorical_names),
        "cardinalities": [int(c) for c in dataset.cardinalities],
        "numeric_names": list(dataset.numeric_names),
    }  # fmt: skip
    return _write_arrays(path, arrays, meta)


def read_table_silo_file(path: str | Path) -> tuple[TableSiloData, dict]:
    """The storefront's rows and the file's metadata (name, index, dataset, schema digest)."""
    arrays, meta = _read_arrays(path, TABLE_FORMAT)
    return _table_silo_data(arrays, meta, path)


def _table_silo_data(
    arrays: dict[str, np.ndarray], meta: dict, path: str | Path
) -> tuple[TableSiloData, dict]:
    try:
        parts = []
        for split in TABLE_SPLITS:
            prefix = f"{split}_extra/"
            extra = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            columns = [arrays[f"{split}_{c}"] for c in ("categorical", "numeric", "target")]
            parts.append(TabularPart(*columns, extra))
        silo = TabularSilo(int(meta["index"]), str(meta["name"]), *parts)
        data = TableSiloData(
            silo, str(meta["dataset"]), str(meta["kind"]), int(meta["horizon"]),
            tuple(str(n) for n in meta["categorical_names"]),
            tuple(int(c) for c in meta["cardinalities"]),
            tuple(str(n) for n in meta["numeric_names"]),
        )  # fmt: skip
        # The schema's checks (kind, columns, codes within their vocabularies) on this silo alone.
        TabularDataset(
            data.dataset, data.kind, [silo], list(data.categorical_names),
            list(data.cardinalities), list(data.numeric_names), data.horizon,
        )  # fmt: skip
        per_row = () if data.kind == "binary" else (data.horizon,)  # a label, or h values
        for part in parts:
            if (part.categorical < 0).any():
                raise ValueError("a negative categorical code")
            if part.target.shape[1:] != per_row:
                raise ValueError(f"targets of shape {part.target.shape} for a {data.kind} table")
    except (KeyError, TypeError, ValueError, FedShopError) as error:
        raise SiloFileError(f"{path} is not a complete table silo file ({error})") from None
    meta["catalogue_digest"] = table_digest(data)
    meta["n_items"] = 0  # a table has no item catalogue; its schema is in the digest
    return data, meta


def table_digest(data: TableSiloData) -> str:
    """The table's schema: what it predicts and its columns, each categorical one's vocabulary
    size. Every storefront's file must agree on it to train one network."""
    columns = zip(data.categorical_names, data.cardinalities, strict=True)
    lines = [
        f"kind {data.kind}",
        f"horizon {data.horizon}",
        *(f"categorical {n} {c}" for n, c in columns),
        *(f"numeric {n}" for n in data.numeric_names),
    ]
    return catalogue_digest(np.asarray(lines))
