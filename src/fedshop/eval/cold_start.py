"""Cold-start metrics: new shoppers (held out of training) ranked from their first-day basket.

Each method scores the whole catalogue for each new shopper; the basket's items are excluded from the
ranking (full ranking, whatever [eval] protocol says) and the target is their next purchase day. The
metrics are the run's (HR@10, NDCG@10, Recall@20), per storefront and overall.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import torch

from fedshop.data.cold_start import RULE
from fedshop.data.interactions import ColdCohort
from fedshop.eval.metrics import METRIC_NAMES, MetricSums, evaluate, summarise

# What each method gives a new shopper (metrics.json "cold_start" "methods").
METHODS = {
    "fold_in": "a user vector folded in from the basket against the frozen federated model "
    "(fedshop.models.fold_in: plain gradient descent from 0 on the basket's mean log-softmax over "
    "the catalogue; the storefront's private item offsets added where the model has them)",
    "popularity": "items ranked by how many training customers bought them",
    "trained": "the same shoppers' vectors trained on the same baskets the way a silo trains its "
    "customers' vectors (BPR, [train] settings, shared model and storefront offsets frozen): what a "
    "trained vector gives, for reference",
}


def evaluate_cohort(
    scores: torch.Tensor, cohort: ColdCohort, silo_names: tuple[str, ...]
) -> dict[str, MetricSums]:
    """Per storefront, the metrics of `scores` (cohort rows × catalogue) on the cohort's targets."""
    out = {}
    for index, name in enumerate(silo_names):
        rows = cohort.rows_of_silo(index)
        silo_scores = scores[torch.from_numpy(rows)]
        out[name] = evaluate(
            lambda batch, s=silo_scores: s[torch.from_numpy(batch)],
            cohort.basket[rows],
            cohort.target[rows],
        )
    return out


@dataclass(frozen=True)
class ColdStartResult:
    """The cold-start evaluation of a run: per method, per storefront metric sums."""

    methods: dict[str, dict[str, MetricSums]]  # method -> storefront -> sums
    fold_in_ms: list[float]  # milliseconds of each fold-in
    settings: dict[str, float | int]  # the fold-in's steps, lr, l2
    trained_epochs: int
    held_out: int  # customers held out of training (evaluated or not)

    def block(self) -> dict[str, Any]:
        """metrics.json "cold_start"."""
        summaries = {method: summarise(sums) for method, sums in self.methods.items()}
        silos = next(iter(self.methods.values()), {})
        return {
            "customers": summaries["fold_in"]["users"],
            "held_out": self.held_out,
            "rule": RULE,
            "methods": {method: METHODS[method] for method in self.methods},
            **summaries,
            "ratios": {
                f"fold_in/{other}": {
                    name: ratio(summaries["fold_in"][name], summaries[other][name])
                    for name in METRIC_NAMES
                }
                for other in self.methods
                if other != "fold_in"
            },
            "fold_in_ms_median": statistics.median(self.fold_in_ms) if self.fold_in_ms else None,
            "settings": dict(self.settings),
            "trained_epochs": self.trained_epochs,
            "per_silo": {
                silo: {method: sums[silo].means() for method, sums in self.methods.items()}
                for silo in silos
            },
        }


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, or None where it means nothing (no denominator)."""
    return numerator / denominator if denominator else None
