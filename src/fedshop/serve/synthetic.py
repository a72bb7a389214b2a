"""Catalogues larger than any real one here, drawn to match a trained model's items.

Serving speed and an approximate index's recall depend on the catalogue's size and on how its item
vectors are spread, so a benchmark at 1,000,000 items needs a million item vectors that look like
trained ones. Each real item is a row

    x_i = [item tables (MF/GMF: embedding and bias) ; the silos' private offsets silo_item_bias[s, i]]

(every silo's offset is a coordinate, so what correlates between the shared vectors and a storefront's
local taste is kept). A multivariate normal with the rows' mean and full covariance is fitted, and the
extra items are drawn from it (seeded). The real items stay the first rows, so every customer's
history, user vector and storefront are unchanged. Synthetic items are named "synthetic item N",
their ids are "SYN-N", their prices are drawn from the real items' prices (with replacement).

`enlarge_run` writes such a catalogue as a run folder in the serving format, which `fedshop serve`
loads like any other; its `synthetic.json` says how it was made.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save

from fedshop.models.spec import get_model
from fedshop.storage.private_files import write_private

# Standard normals are drawn in blocks of this many rows (a million 100-dim float64 rows is 800 MB).
_BLOCK = 65_536


@dataclass(frozen=True)
class RowDistribution:
    """A multivariate normal over item rows: mean (d,) and a Cholesky factor of the covariance."""

    mean: np.ndarray
    cholesky: np.ndarray

    @property
    def dim(self) -> int:
        return len(self.mean)


def fit_rows(rows: np.ndarray) -> RowDistribution:
    """The normal with the rows' mean and full (sample) covariance. A covariance that is singular
    (fewer rows than columns, a constant column) gets the smallest diagonal jitter that factors."""
    rows = np.asarray(rows, dtype=np.float64)
    mean = rows.mean(0)
    covariance = np.atleast_2d(np.cov(rows, rowvar=False))
    jitter = 0.0
    scale = float(np.mean(np.diag(covariance))) or 1.0
    while True:
        try:
            factor = np.linalg.cholesky(covariance + jitter * np.eye(len(mean)))
            return RowDistribution(mean, factor)
        except np.linalg.LinAlgError:
            jitter = scale * 1e-9 if jitter == 0.0 else jitter * 10


def draw_rows(distribution: RowDistribution, n: int, seed: int) -> np.ndarray:
    """`n` rows (float32) drawn from `distribution`, the same for the same seed."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, distribution.dim), dtype=np.float32)
    for start in range(0, n, _BLOCK):
        stop = min(n, start + _BLOCK)
        normals = rng.standard_normal((stop - start, distribution.dim))
        out[start:stop] = normals @ distribution.cholesky.T + distribution.mean
    return out


