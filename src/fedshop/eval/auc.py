"""ROC AUC without scikit-learn: the Mann–Whitney statistic, ties counted as one half."""

from __future__ import annotations

import numpy as np


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative) + ½ P(equal); NaN without both."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # Average rank within each run of equal scores (1-based).
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_auc(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, list[float]]:
    """Mean one-vs-rest AUC over the classes (columns of `probabilities`), and each class's AUC."""
    per_class = [roc_auc(probabilities[:, k], labels == k) for k in range(probabilities.shape[1])]
    return float(np.nanmean(per_class)), per_class


def _thresholds(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At each distinct score, highest first, the positives and negatives scoring at least it: a
    threshold admits a run of equal scores whole or not at all."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    sorted_scores, hits = np.asarray(scores, dtype=np.float64)[order], positive[order]
    last = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])
    return np.cumsum(hits)[last], np.cumsum(~hits)[last]


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the precision–recall curve as average precision: the mean, over the positives,
    of the precision at each one's score (a tie of scores counts as one threshold); NaN without a
    positive."""
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    if n_pos == 0:
        return float("nan")
    true_pos, false_pos = _thresholds(scores, positive)
    new_pos = np.diff(np.r_[0, true_pos])
    return float((new_pos * true_pos / (true_pos + false_pos)).sum() / n_pos)


def recall_at_fpr(scores: np.ndarray, positive: np.ndarray, fpr: float) -> float:
    """The share of positives flagged by the lowest threshold whose false-positive rate is at most
    `fpr` (a tie of scores is flagged together or not at all); NaN without both classes."""
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    true_pos, false_pos = _thresholds(scores, positive)
    allowed = false_pos <= fpr * n_neg
    return float(true_pos[allowed].max() / n_pos) if allowed.any() else 0.0
