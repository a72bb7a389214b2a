"""A retail-task run's folder (`fedshop train --task demand|returns|fraud`).

config.toml, data_report.json (how the table was built, with counts)
metrics.json   per method (federated, centralized, local_only, and the task's baselines) its summary
               metrics, per storefront, the federated rounds, bytes per round, and the task's own
               blocks (demand: the inventory policy; returns: the DP quality view)
report.html    tables and the plots a planner looks at (PR curves; forecast against actual for
               chosen items and the inventory costs)
models/…       safetensors of each method's network (owner-only files)
audit.jsonl    the federated run's hash-chained, signed audit log (`fedshop audit verify`)
"""

from __future__ import annotations

import dataclasses
import html
import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import save

from fedshop import __version__
from fedshop.data.tabular import TabularDataset
from fedshop.report.communication import communication_block, communication_section
from fedshop.report.figures import svg_of
from fedshop.report.html import CSS, _fmt, _table, protection_section
from fedshop.report.run_folder import _finite, history_entry
from fedshop.retail_experiment import RetailResult
from fedshop.storage.private_files import write_private

METHOD_LABELS = {
    "federated": "Federated (storefronts train together)",
    "centralized": "Centralized (every storefront's rows pooled)",
    "local_only": "Local only (each storefront alone)",
    "seasonal_naive": "Seasonal naive (per series)",
    "best_statistical": "Best of statsforecast per series",
}
COLOURS = {
    "federated": "C0", "centralized": "C1", "local_only": "C2", "seasonal_naive": "C7",
    "best_statistical": "C3",
}  # fmt: skip
TITLES = {
    "demand": "demand forecasting and inventory",
    "returns": "return risk",
    "fraud": "fraud detection",
}


@dataclasses.dataclass
class Figure:
    """A section of the report: a plot's SVG or a table's HTML, under a title, with a caption."""

    title: str
    body: str
    caption: str


@dataclasses.dataclass
class Scores:
    """A task's scoring of a run: per method its summary and per-storefront metrics, the task's
    own blocks for metrics.json, the columns its summary table shows, and its figures."""

    methods: dict[str, dict[str, Any]]  # method → {"summary": {...}, "per_silo": {silo: {...}}}
    headline: tuple[str, ...]
    blocks: dict[str, Any] = dataclasses.field(default_factory=dict)
    figures: list[Figure] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)  # what the metrics mean


def quality_table(block: dict[str, Any]) -> Figure:
    """The DP quality view's tested items, highest interval first."""
    rows = [
        [html.escape(str(item["item_id"])), html.escape(str(item["name"]))]
        + [_fmt(item[k]) for k in ("rate", "low", "high")]
        + ["yes" if item["flagged"] else "", "yes" if item["confirmed"] else ""]
        for item in block["top_items"]
    ]
    table = _table(
        ["item", "name", "return rate", "interval low", "interval high", "flagged", "confirmed"],
        rows,
        text_columns=(1,),
    )
    seed = (
        "a known noise seed (reproducible, predictable)"
        if block["noise_seed_known"]
        else ("secret noise")
    )
    return Figure(
        "Items returned abnormally often (differentially private)",
        table,
        f"Every storefront released its per-item counts of buyers and returners once at "
        f"ε = {block['epsilon']:.3g}, δ = {block['delta']:.3g} ({seed}), paid from its ledger. "
        f"Shop-wide return rate {block['overall_rate']:.4f}; flagged: the interval's lower end "
        f"is above {block['threshold']:.4f}; confirmed: Benjamini–Hochberg at the stated false "
        "discovery rate. The 20 highest lower ends of the tested items are shown.",
    )


def metrics_document(result: RetailResult, scores: Scores) -> dict[str, Any]:
    config = result.config
    doc: dict[str, Any] = {
        "fedshop_version": __version__,
        "task": config.task,
        "dataset": result.dataset.name,
        "mode": config.federated.mode,
        "seed": config.seed,
        "rounds": config.federated.rounds,
        "local_epochs": config.federated.local_epochs,
        "protection": dataclasses.asdict(result.protection),
        "bytes_per_round_per_silo": result.message_bytes,
    }
    for method, scored in scores.methods.items():
        doc[method] = dict(scored["summary"])
        if method in result.methods:
            doc[method]["seconds"] = round(result.methods[method].seconds, 3)
    if result.history:
        doc["federated"]["seconds_per_round"] = float(
            np.median([record.seconds for record in result.history])
        )
    doc["per_silo"] = {
        silo: {m: s["per_silo"].get(silo) for m, s in scores.methods.items()}
        for silo in result.dataset.silo_names
    }
    doc.update(scores.blocks)
    doc["history"] = [history_entry(record) for record in result.history]
    doc["communication"] = communication_block(result.history, result.config)
    return _finite(doc)


