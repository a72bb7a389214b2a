"""The HTML report of a privacy–utility sweep (`fedshop privacy sweep`): one model per ε.

`render_sweep_report` turns the sweep's `sweep.json` into a self-contained page with a header, a
two-panel figure (accuracy against ε, membership-inference AUC against ε) and a table;
`write_sweep_report` writes it to `report.html` in the sweep's folder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

from fedshop.report.figures import svg_of
from fedshop.report.html import ATTRIBUTION, CSS, PROTOCOL_LABELS, PROTOCOL_TEXT, _fmt, _table

METRIC_LABELS = {"hr@10": "HR@10", "ndcg@10": "NDCG@10"}
METRIC_COLOURS = {"hr@10": "C0", "ndcg@10": "C1"}
AUC_COLOUR = "C3"
REFERENCE_FRACTION = 0.9  # the "90% of non-private" line


def _number(value: Any) -> float | None:
    """A JSON number as a float; None for anything else (null, a string, a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _is_private(point: dict[str, Any]) -> bool:
    epsilon = _number(point.get("epsilon"))
    return epsilon is not None and math.isfinite(epsilon)


def _sorted_points(sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """Points by ε ascending, the non-private run(s) (ε null or ∞) last."""
    points = [p for p in sweep.get("points", []) if isinstance(p, dict)]
    return sorted(points, key=lambda p: (0, _number(p["epsilon"])) if _is_private(p) else (1, 0.0))


def _non_private(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((p for p in points if not _is_private(p)), None)


def _short(value: float) -> str:
    """A compact number for ε and δ: 0.5, 8, 1.7e-05."""
    return f"{value:.3g}"


def _cell(value: Any, digits: int) -> str:
    """A number with `digits` decimals; anything that is not a number escaped as text (or "–")."""
    number = _number(value)
    return _fmt(number, digits) if number is not None else _fmt(value)


def _private_series(points: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for p in points:
        value = _number(p.get(key))
        if _is_private(p) and value is not None:
            xs.append(_number(p["epsilon"]))
            ys.append(value)
    return xs, ys


def _epsilon_axis(ax: Any, epsilons: list[float]) -> None:
    """Log-scaled ε axis with a tick at every ε of the sweep, labelled 0.5, 1, 8 rather than 10^x."""
    ax.set_xscale("log")
    if epsilons:
        low, high = min(epsilons), max(epsilons)
        ax.set_xlim(low / 1.5, high * 1.5)
        ax.xaxis.set_major_locator(FixedLocator(sorted(set(epsilons))))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _short(x)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("ε (log scale; smaller is more private)")
    ax.grid(alpha=0.3)


def _fit_y(ax: Any, pad: float = 0.08) -> None:
    """Y limits that keep every curve and horizontal line off the frame (axhline does not autoscale)."""
    values = [y for line in ax.get_lines() for y in line.get_ydata()]
    values = [float(y) for y in values if math.isfinite(float(y))]
    if values:
        low, high = min(values), max(values)
        margin = pad * (high - low) if high > low else 0.05
        ax.set_ylim(low - margin, high + margin)


def sweep_figure(sweep: dict[str, Any]) -> Figure:
    """Left: HR@10 and NDCG@10 against ε. Right: membership-inference AUC against ε."""
    points = _sorted_points(sweep)
    baseline = _non_private(points) or {}
    popularity = sweep.get("popularity") or {}
    epsilons = [_number(p["epsilon"]) for p in points if _is_private(p)]

    fig = Figure(figsize=(11, 4.6), dpi=100, layout="constrained")
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.25, 1]})

    # Legend order: a column of HR@10 entries (with the 90% line), then a column of NDCG@10.
    groups: dict[str, list[Any]] = {key: [] for key in METRIC_LABELS}
    for key, label in METRIC_LABELS.items():
        colour = METRIC_COLOURS[key]
        xs, ys = _private_series(points, key)
        if xs:
            groups[key] += left.plot(xs, ys, marker="o", color=colour, label=f"{label} (private)")
        non_private = _number(baseline.get(key))
        if non_private is not None:
            groups[key].append(
                left.axhline(
                    non_private, ls="--", color=colour, label=f"{label} non-private (ε = ∞)"
                )
            )
        pop = _number(popularity.get(key))
        if pop is not None:
            groups[key].append(
                left.axhline(pop, ls=":", color=colour, lw=1.4, label=f"{label} popularity")
            )
    non_private_hr = _number(baseline.get("hr@10"))
    if non_private_hr is not None:
        groups["hr@10"].append(
            left.axhline(
                REFERENCE_FRACTION * non_private_hr,
                color="0.55",
                lw=3,
                alpha=0.3,
                label="90% of non-private HR@10",
            )
        )
    left_handles = [handle for group in groups.values() for handle in group]
    _epsilon_axis(left, epsilons)
    protocol = _protocol_name(sweep)
    left.set_ylabel(f"accuracy ({protocol})" if protocol else "accuracy")
    left.set_title("Recommendation quality", fontsize=11)

    xs, ys = _private_series(points, "mia_auc")
    non_private_auc = _number(baseline.get("mia_auc"))
    if xs:
        right.plot(xs, ys, marker="o", color=AUC_COLOUR, label="MIA AUC (private)")
    if non_private_auc is not None:
        right.axhline(non_private_auc, ls="--", color=AUC_COLOUR, label="non-private (ε = ∞)")
    right.axhline(0.5, ls=":", color="0.35", label="chance (0.5)")
    right_handles = right.get_legend_handles_labels()[0]
    if not xs and non_private_auc is None:
        right.text(
            0.5,
            0.62,
            "no membership-inference AUC recorded",
            transform=right.transAxes,
            ha="center",
            color="0.4",
        )
    _epsilon_axis(right, epsilons)
    right.set_ylabel("membership-inference AUC")
    right.set_title("Privacy attack (0.5 = cannot tell)", fontsize=11)

    for ax, handles in ((left, left_handles), (right, right_handles)):
        _fit_y(ax)
        # Below the panel, so it never covers a curve; constrained layout makes room for it.
        ax.legend(
            handles=handles,
            fontsize=8,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.15),
            ncol=2,
            frameon=False,
        )
    return fig


