"""A deployed retail run's scores (`fedshop deploy local` with `task = "demand" | "returns" |
"fraud"`), from the counts each storefront sent of its held-out rows.

In a deployment a storefront's held-out rows and their scores never leave it: its final evaluation
sends counts (eval/tabular_metrics.py), a classifier's histogram of its rows' scores in 1000 equal
bins of probability by label, a forecaster's sums of absolute error and of actual demand. So the
deployed run's metrics.json and report show the federated network's metrics computed from those
counts: AUC-PR, AUC and recall at a 1 % false-positive rate with each bin's midpoint as its rows'
score (within about 0.01 of the exact values: tests/test_retail_core.py), pooled over every
storefront's rows and per storefront; the demand task's WAPE of the median forecast (exact: a
sum's ratio). The simulator (`fedshop train --task …`) scores each row's exact prediction and adds
the centralized and local-only networks and each task's own views (the demand task's baselines and
inventory policy), which need per-row predictions.
"""

from __future__ import annotations

import numpy as np

from fedshop.data.tabular import TabularDataset
from fedshop.eval.tabular_metrics import BINS, BinaryCounts, ForecastSums, summarise_counts
from fedshop.report.figures import svg_of
from fedshop.report.retail_run import Figure, Scores, silo_gain_figure

SCORED_FROM = (
    "each storefront's counts of its held-out rows (deployment): a classifier's scores in "
    f"{BINS} equal bins of probability, a forecaster's sums"
)


def score_counts(
    dataset: TabularDataset, per_silo: dict[str, BinaryCounts | ForecastSums]
) -> Scores:
    """The federated method's scores from the storefronts' final counts, in `dataset`'s silo
    order (a storefront whose counts did not arrive is left out)."""
    counts = {s.name: per_silo[s.name] for s in dataset.silos if s.name in per_silo}
    federated = {
        "summary": summarise_counts(counts) if counts else {},
        "per_silo": {name: c.metrics() for name, c in counts.items()},
    }
    blocks = {"scored_from": SCORED_FROM}
    if dataset.kind != "binary":
        notes = [
            "WAPE: the sum over held-out series-weeks of |actual − median forecast| over the sum "
            "of actual demand, each storefront's sums added; silo_mean_wape: the unweighted mean "
            "over storefronts. The baselines and the inventory policy need each series' forecasts, "
            "which stay with their storefronts in a deployment: `fedshop train --task demand`."
        ]
        return Scores({"federated": federated}, ("wape", "silo_mean_wape"), blocks, [], notes)
    notes = [
        f"Scored from each storefront's counts: its held-out rows' scores in {BINS} equal bins "
        "of probability, by label (a row's exact score never leaves its storefront). AUC-PR is "
        "average precision over all held-out rows; silo_mean_* the unweighted mean over "
        "storefronts with at least one positive; recall@fpr the share of positives flagged at a "
        "1 % false-positive rate."
    ]
    figures = []
    if counts:
        total = sum(counts.values(), BinaryCounts(np.zeros((2, BINS), np.int64)))
        figures = [binned_pr_curve(total), silo_gain_figure(dataset, {"federated": federated})]
    headline = ("auc_pr", "silo_mean_auc_pr", "auc", "recall@fpr", "silo_mean_recall@fpr")
    return Scores({"federated": federated}, headline, blocks, figures, notes)


def binned_pr_curve(total: BinaryCounts) -> Figure:
    """Precision against recall at each bin's lower edge as the threshold, every row once."""
    import matplotlib.pyplot as plt

    negatives, positives = total.histogram[:, ::-1]  # highest scores first
    hits, flagged = np.cumsum(positives), np.cumsum(positives + negatives)
    keep = flagged > 0
    precision = hits[keep] / flagged[keep]
    recall = hits[keep] / max(int(positives.sum()), 1)
    figure, axis = plt.subplots(figsize=(5.5, 4))
    axis.plot(recall, precision, label="federated", color="C0", drawstyle="steps-post")
    rows = int(total.histogram.sum())
    axis.axhline(positives.sum() / max(rows, 1), color="grey", linestyle=":", label="base rate")
    axis.set(xlabel="recall", ylabel="precision", ylim=(0, 1.02))
    axis.legend()
    return Figure(
        "Precision–recall, all storefronts",
        svg_of(figure),
        f"Every held-out row once, from the storefronts' counts in {BINS} bins of probability.",
    )