def write_retail_run(out: Path, result: RetailResult, scores: Scores) -> Path:
    out = Path(out)
    (out / "config.toml").write_text(result.config.to_toml(), encoding="utf-8")
    data_report = _finite(result.dataset.report)
    (out / "data_report.json").write_text(json.dumps(data_report, indent=2, default=str) + "\n")
    metrics = metrics_document(result, scores)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    written: dict[str, bytes] = {}
    for method in result.methods.values():
        for stem, tensors in method.weights.items():
            path = out / "models" / f"{stem}.safetensors"
            data = save({k: v.contiguous() for k, v in tensors.items()})
            write_private(path, data)
            written[path.relative_to(out).as_posix()] = data
    (out / "report.html").write_text(
        render_retail_report(metrics, data_report, scores, result.config.to_toml()),
        encoding="utf-8",
    )
    if result.audit is not None:
        from fedshop.report.audit import write_audit

        write_audit(out, result.audit, result.dataset.silo_names, written)
    return out


def render_retail_report(
    metrics: dict[str, Any], data_report: dict[str, Any], scores: Scores, config_toml: str
) -> str:
    methods = [m for m in scores.methods if m in metrics]
    summary = _table(
        ["method", *scores.headline, "seconds"],
        [
            [html.escape(METHOD_LABELS.get(m, m))]
            + [_fmt(metrics[m].get(k)) for k in scores.headline]
            + [_fmt(metrics[m].get("seconds"), 1)]
            for m in methods
        ],
    )
    first = scores.headline[0]
    per_silo = _table(
        ["storefront", *(f"{first} {m}" for m in methods)],
        [
            [html.escape(silo)] + [_fmt((by.get(m) or {}).get(first)) for m in methods]
            for silo, by in metrics.get("per_silo", {}).items()
        ],
    )
    history = _table(
        ["round", "storefronts", "seconds", *scores.headline[:2]],
        [
            [_fmt(h["round"]), _fmt(h["clients"]), _fmt(h["seconds"], 2)]
            + [_fmt(h.get(k)) for k in scores.headline[:2]]
            for h in metrics.get("history", [])
        ],
    )
    sizes = metrics.get("bytes_per_round_per_silo") or {}
    figures = "".join(
        f"<h2>{html.escape(f.title)}</h2>{f.body}<p class='muted'>{html.escape(f.caption)}</p>"
        for f in scores.figures
    )
    notes = "".join(f"<p class='muted'>{html.escape(n)}</p>" for n in scores.notes)
    counts = [
        [html.escape(str(k)), _fmt(v)]
        for k, v in data_report.items()
        if isinstance(v, int | float | str) and k != "source"
    ]
    title = TITLES.get(str(metrics.get("task")), str(metrics.get("task")))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>FedShop {html.escape(title)} report</title>
<style>{CSS}</style></head><body>
<h1>FedShop {html.escape(title)} report</h1>
<p class="muted">dataset <b>{_fmt(metrics.get("dataset"))}</b> · seed {_fmt(metrics.get("seed"))} ·
{_fmt(metrics.get("rounds"))} rounds of {_fmt(metrics.get("local_epochs"))} local epochs ·
FedShop {_fmt(metrics.get("fedshop_version"))}</p>
<h2>Results</h2>
{summary}
{notes}
{figures}
<h2>Per storefront</h2>
{per_silo}
<h2>Protection of updates in transit</h2>
{protection_section(metrics.get("protection") or {})}
<h2>Federated rounds</h2>
{history}
<h3>Bytes of one storefront's update per round (touched embedding rows only)</h3>
{_table(["storefront", "bytes"], [[html.escape(s), _fmt(v)] for s, v in sizes.items()])}
<h3>Communication</h3>
{communication_section(metrics.get("communication"))}
<h2>Data</h2>
<p>Source: {_fmt(data_report.get("source"))}</p>
{_table(["what", "value"], counts)}
<h2>Configuration</h2><pre>{html.escape(config_toml)}</pre>
</body></html>
"""


def silo_gain_figure(dataset: TabularDataset, methods: dict[str, dict[str, Any]]) -> Figure:
    """Per storefront, smallest first: AUC-PR of each method, to show who gains from federation."""
    import matplotlib.pyplot as plt

    silos = sorted(dataset.silos, key=lambda s: float(s.train.target.sum()))
    figure, axis = plt.subplots(figsize=(max(5.5, 0.45 * len(silos)), 4))
    x = np.arange(len(silos))
    width = 0.8 / max(len(methods), 1)
    for k, (method, scored) in enumerate(methods.items()):
        values = [scored["per_silo"][s.name]["auc_pr"] for s in silos]
        axis.bar(x + k * width, values, width, label=method, color=COLOURS.get(method))
    axis.set_xticks(
        x + 0.4 - width / 2,
        [f"{s.name}\n{int(s.train.target.sum())}" for s in silos],
        rotation=60,
        fontsize=7,
    )
    axis.set(ylabel="AUC-PR")
    axis.legend(fontsize=8)
    return Figure(
        "Per storefront, fewest training positives first",
        svg_of(figure),
        "Under each name: the storefront's positive training rows. Small storefronts see too few "
        "positives to learn alone.",
    )
