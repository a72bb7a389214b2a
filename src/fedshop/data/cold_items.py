"""New products: a random share of the catalogue held out of training entirely ([eval] cold_items).

`hold_out_items` removes the held-out items' columns from every matrix a method trains or is
validated on (train, validation, test, the new-shopper cohort's baskets) and from the catalogue
itself (its ids, names, prices, features, sampled negatives), so no method can see them, not even
as a sampled negative. What it keeps aside: each shopper's interactions with them in any split
(their relevant set) and the full catalogue's features (public: a new product's features are known
when it is listed).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp

from fedshop.data.interactions import ColdCohort, RecDataset
from fedshop.seeding import derive_seed

RULE = (
    "a uniformly random {fraction:.0%} of the catalogue (seeded by the run seed) is removed from "
    "training, validation, test and the catalogue for every method; each shopper's interactions "
    "with those items in any split are their relevant set"
)


@dataclass(frozen=True)
class ColdItems:
    """The held-out products, by index into the full catalogue (before the hold-out)."""

    items: np.ndarray  # held-out item indices, sorted
    warm: np.ndarray  # kept item indices, sorted: warm item j of the training dataset is warm[j]
    relevant: sp.csr_matrix  # users × held-out items: 1.0 where the shopper interacted (any split)
    features: sp.csr_matrix | None  # full catalogue × features (None: the dataset has none)
    item_ids: np.ndarray  # external ids of the held-out items

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_catalogue(self) -> int:
        return len(self.items) + len(self.warm)


def draw_cold_items(n_items: int, fraction: float, seed: int) -> np.ndarray:
    """`round(fraction · n_items)` item indices (at least one), uniformly at random, seeded."""
    count = min(n_items - 1, max(1, round(fraction * n_items)))
    rng = np.random.default_rng(derive_seed(seed, "cold-items", "draw"))
    return np.sort(rng.choice(n_items, size=count, replace=False))


def hold_out_items(dataset: RecDataset, fraction: float, seed: int) -> tuple[RecDataset, ColdItems]:
    """The dataset without the drawn items (every method trains on it) and the held-out items."""
    items = draw_cold_items(dataset.n_items, fraction, seed)
    warm = np.setdiff1d(np.arange(dataset.n_items), items)
    everything = dataset.train + dataset.test
    if dataset.validation is not None:
        everything = everything + dataset.validation
    relevant = (sp.csr_matrix(everything)[:, items] > 0).astype(np.float32).tocsr()
    relevant.sort_indices()

    def kept(matrix: sp.csr_matrix | None) -> sp.csr_matrix | None:
        if matrix is None:
            return None
        out = sp.csr_matrix(matrix)[:, warm].tocsr()
        out.eliminate_zeros()
        out.sort_indices()
        return out

    negatives = None
    if dataset.eval_negatives is not None:  # re-indexed; held-out candidates become padding
        remap = np.full(dataset.n_items, -1, dtype=np.int64)
        remap[warm] = np.arange(len(warm))
        negatives = np.where(dataset.eval_negatives >= 0, remap[dataset.eval_negatives], -1)
    cohort = dataset.cold
    if cohort is not None:
        cohort = ColdCohort(
            cohort.customer_ids, cohort.silo, kept(cohort.basket), kept(cohort.target),
            cohort.held_out_ids,
        )  # fmt: skip
    interactions = int(relevant.nnz)
    report = {
        **dataset.report,
        "cold_items": {
            "rule": RULE.format(fraction=fraction),
            "fraction": fraction,
            "held_out_items": len(items),
            "catalogue_items_left": len(warm),
            "held_out_interactions": interactions,
            "held_out_train_interactions": int(dataset.train.nnz - kept(dataset.train).nnz),
            "shoppers_with_held_out_items": int((np.diff(relevant.indptr) > 0).sum()),
        },
    }
    warm_dataset = replace(
        dataset,
        item_ids=dataset.item_ids[warm],
        item_names=dataset.item_names[warm],
        train=kept(dataset.train),
        test=kept(dataset.test),
        validation=kept(dataset.validation),
        eval_negatives=negatives,
        item_prices=None if dataset.item_prices is None else dataset.item_prices[warm],
        cold=cohort,
        item_features=None if dataset.item_features is None else dataset.item_features[warm],
        report=report,
    )
    cold = ColdItems(items, warm, relevant, dataset.item_features, dataset.item_ids[items])
    return warm_dataset, cold
