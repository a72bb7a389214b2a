"""Metrics of fit prediction that add up across silos, so that only counts leave a silo.

Per silo the evaluation keeps the confusion matrix (true class × most probable class) and, for each
class k, histograms of P(k) over `BINS` equal bins, separately for records of class k and the rest.
From summed counts come accuracy, per-class recall and the one-vs-rest AUC of each class (the
Mann–Whitney statistic over the histograms: pairs in the same bin count one half), whose mean is
Misra et al.'s average AUC (`auc_macro`). Binning moves an AUC by at most the share of
positive–negative pairs that fall in one bin, below 1e-3 at 4096 bins in practice (tested against
the exact statistic).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedshop.data.renttherunway import FIT_CLASSES

BINS = 4096
CLASSES = len(FIT_CLASSES)
METRIC_NAMES = ("auc_macro", "accuracy", *(f"recall_{c}" for c in FIT_CLASSES))


@dataclass(frozen=True)
class FitCounts:
    confusion: np.ndarray  # (3, 3) int64: [true, predicted]
    histograms: np.ndarray  # (3, 2, BINS) int64: [class k, record is of class k, bin of P(k)]

    @staticmethod
    def empty() -> FitCounts:
        return FitCounts(
            np.zeros((CLASSES, CLASSES), np.int64), np.zeros((CLASSES, 2, BINS), np.int64)
        )

    @staticmethod
    def of(probabilities: np.ndarray, labels: np.ndarray) -> FitCounts:
        probabilities = np.asarray(probabilities, dtype=np.float64)
        labels = np.asarray(labels, dtype=np.int64)
        confusion = np.zeros((CLASSES, CLASSES), np.int64)
        if len(labels):
            np.add.at(confusion, (labels, probabilities.argmax(1)), 1)
        bins = np.clip((probabilities * BINS).astype(np.int64), 0, BINS - 1)
        histograms = np.zeros((CLASSES, 2, BINS), np.int64)
        for k in range(CLASSES):
            positive = labels == k
            histograms[k, 1] = np.bincount(bins[positive, k], minlength=BINS)
            histograms[k, 0] = np.bincount(bins[~positive, k], minlength=BINS)
        return FitCounts(confusion, histograms)

    def __add__(self, other: FitCounts) -> FitCounts:
        return FitCounts(self.confusion + other.confusion, self.histograms + other.histograms)

    @property
    def records(self) -> int:
        return int(self.confusion.sum())

    def class_auc(self, k: int) -> float:
        negative, positive = self.histograms[k, 0], self.histograms[k, 1]
        n_pos, n_neg = positive.sum(), negative.sum()
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        below = np.cumsum(negative) - negative  # negatives in lower bins
        wins = (positive * (below + 0.5 * negative)).sum()
        return float(wins / (n_pos * n_neg))

    def means(self) -> dict[str, float | int]:
        n = self.records
        aucs = [self.class_auc(k) for k in range(CLASSES)]
        defined = [a for a in aucs if not np.isnan(a)]
        out: dict[str, float | int] = {
            "auc_macro": float(np.mean(defined)) if defined else float("nan"),
            "accuracy": float(np.trace(self.confusion) / n) if n else float("nan"),
        }
        for k, name in enumerate(FIT_CLASSES):
            row = self.confusion[k].sum()
            out[f"recall_{name}"] = float(self.confusion[k, k] / row) if row else float("nan")
        for k, name in enumerate(FIT_CLASSES):
            out[f"auc_{name}"] = aucs[k]
        out["records"] = n
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        """For a message (what a deployed silo sends back)."""
        return {"confusion": self.confusion, "histograms": self.histograms}


def summarise_fit(per_silo: dict[str, FitCounts]) -> dict[str, float | int]:
    """Overall metrics (every record counts once) and unweighted means over silos (`silo_mean_*`),
    so a small shop counts as much as a large one; silos without a held-out record are skipped."""
    total = FitCounts.empty()
    for counts in per_silo.values():
        total = total + counts
    out = total.means()
    evaluated = [c.means() for c in per_silo.values() if c.records]
    for name in METRIC_NAMES:
        values = [float(m[name]) for m in evaluated if not np.isnan(m[name])]
        out[f"silo_mean_{name}"] = float(np.mean(values)) if values else float("nan")
    out["silos_evaluated"] = len(evaluated)
    out["confusion"] = total.confusion.tolist()
    return out
