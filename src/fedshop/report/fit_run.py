"""A fit run's folder (`fedshop train --task fit`): the same layout as a recommendation run's.

config.toml, data_report.json, metrics.json, report.html (with a confusion matrix per method)
products.csv       product index → item id, size (the rows of the shared `product_size` table)
models/…           safetensors: federated/shared; per shop federated/silo-<shop> with its customers'
                   private sizes and `users`; each baseline's weights. Owner-only files.
models/federated/silo-<shop>.customers.npz   row r of that shop's tables is customer_ids[r]
serving.json       {"format", "task": "fit", "model", "dim", "silos"} for `fedshop serve`
audit.jsonl        the hash-chained, signed audit log of the federated run's rounds and weights
                   files, as a recommendation run's (`fedshop audit verify`; report/audit.py)
"""

from __future__ import annotations

import dataclasses
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from safetensors.torch import save

from fedshop import __version__
from fedshop.data.partition import slug
from fedshop.data.renttherunway import FIT_CLASSES
from fedshop.fit_experiment import FitResult
from fedshop.report.communication import communication_block, communication_section
from fedshop.report.html import CSS, _fmt, _table, privacy_section, protection_section
from fedshop.report.run_folder import (
    SERVING,
    SERVING_FORMAT,
    _finite,
    federated_silo_stem,
    history_entry,
)
from fedshop.storage.private_files import write_private

PRODUCTS = "products.csv"
FIT_METHOD_LABELS = {
    "federated": "Federated (each shop keeps its customers' sizes)",
    "centralized": "Centralized (pooled, one size per shopper)",
    "centralized_unlinked": "Centralized, shops' customers not linked",
    "local_only": "Local only (each shop alone)",
    "majority": "Majority (each shop's label frequencies)",
    "1-lv-lr": "1-LV-LR (one latent size, pooled)",
    "measurements": "Body measurements (pooled)",
}
HEADLINE = ("auc_macro", "silo_mean_auc_macro", "accuracy", *(f"recall_{c}" for c in FIT_CLASSES))


def fit_metrics_document(result: FitResult) -> dict[str, Any]:
    config = result.config
    doc: dict[str, Any] = {
        "fedshop_version": __version__,
        "task": "fit",
        "dataset": result.dataset.name,
        "mode": config.federated.mode,
        "model": config.fit.model,
        "dim": config.fit.dim,
        "silos_by": config.fit.silos,
        "split": config.fit.split,
        "evaluated_on": config.eval.split,
        "seed": config.seed,
        "rounds": config.federated.rounds,
        "privacy": dataclasses.asdict(result.privacy),
        "protection": dataclasses.asdict(result.protection),
        "bytes_per_round_per_silo": result.message_bytes,
    }
    for method, outcome in result.methods.items():
        doc[method] = {**outcome.summary, "seconds": round(outcome.seconds, 3)}
    if result.history:
        seconds = [record.seconds for record in result.history]
        doc["federated"]["seconds_per_round"] = float(np.median(seconds))
    doc["per_silo"] = {
        silo: {method: outcome.per_silo[silo] for method, outcome in result.methods.items()}
        for silo in result.dataset.silo_names
    }
    doc["history"] = [history_entry(r, leave_out=("confusion",)) for r in result.history]
    doc["communication"] = communication_block(result.history, config)
    return _finite(doc)


def write_fit_run(out: Path, result: FitResult) -> Path:
    out = Path(out)
    dataset = result.dataset
    (out / "config.toml").write_text(result.config.to_toml(), encoding="utf-8")
    data_report = _finite(dataset.report)
    (out / "data_report.json").write_text(json.dumps(data_report, indent=2, default=str) + "\n")
    metrics = fit_metrics_document(result)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    pd.DataFrame(
        {"item_id": dataset.item_ids[dataset.product_item], "size": dataset.product_size}
    ).rename_axis("product").to_csv(out / PRODUCTS)
    written: dict[str, bytes] = {}  # run-folder path → the bytes of each weights file
    for stem, tensors in result.weights.items():
        path = out / "models" / f"{stem}.safetensors"
        data = save({k: v.contiguous() for k, v in tensors.items()})
        write_private(path, data)
        written[path.relative_to(out).as_posix()] = data
    served = []
    for silo in dataset.silos:
        stem = federated_silo_stem(silo.name)
        if stem in result.weights:
            buffer = io.BytesIO()
            np.savez(buffer, customer_ids=np.asarray(dataset.user_ids[silo.users]).astype(str))
            write_private(out / "models" / f"{stem}.customers.npz", buffer.getvalue())
            written[f"models/{stem}.customers.npz"] = buffer.getvalue()
            served.append({"name": silo.name, "slug": slug(silo.name)})
    serving = {
        "format": SERVING_FORMAT,
        "task": "fit",
        "model": result.config.fit.model,
        "dim": result.config.fit.dim,
        "silos": served,
    }
    (out / SERVING).write_text(json.dumps(serving, indent=2) + "\n")
    (out / "report.html").write_text(
        render_fit_report(metrics, data_report, result.config.to_toml()), encoding="utf-8"
    )
    if result.audit is not None:  # audit.jsonl: the rounds, closed with the weights files
        from fedshop.report.audit import write_audit

        write_audit(out, result.audit, dataset.silo_names, written)
    return out


