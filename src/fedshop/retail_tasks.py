"""The retail tasks beyond recommendation: which table each builds and how each scores a run.

demand   Online Retail's weekly units per (stock code, country), quantile forecasts, an inventory
         policy driven by them, against per-series statistical baselines (data/demand.py,
         eval/forecast.py, eval/forecast_baselines.py, eval/inventory.py)
returns  Online Retail's purchase lines labelled by whether the customer cancelled them later, and
         the merchandiser's DP view of items returned abnormally often (data/returns.py,
         privacy/return_quality.py)
fraud    a public labelled e-commerce fraud table, storefronts by country (data/fraud.py)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedshop.config import RunConfig
from fedshop.data.tabular import TabularDataset
from fedshop.report.retail_run import Figure, Scores, svg_of
from fedshop.retail_experiment import RetailResult, score_binary

COLOURS = {"federated": "C0", "centralized": "C1", "local_only": "C2"}


def load_retail_dataset(config: RunConfig) -> TabularDataset:
    raise NotImplementedError(config.task)


def score_run(result: RetailResult) -> Scores:
    if result.dataset.kind == "binary":
        return score_classifier(result)
    raise NotImplementedError(result.config.task)


def score_classifier(result: RetailResult) -> Scores:
    dataset = result.dataset
    methods = {m: score_binary(dataset, t.predictions) for m, t in result.methods.items()}
    figures = [pr_curves(result), silo_gain_figure(dataset, methods)]
    notes = [
        "AUC-PR is average precision over all held-out rows (every row once); silo_mean_* is the "
        "unweighted mean over storefronts with at least one positive, so a small storefront counts "
        "as much as a large one. recall@fpr: the share of positives flagged at a 1 % false-positive "
        "rate."
    ]
    headline = ("auc_pr", "silo_mean_auc_pr", "auc", "recall@fpr", "silo_mean_recall@fpr")
    return Scores(methods, headline, figures=figures, notes=notes)


def pr_curves(result: RetailResult) -> Figure:
    import matplotlib.pyplot as plt

    labels = result.dataset.pooled("test").target > 0.5
    figure, axis = plt.subplots(figsize=(5.5, 4))
    for method, trained in result.methods.items():
        scores = np.concatenate([trained.predictions[s.name] for s in result.dataset.silos])
        order = np.argsort(-scores, kind="stable")
        hits = np.cumsum(labels[order])
        precision = hits / np.arange(1, len(hits) + 1)
        recall = hits / max(int(labels.sum()), 1)
        axis.plot(recall, precision, label=method, color=COLOURS.get(method))
    axis.axhline(labels.mean(), color="grey", linestyle=":", label="base rate")
    axis.set(xlabel="recall", ylabel="precision", ylim=(0, 1.02))
    axis.legend()
    return Figure(
        "Precision–recall, all storefronts",
        svg_of(figure),
        "Every held-out row once, ranked by each method's score.",
    )


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
