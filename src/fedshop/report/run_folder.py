"""Write everything a run produced into its folder, so the run can be inspected and reproduced.

config.toml        the resolved configuration (re-run with `fedshop train --config config.toml`)
data_report.json   cleaning counts, split counts, silos
metrics.json       results of every method, overall and per silo, and the per-round history
catalogue.csv      item index → item id, name and typical unit price (the item embeddings' rows)
models/…           weights as safetensors (each silo's private user embeddings in its own file),
                   and per silo of the federated model its customers.npz: which customer each row
                   of its user tables is, and their training purchases (owner-only, as the weights)
audit.jsonl        the hash-chained, signed audit log of the federated run's rounds and weights
                   files (`fedshop audit verify`; report/audit.py)
serving.json       what `fedshop serve` needs to know before it opens anything else (format 1)
report.html        the human-readable report with plots
INCOMPLETE         only in a folder whose run stopped before it finished: why it stopped
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from safetensors.torch import save

from fedshop import __version__
from fedshop.data.interactions import RecDataset
from fedshop.errors import FedShopError
from fedshop.experiment import ExperimentResult, slug
from fedshop.fl.rounds import RoundRecord
from fedshop.report.communication import communication_block
from fedshop.report.html import render_report
from fedshop.storage.private_files import write_private

MARKER = "metrics.json"
INCOMPLETE = "INCOMPLETE"
SERVING = "serving.json"
# The layout `fedshop serve` reads; raised when it changes, so an older server refuses a newer folder.
SERVING_FORMAT = 1


def prepare_run_folder(out: Path, overwrite: bool = False) -> Path:
    """Create the run folder; refuse to write over an earlier run unless asked to."""
    out = Path(out).expanduser()
    if (out / MARKER).exists() and not overwrite:
        raise FedShopError(
            f"{out} already holds a run (it has {MARKER}); choose another --out or pass --overwrite"
        )
    if out.exists() and not out.is_dir():
        raise FedShopError(f"{out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FedShopError(f"cannot create run folder {out}: {exc.strerror}") from None
    return out


@contextmanager
def run_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """`prepare_run_folder` for one run, undone if the run does not finish (an error, Ctrl-C): the
    folders made for it are removed while they are empty, and a folder the run has written files
    into gets an INCOMPLETE note saying why, so a half-made folder never passes for a run."""
    out = Path(out).expanduser()
    created = [p for p in (out, *out.parents) if not p.exists()]  # innermost first
    out = prepare_run_folder(out, overwrite)
    before = _listing(out)
    try:
        yield out
    except BaseException as exc:
        for folder in created:
            try:
                folder.rmdir()  # only ever an empty folder: nothing the user had is lost
            except OSError:
                break
        if out.is_dir() and _listing(out) != before:
            reason = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else str(exc)
            (out / INCOMPLETE).write_text(
                f"This run stopped before it finished: {reason}\n", encoding="utf-8"
            )
        raise
    (out / INCOMPLETE).unlink(missing_ok=True)  # a finished run over an earlier, unfinished one


def _listing(folder: Path) -> dict[Path, int]:
    return {path: path.lstat().st_mtime_ns for path in folder.rglob("*")}


def metrics_document(result: ExperimentResult) -> dict[str, Any]:
    config = result.config
    doc: dict[str, Any] = {
        "fedshop_version": __version__,
        "dataset": result.dataset.name,
        "protocol": config.eval.protocol,
        "mode": config.federated.mode,
        "model": config.model.name,
        "split": config.eval.split,
        "seed": config.seed,
        "rounds": config.federated.rounds,
        "privacy": dataclasses.asdict(result.privacy),
        "protection": dataclasses.asdict(result.protection),
    }
    for method, outcome in result.methods.items():
        doc[method] = {**outcome.summary, "seconds": round(outcome.seconds, 3)}
    silo_names = result.dataset.silo_names
    doc["per_silo"] = {
        silo: {method: outcome.per_silo[silo] for method, outcome in result.methods.items()}
        for silo in silo_names
    }
    doc["history"] = [history_entry(record) for record in result.history]
    doc["communication"] = communication_block(result.history, config)
    doc["curves"] = {
        method: [{"step": step, **metrics} for step, metrics in outcome.curve]
        for method, outcome in result.methods.items()
        if outcome.curve
    }
    if result.cold_start is not None:
        doc["cold_start"] = result.cold_start.block()
    if result.cold_items is not None:
        doc["cold_items"] = result.cold_items
    if result.attack is not None:
        doc["attack"] = {"kind": config.attack.kind, **result.attack}
    if result.contribution is not None:
        doc["contribution"] = result.contribution
    return _finite(doc)


def history_entry(record: RoundRecord, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """A round as metrics.json's "history" lists it (every task's run folder): its metrics but
    those in `leave_out`, its ε, protection cost, bytes on the wire ("flower": a deployment's
    messages), simulated clock and FedBuff staleness where it has them."""
    optional = {
        "epsilon": record.epsilon,
        "protection": record.protection,
        "traffic": record.traffic,
        "clock": round(record.clock, 3) if record.clock is not None else None,
        "staleness": record.staleness or None,
    }
    return {
        "round": record.round,
        "clients": len(record.clients),
        "seconds": round(record.seconds, 4),
        **{k: v for k, v in optional.items() if v is not None},
        **{k: v for k, v in (record.metrics or {}).items() if k not in leave_out},
    }


def _finite(value: Any) -> Any:
    """JSON has no NaN: a metric that could not be computed (no customers) is written as null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_run(out: Path, result: ExperimentResult) -> Path:
    out = Path(out)
    (out / "config.toml").write_text(result.config.to_toml(), encoding="utf-8")
    data_report = _finite(result.dataset.report)
    (out / "data_report.json").write_text(json.dumps(data_report, indent=2, default=str) + "\n")
    metrics = metrics_document(result)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_catalogue(out / "catalogue.csv", result.dataset)
    written: dict[str, bytes] = {}  # run-folder path → the bytes of each weights file
    for stem, tensors in result.weights.items():
        # Owner-only: a silo's file holds its customers' private vectors (a trial's run folder
        # gathers every silo's on one machine).
        path = out / "models" / f"{stem}.safetensors"
        data = save({k: v.contiguous() for k, v in tensors.items()})
        write_private(path, data)
        written[path.relative_to(out).as_posix()] = data
    served = []
    for name in result.dataset.silo_names:
        stem = federated_silo_stem(name)
        if stem in result.weights:  # a deployment's silo that never finished has no file
            users = result.weights[stem]["users"].numpy()
            data = customers_npz(result, users)
            write_private(out / "models" / f"{stem}.customers.npz", data)
            written[f"models/{stem}.customers.npz"] = data
            served.append({"name": name, "slug": slug(name)})
    serving = {
        "format": SERVING_FORMAT,
        "model": result.config.model.name,
        "mode": result.config.federated.mode,
        "n_items": result.dataset.n_items,
        "silos": served,
    }
    (out / SERVING).write_text(json.dumps(serving, indent=2) + "\n")
    (out / "report.html").write_text(
        render_report(metrics, data_report, result.config.to_toml()), encoding="utf-8"
    )
    if result.audit is not None:  # audit.jsonl: the rounds, closed with the weights files
        from fedshop.report.audit import write_audit

        write_audit(out, result.audit, result.dataset.silo_names, written)
    return out


def write_catalogue(path: Path, dataset: RecDataset) -> None:
    """catalogue.csv: `index,item_id,name,price`; the price is empty where it is unknown."""
    prices = dataset.item_prices
    if prices is None:
        prices = np.full(dataset.n_items, np.nan)
    pd.DataFrame(
        {"item_id": dataset.item_ids, "name": dataset.item_names, "price": prices}
    ).rename_axis("index").to_csv(path)


def federated_silo_stem(name: str) -> str:
    return f"federated/silo-{slug(name)}"


def customers_npz(result: ExperimentResult, users: np.ndarray) -> bytes:
    """A silo's customer map: row r of its user tables is customer `customer_ids[r]` (the shop's
    own id), who bought `history_items[history_indptr[r]:history_indptr[r + 1]]` in training.
    Plain arrays only (no pickle), so reading it runs no code."""
    dataset = result.dataset
    history = dataset.train[users].tocsr()
    history.sort_indices()
    buffer = io.BytesIO()
    np.savez(
        buffer,
        customer_ids=np.asarray(dataset.user_ids[users]).astype(str),
        history_indptr=history.indptr.astype(np.int64),
        history_items=history.indices.astype(np.int64),
    )
    return buffer.getvalue()