def confusion_svg(metrics: dict[str, Any]) -> str:
    """One normalised confusion matrix (rows: true class) per method, side by side."""
    import matplotlib.pyplot as plt

    methods = [m for m in FIT_METHOD_LABELS if m in metrics and metrics[m].get("confusion")]
    if not methods:
        return "<p class='muted'>No method was evaluated.</p>"
    figure, axes = plt.subplots(1, len(methods), figsize=(2.6 * len(methods), 2.9), squeeze=False)
    for axis, method in zip(axes[0], methods, strict=True):
        counts = np.asarray(metrics[method]["confusion"], dtype=float)
        rows = counts.sum(1, keepdims=True)
        share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
        axis.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(3):
            for j in range(3):
                axis.text(
                    j,
                    i,
                    f"{share[i, j]:.2f}\n{int(counts[i, j]):,}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if share[i, j] > 0.6 else "black",
                )
        axis.set_xticks(range(3), FIT_CLASSES, fontsize=7)
        axis.set_yticks(range(3), FIT_CLASSES, fontsize=7)
        axis.set_title(method, fontsize=8)
        axis.set_xlabel("predicted", fontsize=7)
    axes[0][0].set_ylabel("true", fontsize=7)
    figure.tight_layout()
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg")
    plt.close(figure)
    return buffer.getvalue()


def render_fit_report(
    metrics: dict[str, Any], data_report: dict[str, Any], config_toml: str
) -> str:
    methods = [m for m in FIT_METHOD_LABELS if m in metrics]
    summary = _table(
        [
            "method",
            "AUC (macro)",
            "silo-mean AUC",
            "accuracy",
            *(f"recall {c}" for c in FIT_CLASSES),
            "records",
            "seconds",
        ],
        [
            [html.escape(FIT_METHOD_LABELS[m])]
            + [_fmt(metrics[m].get(k)) for k in HEADLINE]
            + [_fmt(metrics[m].get("records")), _fmt(metrics[m].get("seconds"), 1)]
            for m in methods
        ],
    )
    per_silo = _table(
        ["shop", "records"] + [f"AUC {m}" for m in methods],
        [
            [html.escape(silo), _fmt(next(iter(by.values()), {}).get("records"))]
            + [_fmt(by.get(m, {}).get("auc_macro")) for m in methods]
            for silo, by in metrics.get("per_silo", {}).items()
        ],
    )
    history = _table(
        ["round", "shops", "seconds", "AUC (macro)", "silo-mean AUC", "ε"],
        [
            [
                _fmt(h["round"]),
                _fmt(h["clients"]),
                _fmt(h["seconds"], 2),
                _fmt(h.get("auc_macro")),
                _fmt(h.get("silo_mean_auc_macro")),
                _fmt(h.get("epsilon"), 2),
            ]
            for h in metrics.get("history", [])
        ],
    )
    sizes = metrics.get("bytes_per_round_per_silo") or {}
    bytes_rows = [
        [html.escape(s), _fmt(v["dense"]), _fmt(v["touched_rows"])] for s, v in sizes.items()
    ]
    cleaning = data_report.get("cleaning", {})
    silo_rows = [
        [
            html.escape(s["silo"]),
            _fmt(s["customers"]),
            _fmt(s["train"]),
            _fmt(s["test"]),
            _fmt(s["test_product_unseen_in_silo"]),
            _fmt(s["test_shopper_unseen_in_silo"]),
        ]
        for s in data_report.get("silos", [])
    ]
    shared = data_report.get("shoppers_in_several_silos", {})
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>FedShop fit report</title>
<style>{CSS}</style></head><body>
<h1>FedShop size and fit report</h1>
<p class="muted">dataset <b>{_fmt(metrics.get("dataset"))}</b> · model <b>{
        _fmt(metrics.get("model"))
    }</b>
(K = {_fmt(metrics.get("dim"))}) · shops by <b>{_fmt(metrics.get("silos_by"))}</b> · split
<b>{_fmt(metrics.get("split"))}</b>, scored on {_fmt(metrics.get("evaluated_on"))} · seed
{_fmt(metrics.get("seed"))} · {_fmt(metrics.get("rounds"))} rounds · FedShop {
        _fmt(metrics.get("fedshop_version"))
    }</p>
<h2>Results</h2>
{summary}
<p class="muted">AUC (macro) is the mean of the one-vs-rest AUCs of small, fit and large (Misra et al.
2018's average AUC) over all held-out records; silo-mean AUC is the unweighted mean over shops.
Accuracy and recall use the most probable class.</p>
<h2>Confusion matrices</h2>
{confusion_svg(metrics)}
<p class="muted">Rows are the true class, columns the most probable class; share of the row and count.</p>
<h2>Privacy</h2>
{privacy_section(metrics.get("privacy") or {})}
<h2>Protection of updates in transit</h2>
{protection_section(metrics.get("protection") or {})}
<h2>Federated rounds</h2>
{history}
<h3>Bytes of one shop's update per round</h3>
{_table(["shop", "all shared tensors", "touched rows only"], bytes_rows)}
<h3>Communication</h3>
{communication_section(metrics.get("communication"))}
<h2>Per shop</h2>
{per_silo}
<h2>Data</h2>
<p>Source: {_fmt(data_report.get("source"))}; {_fmt(data_report.get("shoppers"))} shoppers,
{_fmt(data_report.get("items"))} items, {_fmt(data_report.get("products"))} products (item × size);
{_fmt(shared.get("in_two_or_more"))} shoppers rented from two or more shops.</p>
<p>{_fmt(data_report.get("split_rule"))}</p>
{_table(["rule / count", "rows"], [[html.escape(k), _fmt(v)] for k, v in cleaning.items()])}
{
        _table(
            [
                "shop",
                "customers",
                "train",
                "test",
                "test product unseen in shop",
                "test shopper unseen in shop",
            ],
            silo_rows,
        )
    }
<h2>Configuration</h2><pre>{html.escape(config_toml)}</pre>
<p class="muted">RentTheRunway data: Misra, Wan &amp; McAuley, “Decomposing fit semantics for product
size recommendation in metric spaces”, RecSys 2018; research use.</p>
</body></html>
"""