def enlarge_tables(
    item_tables: dict[str, torch.Tensor],
    offsets: dict[str, torch.Tensor],
    n_items: int,
    seed: int,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Item tables (name -> (n_real, ...) ) and per-silo offset rows (silo -> (1, n_real)) extended
    to `n_items` rows: the real rows first, then rows drawn from the normal fitted to them jointly."""
    names, silos = list(item_tables), list(offsets)
    n_real = len(item_tables[names[0]])
    if n_items < n_real:
        raise ValueError(f"cannot shrink a catalogue of {n_real} items to {n_items}")
    columns = [item_tables[n].detach().float().reshape(n_real, -1) for n in names]
    columns += [offsets[s].detach().float().reshape(n_real, 1) for s in silos]
    widths = [c.shape[1] for c in columns]
    real = torch.cat(columns, 1).numpy()
    drawn = draw_rows(fit_rows(real), n_items - n_real, seed)
    parts = np.split(drawn, np.cumsum(widths)[:-1], axis=1)
    tables = {}
    for name, part in zip(names, parts[: len(names)], strict=True):
        table = item_tables[name]
        extra = torch.from_numpy(part).reshape(-1, *table.shape[1:]).to(table.dtype)
        tables[name] = torch.cat([table, extra]).contiguous()
    rows = {}
    for silo, part in zip(silos, parts[len(names) :], strict=True):
        row = offsets[silo].reshape(1, -1)
        rows[silo] = torch.cat([row, torch.from_numpy(part).reshape(1, -1).to(row.dtype)], 1)
    return tables, rows


def enlarge_catalogue(catalogue: pd.DataFrame, n_items: int, seed: int) -> pd.DataFrame:
    """catalogue.csv's frame (index,item_id,name,price) with synthetic items appended."""
    n_real = len(catalogue)
    extra = np.arange(1, n_items - n_real + 1)
    prices = catalogue["price"].to_numpy(dtype=np.float64)
    known = prices[~np.isnan(prices)]
    rng = np.random.default_rng([seed, 1])
    drawn = rng.choice(known, len(extra)) if len(known) else np.full(len(extra), np.nan)
    added = pd.DataFrame(
        {
            "index": np.arange(n_real, n_items),
            "item_id": [f"SYN-{j}" for j in extra],
            "name": [f"synthetic item {j}" for j in extra],
            "price": drawn,
        }
    )
    return pd.concat([catalogue, added], ignore_index=True)


def enlarge_run(base: Path, out: Path, n_items: int, seed: int = 0) -> Path:
    """A copy of the serving-format run folder `base` whose catalogue has `n_items` items (the real
    ones first, the rest drawn as the module says). Customers, their vectors and histories, and the
    dense weights are copied unchanged; the private files stay owner-only."""
    base, out = Path(base), Path(out)
    serving = json.loads((base / "serving.json").read_text(encoding="utf-8"))
    models = base / "models" / "federated"
    shared = load_safetensors((models / "shared.safetensors").read_bytes())
    n_real = int(serving["n_items"])
    spec = get_model(serving["model"])
    item_tables = {name: shared[name] for name in spec.item_tables}
    dense = {k: v for k, v in shared.items() if k not in item_tables}
    silo_files = {s["slug"]: load_safetensors(
        (models / f"silo-{s['slug']}.safetensors").read_bytes()
    ) for s in serving["silos"]}  # fmt: skip
    offsets = {
        slug: tables["silo_item_bias"]
        for slug, tables in silo_files.items()
        if "silo_item_bias" in tables
    }
    tables, rows = enlarge_tables(item_tables, offsets, n_items, seed)

    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.toml", "metrics.json", "data_report.json"):
        if (base / name).exists():
            shutil.copyfile(base / name, out / name)
    catalogue = pd.read_csv(
        base / "catalogue.csv",
        dtype={"index": "int64", "item_id": str, "name": str, "price": "float64"},
        keep_default_na=False,
        na_values={"price": [""]},
    )
    enlarge_catalogue(catalogue, n_items, seed).to_csv(out / "catalogue.csv", index=False)
    target = out / "models" / "federated"
    write_private(target / "shared.safetensors", save({**tables, **dense}))
    for slug, silo_tables in silo_files.items():
        if slug in rows:
            silo_tables = {**silo_tables, "silo_item_bias": rows[slug].contiguous()}
        write_private(target / f"silo-{slug}.safetensors", save(silo_tables))
        customers = models / f"silo-{slug}.customers.npz"
        write_private(target / customers.name, customers.read_bytes())
    (out / "synthetic.json").write_text(
        json.dumps(
            {
                "base_run": str(base),
                "real_items": n_real,
                "synthetic_items": n_items - n_real,
                "seed": seed,
                "method": "real items first; the rest drawn from a multivariate normal with the "
                "mean and full covariance of the real rows ["
                + ", ".join(item_tables)
                + (", silo_item_bias of each silo" if offsets else "")
                + "]; names "
                "'synthetic item N', ids 'SYN-N', prices drawn from the real prices",
            },
            indent=2,
        )
        + "\n"
    )
    # serving.json last: until it is there, the folder is not served.
    (out / "serving.json").write_text(json.dumps({**serving, "n_items": n_items}, indent=2) + "\n")
    return out
