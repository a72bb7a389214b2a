"""Exposure of promoted items: how far an item-promotion attack got (issue 21).

ER@K (exposure ratio) of a set of target items T: among the genuine shoppers who have at least one
target they did not already buy (a training item), the share whose full-catalogue top K (training
items excluded from the ranking, as for HR@10) holds at least one target they did not buy:

    ER@K = |{u : (top_K(u) ∩ T) \\ train(u) ≠ ∅}| / |{u : T \\ train(u) ≠ ∅}|

A target already bought is never ranked (it is excluded with the training items), so "not already
bought" only matters for the denominator: a shopper who bought every target cannot be exposed.
Fake shoppers are never among the rows scored here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from fedshop.eval.metrics import topk_excluding


@dataclass(frozen=True)
class Exposure:
    k: int
    exposed: int  # shoppers with a target in their top K
    shoppers: int  # shoppers with at least one target they did not buy

    @property
    def ratio(self) -> float:
        return self.exposed / self.shoppers if self.shoppers else float("nan")


def exposure(
    score_rows: Callable[[np.ndarray], torch.Tensor],
    train: sp.csr_matrix,
    targets: Sequence[int],
    k: int = 10,
    batch_size: int = 2048,
) -> Exposure:
    """ER@k over the rows of `train` (genuine shoppers) with at least one training item;
    `score_rows(rows)` returns their (len(rows) × items) full-catalogue scores."""
    targets = np.asarray(sorted(set(int(t) for t in targets)), dtype=np.int64)
    if len(targets) == 0:
        raise ValueError("exposure needs at least one target item")
    bought_targets = np.asarray((train[:, targets] > 0).sum(axis=1)).ravel()
    active = np.diff(train.indptr) > 0
    rows = np.flatnonzero(active & (bought_targets < len(targets)))
    is_target = np.zeros(train.shape[1], dtype=bool)
    is_target[targets] = True
    exposed = 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        with torch.no_grad():
            top = topk_excluding(score_rows(batch), train[batch], k)
        exposed += int(is_target[top].any(axis=1).sum())
    return Exposure(k, exposed, len(rows))
