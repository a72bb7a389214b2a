"""One silo's data as a file of its own: what a storefront keeps on its own host in a deployment.

The file holds the silo's customers' training, held-out and evaluation rows over the shared item
catalogue (whose ids every party agrees on in advance) and nothing about other silos. A Flower client
app reads exactly one such file, named in its node config.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from fedshop.data.interactions import RecDataset, SiloData
from fedshop.errors import FedShopError
from fedshop.storage.private_files import private_writer

FORMAT = "fedshop-silo/1"


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
    arrays["meta"] = np.array(json.dumps(meta))
    with private_writer(path) as f:
        np.savez_compressed(f, **arrays)
    return path


def read_silo_file(path: str | Path) -> tuple[SiloData, dict]:
    """The silo's data and the file's metadata (name, index, dataset, catalogue digest)."""
    path = Path(path)
    if not path.is_file():
        raise SiloFileError(f"silo data file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(str(arrays["meta"]))
    except (OSError, ValueError, KeyError) as error:
        raise SiloFileError(f"{path} is not a FedShop silo data file ({error})") from None
    if meta.get("format") != FORMAT:
        raise SiloFileError(f"{path} has format {meta.get('format')!r}; expected {FORMAT!r}")
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
