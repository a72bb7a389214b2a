"""Top-K metrics for implicit feedback, under two protocols.

- full (the default): every catalogue item is ranked; the user's own training items are excluded.
- sampled-100 (NCF, He et al. 2017, and most federated-recsys papers): the held-out items are ranked
  against 100 items the user never interacted with, drawn once per user with a fixed seed so that every
  method sees the same candidates. Much easier than full ranking; the numbers are not comparable.

In both protocols, with T the user's held-out items and hits@k the held-out items among the top k:
- HR@10      = 1 if hits@10 > 0 else 0
- NDCG@10    = sum over hit ranks r (1-based) of 1/log2(r+1), divided by the same sum for an ideal
               ranking that puts min(|T|, 10) held-out items first
- Recall@20  = hits@20 / |T|
Only users with a non-empty held-out basket are evaluated; the count is always reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

METRIC_NAMES = ("hr@10", "ndcg@10", "recall@20")
MAX_K = 20


@dataclass(frozen=True)
class MetricSums:
    """Sums of per-user metrics and the number of users: adds across silos, then averages."""

    sums: dict[str, float]
    users: int

    @staticmethod
    def empty() -> MetricSums:
        return MetricSums({name: 0.0 for name in METRIC_NAMES}, 0)

    def __add__(self, other: MetricSums) -> MetricSums:
        return MetricSums(
            {k: self.sums[k] + other.sums[k] for k in METRIC_NAMES}, self.users + other.users
        )

    def means(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {
            k: (self.sums[k] / self.users if self.users else float("nan")) for k in METRIC_NAMES
        }
        out["users"] = self.users
        return out


def topk_excluding(scores: torch.Tensor, exclude: sp.csr_matrix, k: int) -> np.ndarray:
    """Indices of the k best items per row, never returning an item marked in `exclude`."""
    scores = scores.clone()
    coo = exclude.tocoo()
    scores[
        torch.from_numpy(coo.row.astype(np.int64)), torch.from_numpy(coo.col.astype(np.int64))
    ] = -torch.inf
    k = min(k, scores.shape[1])
    return torch.topk(scores, k, dim=1).indices.numpy()


def candidates(heldout: sp.csr_matrix, negatives: np.ndarray) -> sp.csr_matrix:
    """Rows of candidate items: each user's held-out items plus their sampled negatives."""
    rows, cols = np.nonzero(negatives >= 0)
    sampled = sp.csr_matrix(
        (np.ones(len(rows), np.float32), (rows, negatives[rows, cols])), shape=heldout.shape
    )
    return ((heldout + sampled) > 0).astype(np.float32).tocsr()


def topk_among(scores: torch.Tensor, allowed: sp.csr_matrix, k: int) -> np.ndarray:
    """Indices of the k best items per row among the items marked in `allowed`."""
    masked = torch.full_like(scores, -torch.inf)
    coo = allowed.tocoo()
    r = torch.from_numpy(coo.row.astype(np.int64))
    c = torch.from_numpy(coo.col.astype(np.int64))
    masked[r, c] = scores[r, c]
    k = min(k, scores.shape[1])
    return torch.topk(masked, k, dim=1).indices.numpy()


def per_user_metrics(top: np.ndarray, relevant: sp.csr_matrix) -> dict[str, np.ndarray]:
    """Metrics for each row of `top` (ranked item indices) against the rows of `relevant`."""
    hits = np.take_along_axis(relevant.toarray() > 0, top, axis=1)
    n_relevant = np.diff(relevant.indptr).astype(np.float64)
    discounts = 1.0 / np.log2(np.arange(2, top.shape[1] + 2))
    dcg = (hits[:, :10] * discounts[: min(10, top.shape[1])]).sum(1)
    ideal_cut = np.minimum(n_relevant, 10).astype(np.int64)
    idcg = np.concatenate([[0.0], np.cumsum(discounts[:10])])[ideal_cut]
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "hr@10": hits[:, :10].any(1).astype(np.float64),
            "ndcg@10": np.where(idcg > 0, dcg / idcg, 0.0),
            "recall@20": np.where(n_relevant > 0, hits[:, :MAX_K].sum(1) / n_relevant, 0.0),
        }


def evaluate(
    score_rows: Callable[[np.ndarray], torch.Tensor],
    train: sp.csr_matrix,
    heldout: sp.csr_matrix,
    batch_size: int = 2048,
    negatives: np.ndarray | None = None,
) -> MetricSums:
    """Evaluate the users (rows) of `heldout` that have held-out items.

    `score_rows(rows)` returns the (len(rows) × items) score matrix for those rows. With `negatives`
    (rows × n item indices, -1 padding) only the held-out items and those negatives are ranked.
    """
    rows = np.flatnonzero(np.diff(heldout.indptr) > 0)
    sums = {name: 0.0 for name in METRIC_NAMES}
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        with torch.no_grad():
            scores = score_rows(batch)
            if negatives is None:
                top = topk_excluding(scores, train[batch], MAX_K)
            else:
                top = topk_among(scores, candidates(heldout[batch], negatives[batch]), MAX_K)
        for name, values in per_user_metrics(top, heldout[batch]).items():
            sums[name] += float(values.sum())
    return MetricSums(sums, len(rows))


def summarise(per_silo: dict[str, MetricSums]) -> dict[str, float | int]:
    """Overall means (every evaluated customer counts once) plus unweighted means over silos, so a
    small storefront counts as much as a large one. Silos with no evaluated customer are skipped."""
    total = MetricSums.empty()
    for sums in per_silo.values():
        total = total + sums
    out = total.means()
    evaluated = [sums.means() for sums in per_silo.values() if sums.users]
    for name in METRIC_NAMES:
        values = [float(m[name]) for m in evaluated]
        out[f"silo_mean_{name}"] = float(np.mean(values)) if values else float("nan")
    out["silos_evaluated"] = len(evaluated)
    return out
