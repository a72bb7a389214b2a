"""A self-contained HTML report: summary table, per-silo table, training curves, data report."""

from __future__ import annotations

import html
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: render straight to SVG
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from fedshop.report.communication import communication_section
from fedshop.report.figures import svg_of

METHOD_LABELS = {
    "federated": "Federated",
    "centralized": "Centralized (pooled data)",
    "local_only": "Local only (each silo alone)",
    "popularity": "Global popularity",
}
COLOURS = {"federated": "C0", "centralized": "C1", "local_only": "C2", "popularity": "C3"}
METRICS = ("hr@10", "ndcg@10", "recall@20", "silo_mean_hr@10")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#1d2430;line-height:1.45;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #dde3ea}
table{border-collapse:collapse;margin:.6rem 0;font-size:.92rem}
th,td{padding:.28rem .7rem;border-bottom:1px solid #e7ebf0;text-align:right}
th:first-child,td:first-child{text-align:left} th{background:#f4f6f9}
.muted{color:#667085;font-size:.9rem} pre{background:#f6f8fa;padding:.8rem;overflow:auto;font-size:.85rem}
.text{text-align:left} .warning{color:#b42318;font-weight:600}
"""


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[str]], text_columns: tuple[int, ...] = ()) -> str:
    """An HTML table; numbers align right, the first column and `text_columns` align left."""

    def cell(tag: str, index: int, content: str) -> str:
        style = ' class="text"' if index in text_columns else ""
        return f"<{tag}{style}>{content}</{tag}>"

    head = "".join(cell("th", i, html.escape(h)) for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _methods(metrics: dict[str, Any]) -> list[str]:
    return [m for m in METHOD_LABELS if m in metrics]


def curve_figure(metrics: dict[str, Any], metric: str = "hr@10") -> plt.Figure:
    """HR@10 after every round for the federated model, against the baselines."""
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=100)
    history = [h for h in metrics.get("history", []) if h.get(metric) is not None]
    if history:
        ax.plot(
            [h["round"] for h in history],
            [h[metric] for h in history],
            marker="o",
            ms=3,
            color=COLOURS["federated"],
            label=METHOD_LABELS["federated"] + " (per round)",
        )
    for method, points in metrics.get("curves", {}).items():
        ax.plot(
            [p["step"] for p in points],
            [p[metric] for p in points],
            ls="--",
            color=COLOURS.get(method),
            label=METHOD_LABELS.get(method, method) + " (per epoch)",
        )
    finals = {"federated": ":", "local_only": "-.", "popularity": (0, (1, 3))}
    for method, style in finals.items():
        value = metrics.get(method, {}).get(metric)
        if value is not None:
            suffix = " (final, after personalisation)" if method == "federated" else ""
            ax.axhline(
                value, ls=style, color=COLOURS[method], label=f"{METHOD_LABELS[method]}{suffix}"
            )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (federated) / epoch (centralized)")
    protocol = PROTOCOL_LABELS.get(metrics.get("protocol", "full"), str(metrics.get("protocol")))
    ax.set_ylabel(f"{metric.upper()} ({metrics.get('split', 'test')}, {protocol})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def curve_svg(metrics: dict[str, Any], metric: str = "hr@10") -> str:
    return svg_of(curve_figure(metrics, metric))


PROTOCOL_LABELS = {"full": "full ranking", "sampled-100": "sampled-100", "ncf": "NCF protocol"}
PROTOCOL_TEXT = {
    "full": "every catalogue item ranked, the customer's training items excluded",
    "sampled-100": "each held-out item ranked against 100 sampled items the customer never "
    "interacted with, the same for every method; not comparable with full ranking",
    "ncf": "the NCF paper's published MovieLens-1M test set (He et al., WWW 2017): each user's "
    "latest rating ranked against its 99 published negatives, as FedMF, FedNCF and PFedRec report",
}
ATTRIBUTION = {
    "online-retail": "Data: UCI Online Retail (Chen, Sain &amp; Guo, 2012), CC BY 4.0.",
    "movielens-1m": "Data: MovieLens 1M (Harper &amp; Konstan, 2015), GroupLens, research use.",
    "movielens-100k": "Data: MovieLens 100K (Harper &amp; Konstan, 2015), GroupLens, research use.",
}
_AMAZON = "Data: Amazon review data 2014 (He &amp; McAuley, WWW 2016), 5-core, research use."
ATTRIBUTION.update({f"amazon-{c}": _AMAZON for c in ("toys", "beauty", "sports", "sequential")})


def privacy_section(privacy: dict[str, Any]) -> str:
    if privacy.get("epsilon") is None:
        return (
            "<p>No differential privacy in this run: the released shared model carries no (ε, δ) "
            "guarantee (ε = ∞). Train with <code>--dp user</code> (cross-device) or "
            "<code>--dp record</code> (cross-silo) for one.</p>"
        )
    known = bool(privacy.get("noise_seed_known"))
    noise = (
        '<span class="warning">not private: noise seed known</span>'
        if known
        else "secret (drawn under a key from the operating system's CSPRNG)"
    )
    rows = [
        ["ε (whole run)", _fmt(privacy["epsilon"], 3)],
        ["δ", f"{privacy['delta']:.3g}"],
        ["δ sized to", _fmt(privacy.get("delta_population"))],
        ["noise", noise],
        ["protected unit", _fmt(privacy.get("unit"))],
        ["mechanism", _fmt(privacy.get("mechanism"))],
        ["accountant", _fmt(privacy.get("accountant"))],
        ["noise multiplier z", _fmt(privacy.get("noise_multiplier"), 3)],
        ["clip (L2)", _fmt(privacy.get("clip"))],
        ["sampling", f"{_fmt(privacy.get('sampling'))}, rate {_fmt(privacy.get('sampling_rate'))}"],
        ["noisy steps", _fmt(privacy.get("steps"))],
    ]
    warning = (
        '<p class="warning">Not private: noise seed known. The noise follows [privacy] noise_seed '
        "(in the configuration below), so anyone who has it can remove the noise: ε describes the "
        "noise that was added, not a guarantee.</p>"
        if known
        else ""
    )
    note = (
        '<p class="muted">ε is computed by Google\'s dp-accounting from the releases of the federated '
        "model and was written to the privacy ledger before each release. The other methods are "
        "non-private reference points that only a simulation can compute (they see pooled data).</p>"
    )
    return warning + _table(["", "value"], rows, text_columns=(1,)) + note


_PROTECTION_LABELS = {
    "secagg": "secure aggregation (SecAgg+ pairwise masks, Shamir-shared seeds; no key to any "
    "single update exists)",
    "ckks": "CKKS homomorphic encryption (TenSEAL); a key holder decrypts only the aggregate",
    "paillier": "Paillier homomorphic encryption (phe); a key holder decrypts only the aggregate",
}


def protection_section(protection: dict[str, Any]) -> str:
    kind = protection.get("kind", "none")
    if kind == "none" or protection.get("seconds_per_round") is None:
        return (
            "<p>Updates travelled unprotected: the server could read each silo's update. Train with "
            "<code>--protection secagg</code> (or <code>ckks</code>, <code>paillier</code>) so that it "
            "learns only their sum.</p>"
        )
    plain = protection.get("plaintext_bytes_per_client")
    sent = protection["bytes_per_client_per_round"]
    rows = [
        ["protection", html.escape(_PROTECTION_LABELS.get(kind, kind))],
        [
            "protocol time per round, all parties (simulator)",
            f"{protection['seconds_per_round']:.3f} s",
        ],
        [
            "round latency added in a deployment (slowest client + server)",
            f"{protection.get('latency_seconds_per_round', 0.0):.3f} s",
        ],
        ["bytes sent per client per round", f"{sent:,.0f}"],
        [
            "unprotected update (float32)",
            f"{plain:,.0f} bytes ({sent / plain:.1f}× more protected)" if plain else "–",
        ],
    ]
    for key, value in (protection.get("details") or {}).items():
        shown = f"{value:.3g}" if isinstance(value, float) else _fmt(value)
        rows.append([html.escape(key.replace("_", " ")), shown])
    return _table(["", "value"], rows, text_columns=(1,))


COLD_START_LABELS = {
    "fold_in": "Basket fold-in (federated model)",
    "popularity": "Global popularity",
    "trained": "Trained vectors (reference)",
}


def cold_start_section(block: dict[str, Any] | None) -> str:
    """New shoppers held out of training: fold-in from their first-day basket against popularity
    and against vectors trained on the same baskets. Empty when the run measured none."""
    if not block:
        return ""
    rows = [
        [html.escape(label)] + [_fmt(block.get(method, {}).get(k)) for k in METRICS]
        for method, label in COLD_START_LABELS.items()
        if method in block
    ]
    table = _table(["method", "HR@10", "NDCG@10", "Recall@20", "silo-mean HR@10"], rows)
    hr = {m: (block.get(m) or {}).get("hr@10") for m in COLD_START_LABELS}
    versus = (block.get("ratios") or {}).get("fold_in/popularity", {}).get("hr@10")
    settings = block.get("settings") or {}
    sentence = (
        f"{_fmt(block.get('customers'))} new shoppers, never seen in training, each get a vector "
        f"folded in from their first day's basket in {_fmt(block.get('fold_in_ms_median'), 1)} ms "
        f"(median; {_fmt(settings.get('steps'))} steps): HR@10 {_fmt(hr['fold_in'])} on their next "
        f"day's purchases, {_fmt(versus, 2)}× popularity ({_fmt(hr['popularity'])})"
        + (
            f", against {_fmt(hr['trained'])} for trained vectors."
            if hr["trained"] is not None
            else "."
        )
    )
    return (
        f"<h2>New shoppers (cold start)</h2><p>{sentence}</p>{table}"
        f'<p class="muted">{_fmt(block.get("rule"))}. Basket items are excluded from the ranking '
        "(full ranking).</p>"
    )


def contribution_section(block: dict[str, Any] | None) -> str:
    """Each silo's value of taking part (fl/contribution.py), or why the run has none. Empty when
    the run wrote no block (no federated method)."""
    if not block:
        return ""
    if not block.get("available"):
        return (
            "<h2>Contribution of each silo</h2><p>Not available in this run: "
            f"{html.escape(str(block.get('reason', '')))}.</p>"
        )
    rows = [
        [
            html.escape(silo),
            _fmt(v.get("shapley"), 5),
            f"{100 * v.get('shapley_share', 0.0):.1f} %",
            _fmt(v.get("leave_one_out"), 5),
            f"{100 * v.get('leave_one_out_share', 0.0):.1f} %",
            _fmt(v.get("rounds")),
        ]
        for silo, v in sorted(
            block.get("per_silo", {}).items(), key=lambda item: -item[1].get("shapley", 0.0)
        )
    ]
    utility = html.escape(str(block.get("utility", "")).upper())
    table = _table(
        ["silo", f"Shapley (Δ {utility})", "share", "leave-one-out", "share", "rounds"], rows
    )
    return (
        "<h2>Contribution of each silo</h2>"
        f"<p>{_fmt(block.get('method'))} of each silo, summed over the rounds: how much its update "
        f"added to the {utility} of the round's model on the {_fmt(block.get('split'))} split "
        f"({_fmt(block.get('customers'))}), each silo evaluating every candidate model on its own "
        "customers. Leave-one-out: the round's model against the one from everyone else.</p>"
        f"{table}"
        f'<p class="muted">{_fmt(block.get("rounds_valued"))} rounds valued, '
        f"{_fmt(block.get('rounds_skipped'))} skipped (gain below the round tolerance); "
        f"{_fmt(block.get('evaluations'))} evaluations, {_fmt(block.get('permutations'))} "
        f"permutations, {_fmt(block.get('seconds'), 1)} s. A share is a value over the sum of all "
        "silos' absolute values; a negative value means the model was better without that silo's "
        "updates. GTG-Shapley is a Monte-Carlo estimate: with few permutations a round, silos whose "
        "values are close are not reliably in order.</p>"
    )


def render_report(metrics: dict[str, Any], data_report: dict[str, Any], config_toml: str) -> str:
    methods = _methods(metrics)
    summary_rows = []
    for method in methods:
        m = metrics[method]
        summary_rows.append(
            [html.escape(METHOD_LABELS[method])]
            + [_fmt(m.get(k)) for k in METRICS]
            + [_fmt(m.get("users")), _fmt(m.get("seconds"), 1)]
        )
    summary = _table(
        [
            "method",
            "HR@10",
            "NDCG@10",
            "Recall@20",
            "silo-mean HR@10",
            "customers evaluated",
            "seconds",
        ],
        summary_rows,
    )

    silo_rows = []
    for silo, by_method in metrics.get("per_silo", {}).items():
        first = next(iter(by_method.values()), {})
        silo_rows.append(
            [html.escape(silo), _fmt(first.get("users"))]
            + [_fmt(by_method.get(m, {}).get("hr@10")) for m in methods]
        )
    per_silo = _table(["silo", "customers evaluated"] + [f"HR@10 {m}" for m in methods], silo_rows)

    cleaning = data_report.get("cleaning", {})
    rules = data_report.get("cleaning_rules", {})
    cleaning_rows = [
        [html.escape(k), _fmt(v), html.escape(rules.get(k, ""))] for k, v in cleaning.items()
    ]
    split_rows = [[html.escape(k), _fmt(v)] for k, v in data_report.get("split", {}).items()]
    silo_data_rows = [
        [
            html.escape(s["silo"]),
            _fmt(s["customers"]),
            _fmt(s["train_interactions"]),
            _fmt(s["test_customers"]),
        ]
        for s in data_report.get("silos", [])
    ]
    merged = data_report.get("merged_into_rest_of_world", data_report.get("merged_into_other", []))
    if "silo_rule" in data_report:
        silo_rule = f"Silos {html.escape(data_report['silo_rule'])}."
        if merged:
            silo_rule += f" Merged: {html.escape(', '.join(merged))}."
    else:
        silo_rule = (
            f"Countries with fewer than {_fmt(data_report.get('min_silo_customers'))} customers "
            f"merged into “Rest of world”: {html.escape(', '.join(merged) or 'none')}."
        )
    date_range = data_report.get("date_range")
    period = (
        f"; interactions from {_fmt(date_range[0])} to {_fmt(date_range[1])}" if date_range else ""
    )
    protocol = PROTOCOL_TEXT.get(metrics.get("protocol"), "")
    mode = metrics.get("mode", "cross-silo")
    attribution = ATTRIBUTION.get(str(metrics.get("dataset")), "")

    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>FedShop run report</title>
<style>{CSS}</style></head><body>
<h1>FedShop run report</h1>
<p class="muted">dataset <b>{_fmt(metrics.get("dataset"))}</b> · model <b>{_fmt(metrics.get("model"))}</b>
· <b>{_fmt(mode)}</b> federation · protocol <b>{_fmt(metrics.get("protocol"))}</b> ({protocol})
· split <b>{_fmt(metrics.get("split"))}</b> · seed {_fmt(metrics.get("seed"))}
· {_fmt(metrics.get("rounds"))} rounds · FedShop {_fmt(metrics.get("fedshop_version"))}</p>
<h2>Results</h2>
{summary}
<p class="muted">HR@10, NDCG@10 and Recall@20 average over all evaluated customers (for local-only, each
customer is scored by their own silo's model); silo-mean HR@10 is the unweighted mean over silos, so a
small storefront counts as much as the large one.</p>
{cold_start_section(metrics.get("cold_start"))}
<h2>Privacy</h2>
{privacy_section(metrics.get("privacy") or {})}
<h2>Protection of updates in transit</h2>
{protection_section(metrics.get("protection") or {})}
<h2>HR@10 during training</h2>
{curve_svg(metrics)}
<h2>Communication</h2>
{communication_section(metrics.get("communication"))}
<h2>Per silo</h2>
{per_silo}
{contribution_section(metrics.get("contribution"))}
<h2>Data</h2>
<p>Source: {_fmt(data_report.get("source"))}{period}; catalogue {_fmt(data_report.get("catalogue_items"))} items.</p>
<h3>Cleaning</h3>{_table(["rule / count", "rows", "meaning"], cleaning_rows, text_columns=(2,))}
<h3>Split</h3><p>{_fmt(data_report.get("split_rule"))}</p>{_table(["count", "value"], split_rows)}
<h3>Silos</h3>{_table(["silo", "customers", "training interactions", "test customers"], silo_data_rows)}
<p class="muted">{silo_rule}</p>
<h2>Configuration</h2><pre>{html.escape(config_toml)}</pre>
<p class="muted">{attribution}</p>
</body></html>
"""
