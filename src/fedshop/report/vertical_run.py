"""A vertical run's folder: config.toml, metrics.json, data_report.json and report.html.

metrics.json has the blocks `joint`, `label_holder_only` and `centralized` (macro AUC, accuracy,
per-class recall), `psi` (protocol, sizes, intersection, seconds, bytes), `protection` (attack AUCs
with and without protection, ε and δ, the cost) and `runtime` ("simulator" or "deployment").
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fedshop import __version__
from fedshop.report.figures import svg_of
from fedshop.report.html import CSS, _fmt, _table
from fedshop.storage.private_files import write_private

METHODS = {
    "joint": "Joint (split learning across parties)",
    "label_holder_only": "Label holder alone (its own columns)",
    "centralized": "Centralized (all columns pooled: the reference)",
}
CLASSES = ("small", "fit", "large")


def write_vertical_run(out: Path, config_toml: str, result: dict[str, Any]) -> None:
    metrics = {
        "fedshop_version": __version__,
        **{k: v for k, v in result.items() if k != "scenario"},
    }
    write_private(out / "config.toml", config_toml)
    write_private(out / "metrics.json", json.dumps(metrics, indent=1, default=_json) + "\n")
    write_private(
        out / "data_report.json", json.dumps(result.get("scenario", {}), indent=1, default=_json)
    )
    write_private(out / "report.html", render_vertical(result, config_toml))


def _json(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def render_vertical(result: dict[str, Any], config_toml: str) -> str:
    rows = []
    for key, label in METHODS.items():
        block = result.get(key)
        if not block:
            continue
        recall = block.get("recall", {})
        recall_values = (
            recall if isinstance(recall, dict) else dict(zip(CLASSES, recall, strict=False))
        )
        rows.append(
            [html.escape(label), _fmt(block.get("macro_auc")), _fmt(block.get("accuracy"))]
            + [_fmt(recall_values.get(c)) for c in CLASSES]
            + [_fmt(block.get("seconds"), 1)]
        )
    summary = _table(
        ["model", "macro AUC", "accuracy", "recall small", "recall fit", "recall large", "seconds"],
        rows,
    )
    psi_html = _psi(result.get("psi", {}))
    protection = result.get("protection", {})
    prot_html = _protection(protection)
    scenario = result.get("scenario", {})
    scen_rows = [
        [html.escape(str(k)), html.escape(json.dumps(v, default=_json))]
        for k, v in scenario.items()
        if k not in ("cleaning",)
    ]
    curve = _curve(result.get("history", []))
    runtime = html.escape(str(result.get("runtime", "simulator")))
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>FedShop vertical run</title><style>{CSS}</style></head><body>
<h1>Vertical federation: fit prediction on RentTheRunway</h1>
<p class="muted">Runtime: {runtime}. The label holder (platform: rentals and fit labels) and the
feature holders (partner: body measurements) aligned their customers by PSI and trained one model
whose inputs never left their owner. Data: RentTheRunway (Misra, Wan &amp; McAuley, RecSys 2018),
research use.</p>
<h2>Models on the same test rentals</h2>{summary}
<p class="muted">Macro AUC: the mean of the one-vs-rest AUCs of small, fit and large. The test set:
the latest rentals by review date among the aligned customers' rentals.</p>
<h2>Training</h2>{curve}
<h2>Private set intersection</h2>{psi_html}
<h2>What crosses the cut, and the attacks</h2>{prot_html}
<h2>Scenario: who holds what</h2>{_table(["", "value"], scen_rows, (1,))}
<h2>Configuration</h2><pre>{html.escape(config_toml)}</pre>
</body></html>"""


def _psi(psi: dict[str, Any]) -> str:
    if not psi:
        return "<p class='muted'>No PSI in this run (the intersection was taken in the clear).</p>"
    rows = [
        [
            html.escape(name),
            _fmt(entry.get("intersection_size")),
            _fmt(entry.get("feature_holder_customers")),
            _fmt(entry.get("seconds"), 3),
            _fmt(entry.get("bytes_label_to_feature")),
            _fmt(entry.get("bytes_feature_to_label")),
            "yes" if entry.get("feature_holder_learned_intersection") else "no",
        ]
        for name, entry in psi.get("with", {}).items()
    ]
    table = _table(
        ["feature holder", "intersection", "its customers", "seconds", "bytes label→feature",
         "bytes feature→label", "it learned the intersection"],
        rows,
    )  # fmt: skip
    return (
        f"<p>Protocol <b>{html.escape(str(psi.get('protocol')))}</b> (semi-honest), revealed to "
        f"{html.escape(str(psi.get('reveal_to')))}; the label holder has "
        f"{_fmt(psi.get('label_holder_customers'))} customers; "
        f"{_fmt(psi.get('aligned_customers'))} are held by every party and trained on.</p>{table}"
    )


def _protection(protection: dict[str, Any]) -> str:
    if not protection:
        return "<p class='muted'>Not measured in this run.</p>"
    rows = []
    for label, key in (("unprotected", "unprotected"), ("protected", "protected")):
        block = protection.get(key)
        if not block:
            continue
        attacks = block.get("attacks", {})
        found = {k: v for k, v in attacks.items() if k.startswith("max_")}
        rows.append(
            [label]
            + [_fmt(found.get(k)) for k in sorted(found)]
            + [_fmt(block.get("epsilon")), _fmt(block.get("macro_auc_cost"))]
        )
    keys = sorted(
        k for k in protection.get("unprotected", {}).get("attacks", {}) if k.startswith("max_")
    )
    table = _table(["run", *[k[4:] for k in keys], "ε", "macro AUC cost"], rows)
    what = html.escape(str(protection.get("protects", "")))
    out = f"<h3>Labels, against the feature holders</h3>{table}<p class='muted'>{what}</p>"
    recon_rows = []
    features = protection.get("features_protected", {})
    for label, found, extra in (
        ("unprotected", protection.get("unprotected", {}).get("reconstruction", {}), {}),
        ("activations protected", features.get("reconstruction", {}), features),
    ):
        for holder, result in found.items():
            r2 = ", ".join(f"{c} {v:.2f}" for c, v in result.get("r2", {}).items())
            recon_rows.append(
                [html.escape(label), html.escape(holder), html.escape(r2),
                 _fmt(extra.get("epsilon")), _fmt(extra.get("macro_auc_cost"))]
            )  # fmt: skip
    if recon_rows:
        out += "<h3>Features, against the label holder (reconstruction from activations)</h3>"
        out += _table(["run", "feature holder", "R² per column", "ε", "macro AUC cost"], recon_rows)
    return out


def _curve(history: list[dict]) -> str:
    if not history:
        return "<p class='muted'>No history.</p>"
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot([h["exchanges"] for h in history], [h["train_loss"] for h in history], marker=".")
    ax.set_xlabel("exchanges with the feature holders")
    ax.set_ylabel("training loss (label holder)")
    return svg_of(fig)
