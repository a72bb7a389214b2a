"""What a silo reports of a table model on its held-out rows, and summaries over silos.

A silo's report is counts, never its rows: for a classifier, how many of its positive and negative
rows scored in each of `BINS` equal bins of probability (enough for AUC, AUC-PR and recall at a
false-positive rate, over one silo or summed over all); for a forecaster, its sums of absolute error
and of actual demand (WAPE). The run's final tables are computed by each silo on its exact scores
(`binary_metrics`) and by the demand task's own metrics (eval/forecast.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedshop.eval.auc import average_precision, recall_at_fpr, roc_auc

BINS = 1000
FALSE_POSITIVE_RATE = 0.01  # recall is reported at this false-positive rate


def binary_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float | int]:
    """Exact metrics of one silo's (or the pooled) scores."""
    positive = np.asarray(labels) > 0.5
    return {
        "auc_pr": average_precision(scores, positive),
        "auc": roc_auc(scores, positive),
        "recall@fpr": recall_at_fpr(scores, positive, FALSE_POSITIVE_RATE),
        "positives": int(positive.sum()),
        "rows": len(positive),
    }


@dataclass
class BinaryCounts:
    """Per bin of predicted probability: negatives (row 0) and positives (row 1)."""

    histogram: np.ndarray  # (2, BINS) int64

    @staticmethod
    def of(scores: np.ndarray, labels: np.ndarray) -> BinaryCounts:
        bins = np.clip((np.asarray(scores, np.float64) * BINS).astype(np.int64), 0, BINS - 1)
        positive = np.asarray(labels) > 0.5
        histogram = np.stack(
            [
                np.bincount(bins[~positive], minlength=BINS),
                np.bincount(bins[positive], minlength=BINS),
            ]
        )
        return BinaryCounts(histogram.astype(np.int64))

    def __add__(self, other: BinaryCounts) -> BinaryCounts:
        return BinaryCounts(self.histogram + other.histogram)

    def metrics(self) -> dict[str, float | int]:
        """Each bin's midpoint as every row's score in it: binned AUC-PR and AUC."""
        midpoints = (np.arange(BINS) + 0.5) / BINS
        negatives, positives = self.histogram
        scores = np.repeat(np.r_[midpoints, midpoints], np.r_[negatives, positives])
        labels = np.repeat([0, 1], [negatives.sum(), positives.sum()])
        return binary_metrics(scores, labels)


@dataclass
class ForecastSums:
    """Sums over a silo's held-out series-weeks of |actual − median forecast| and of actual."""

    absolute_error: float
    actual: float

    def __add__(self, other: ForecastSums) -> ForecastSums:
        return ForecastSums(self.absolute_error + other.absolute_error, self.actual + other.actual)

    def metrics(self) -> dict[str, float]:
        wape = self.absolute_error / self.actual if self.actual > 0 else float("nan")
        return {"wape": wape}


def summarise_counts(per_silo: dict) -> dict[str, float | int]:
    """Pooled metrics (every row once) and unweighted means over silos (`silo_mean_*`), so that a
    small storefront counts as much as a large one; a metric a silo cannot have (no positive) is
    left out of the mean."""
    parts = list(per_silo.values())
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    out = dict(total.metrics())
    per = [p.metrics() for p in parts]
    for name, value in list(out.items()):
        if isinstance(value, float):
            values = [m[name] for m in per if not np.isnan(m[name])]
            out[f"silo_mean_{name}"] = float(np.mean(values)) if values else float("nan")
    return out
