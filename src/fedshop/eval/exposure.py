"""Exposure of promoted items: how far an attack pushed its targets into genuine shoppers' lists.

ER@K (FedRecAttack, Rong et al. 2022; A-hum): the share of genuine shoppers who have at least one
target item among their top K of the full catalogue, their own training items excluded. A shopper
who already bought every target cannot be shown one and is not counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from fedshop.eval.metrics import topk_excluding


@dataclass(frozen=True)
class Exposure:
    exposed: int  # shoppers with a target in their top K
    shoppers: int  # shoppers who could be shown one

    def __add__(self, other: Exposure) -> Exposure:
        return Exposure(self.exposed + other.exposed, self.shoppers + other.shoppers)

    @property
    def rate(self) -> float:
        return self.exposed / self.shoppers if self.shoppers else float("nan")


def exposure(
    score_rows: Callable[[np.ndarray], torch.Tensor],
    train: sp.csr_matrix,
    targets: np.ndarray,
    k: int = 10,
    batch_size: int = 2048,
) -> Exposure:
    """ER@k over the rows of `train` (one shopper each) for the items `targets`."""
    targets = np.asarray(targets, dtype=np.int64)
    bought = np.asarray(train[:, targets].sum(axis=1)).ravel() if len(targets) else None
    rows = np.arange(train.shape[0]) if bought is None else np.flatnonzero(bought < len(targets))
    exposed = 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        with torch.no_grad():
            top = topk_excluding(score_rows(batch), train[batch], k)
        exposed += int(np.isin(top, targets).any(axis=1).sum())
    return Exposure(exposed, len(rows))