def sweep_svg(sweep: dict[str, Any]) -> str:
    return svg_of(sweep_figure(sweep))


def _protocol_name(sweep: dict[str, Any]) -> str:
    """The protocol for the y label; only known names, so no text from the JSON reaches matplotlib
    (where "$" would start mathtext and the SVG would carry it in comments)."""
    return PROTOCOL_LABELS.get(sweep.get("protocol"), "")


def _table_rows(points: list[dict[str, Any]]) -> list[list[str]]:
    baseline_hr = _number((_non_private(points) or {}).get("hr@10"))
    rows = []
    for p in points:
        epsilon = _number(p.get("epsilon"))
        delta = _number(p.get("delta"))
        hr = _number(p.get("hr@10"))
        relative = (
            f"{100 * hr / baseline_hr:.1f} %" if hr is not None and baseline_hr else _fmt(None)
        )
        rows.append(
            [
                _short(epsilon) if _is_private(p) else "∞",
                _short(delta) if delta is not None else _fmt(None),
                _cell(p.get("noise_multiplier"), 2),
                _cell(p.get("hr@10"), 4),
                _cell(p.get("ndcg@10"), 4),
                relative,
                _cell(p.get("mia_auc"), 3),
                _cell(p.get("seconds"), 1),
            ]
        )
    return rows


NOT_PRIVATE = (
    '<p class="warning"><b>Not private: noise seed known.</b> This sweep drew its DP noise from '
    "[privacy] noise_seed, so whoever knows the seed can remove it; the ε below hold only against "
    "whoever does not.</p>"
)


def render_sweep_report(sweep: dict[str, Any]) -> str:
    """A complete, self-contained HTML page for one privacy–utility sweep (`sweep.json`)."""
    points = _sorted_points(sweep)
    table = _table(
        [
            "ε",
            "δ",
            "noise multiplier z",
            "HR@10",
            "NDCG@10",
            "HR@10 vs non-private",
            "MIA AUC",
            "seconds",
        ],
        _table_rows(points),
    )
    delta = _number(sweep.get("delta"))
    delta_text = _short(delta) if delta is not None else _fmt(sweep.get("delta"))
    protocol = PROTOCOL_TEXT.get(sweep.get("protocol"), "")
    protocol_note = f" ({protocol})" if protocol else ""
    popularity = (
        " The popularity baseline (dotted) recommends the globally most popular items to everyone "
        "and uses no personal model."
        if sweep.get("popularity")
        else ""
    )
    attribution = ATTRIBUTION.get(str(sweep.get("dataset")), "")

    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>FedShop privacy–utility sweep</title>
<style>{CSS}</style></head><body>
<h1>FedShop privacy–utility sweep</h1>
<p class="muted">dataset <b>{_fmt(sweep.get("dataset"))}</b> · model <b>{_fmt(sweep.get("model"))}</b>
· <b>{_fmt(sweep.get("mode"))}</b> federation · protocol <b>{_fmt(sweep.get("protocol"))}</b>{protocol_note}
· protected unit <b>{_fmt(sweep.get("unit"))}</b> · mechanism <b>{_fmt(sweep.get("mechanism"))}</b>
· accountant <b>{_fmt(sweep.get("accountant"))}</b> · δ = {delta_text}
· seed {_fmt(sweep.get("seed"))} · {_fmt(sweep.get("rounds"))} rounds</p>
{NOT_PRIVATE if sweep.get("noise_seed_known") else ""}
<h2>How to read this</h2>
<p>Each point is one model trained with differential privacy at a target ε. ε is the privacy loss of
one protected unit — here {_fmt(sweep.get("unit"))} — over the whole run, holding with probability
1 − δ: smaller ε is more private, and ε = ∞ is the same training without privacy. The left panel shows
what privacy costs in recommendation quality; the right panel shows what it buys against a
membership-inference attack, which tries to tell from the trained model whether someone's data was in
training. An AUC of 0.5 means the attack cannot tell members from non-members (no better than a coin
flip); 1.0 means it always can.{popularity}</p>
<h2>Privacy against utility</h2>
{sweep_svg(sweep)}
<h2>Points</h2>
{table}
<p class="muted">“HR@10 vs non-private” is each model's HR@10 as a percentage of the non-private
model's. z is the noise multiplier: the Gaussian noise's standard deviation relative to the clipping
norm, the smallest that keeps the whole run within ε at δ by the accountant.</p>
<p class="muted">{attribution}</p>
</body></html>
"""


def write_sweep_report(sweep: dict[str, Any], folder: Path) -> Path:
    """Write the sweep's report to `folder/report.html` (UTF-8) and return its path."""
    path = Path(folder) / "report.html"
    path.write_text(render_sweep_report(sweep), encoding="utf-8")
    return path
