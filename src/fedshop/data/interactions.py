"""Implicit-feedback interactions as sparse user × item matrices, partitioned into silos."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import scipy.sparse as sp

from fedshop.data.sequences import UserSequences
from fedshop.data.split import SplitPairs
from fedshop.seeding import derive_seed


@dataclass(frozen=True)
class SiloData:
    """What one silo holds: its own customers' interactions, indexed by local user number."""

    name: str
    users: np.ndarray  # global user indices of this silo's customers
    train: sp.csr_matrix  # local users × all items
    test: sp.csr_matrix
    validation: sp.csr_matrix | None
    # Sampled-negative evaluation: per local user the items to rank the held-out ones against (-1 pads)
    eval_negatives: np.ndarray | None = None

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_train(self) -> int:
        return int(self.train.nnz)

    def heldout(self, split: str) -> sp.csr_matrix:
        matrix = self.test if split == "test" else self.validation
        if matrix is None:
            raise ValueError(f"silo {self.name} has no {split} split")
        return matrix


@dataclass(frozen=True)
class ColdCohort:
    """New shoppers: customers held out of training entirely, for the cold-start evaluation.

    Rows are the customers that can be evaluated (a non-empty basket and target on the training
    catalogue); `held_out_ids` lists every customer kept out of training, evaluated or not."""

    customer_ids: np.ndarray  # external customer id per row
    silo: np.ndarray  # silo index per row (the storefront they shop at)
    basket: sp.csr_matrix  # rows × items: their first purchase day
    target: sp.csr_matrix  # rows × items: their next purchase day, basket items removed
    held_out_ids: np.ndarray

    @property
    def n_customers(self) -> int:
        return len(self.customer_ids)

    def rows_of_silo(self, index: int) -> np.ndarray:
        return np.flatnonzero(self.silo == index)


@dataclass(frozen=True)
class RecDataset:
    """A recommendation dataset: who bought what in training, the held-out baskets, and the silos."""

    name: str
    user_ids: np.ndarray  # external customer id per user index
    item_ids: np.ndarray  # external item id per item index (the catalogue = items seen in training)
    item_names: np.ndarray
    silo_names: tuple[str, ...]
    user_silo: np.ndarray  # silo index per user
    train: sp.csr_matrix  # users × items, 1.0 where bought in training
    test: sp.csr_matrix
    validation: sp.csr_matrix | None
    report: dict = field(default_factory=dict)
    # Set by `with_eval_negatives` for the sampled-negative protocol: users × negatives, -1 pads.
    eval_negatives: np.ndarray | None = None
    # The NCF protocol: the published negatives are for the test item only; the validation item is
    # ranked against these (drawn by us, same layout) so that tuning never reads the test files.
    validation_negatives: np.ndarray | None = None
    # Typical unit price per item (NaN where unknown); None for datasets without prices.
    item_prices: np.ndarray | None = None
    # [eval] cold_start: the new shoppers held out of every matrix above (None: none held out).
    cold: ColdCohort | None = None
    # Public item features, items × features (data/item_features.py), for models that read them.
    item_features: sp.csr_matrix | None = None
    # Sequential datasets (Amazon): every user's items in time order (`data/sequences.py`), for
    # sequential models; the other models read only the matrices above.
    sequences: UserSequences | None = None

    @property
    def n_users(self) -> int:
        return self.train.shape[0]

    @property
    def n_items(self) -> int:
        return self.train.shape[1]

    @property
    def n_silos(self) -> int:
        return len(self.silo_names)

    def silo(self, index: int) -> SiloData:
        users = np.flatnonzero(self.user_silo == index)
        return SiloData(
            name=self.silo_names[index],
            users=users,
            train=self.train[users],
            test=self.test[users],
            validation=None if self.validation is None else self.validation[users],
            eval_negatives=None if self.eval_negatives is None else self.eval_negatives[users],
        )

    def silos(self) -> list[SiloData]:
        return [self.silo(i) for i in range(self.n_silos)]


def pairs_to_csr(pairs: pd.DataFrame, n_users: int, n_items: int) -> sp.csr_matrix:
    data = np.ones(len(pairs), dtype=np.float32)
    matrix = sp.csr_matrix(
        (data, (pairs["user"].to_numpy(), pairs["item"].to_numpy())), shape=(n_users, n_items)
    )
    matrix.sum_duplicates()
    matrix.sort_indices()
    return matrix


def build_dataset(
    name: str,
    split: SplitPairs,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    item_names: np.ndarray,
    silo_names: tuple[str, ...],
    user_silo: np.ndarray,
    report: dict,
    item_prices: np.ndarray | None = None,
    keep_all_items: bool = False,
) -> RecDataset:
    """Re-index items onto the training catalogue and assemble the sparse matrices.

    `split` uses user/item codes indexing `user_ids`/`item_ids` (and `item_prices`, when given);
    items never bought in training are dropped from the catalogue (the split has already removed
    them from the held-out baskets), unless `keep_all_items`: a published protocol that ranks every
    item of its own catalogue (NCF) keeps them, untrained, as its authors did.
    """
    trained = np.unique(split.train["item"].to_numpy())
    catalogue = np.arange(len(item_ids)) if keep_all_items else trained
    remap = np.full(len(item_ids), -1, dtype=np.int64)
    remap[catalogue] = np.arange(len(catalogue))

    def reindex(pairs: pd.DataFrame) -> pd.DataFrame:
        return pairs.assign(item=remap[pairs["item"].to_numpy()])

    n_users, n_items = len(user_ids), len(catalogue)
    return RecDataset(
        name=name,
        user_ids=np.asarray(user_ids),
        item_ids=np.asarray(item_ids)[catalogue],
        item_names=np.asarray(item_names)[catalogue],
        silo_names=silo_names,
        user_silo=np.asarray(user_silo, dtype=np.int64),
        train=pairs_to_csr(reindex(split.train), n_users, n_items),
        test=pairs_to_csr(reindex(split.test), n_users, n_items),
        validation=None
        if split.validation is None
        else pairs_to_csr(reindex(split.validation), n_users, n_items),
        report=report,
        item_prices=None
        if item_prices is None
        else np.asarray(item_prices, dtype=np.float64)[catalogue],
    )


def for_protocol(dataset: RecDataset, protocol: str, split: str, seed: int) -> RecDataset:
    """The dataset with the negatives its evaluation protocol ranks against on `split`.

    full: none. sampled-100: 100 drawn per user. ncf: the loader attached the published test
    negatives and, for the validation split, negatives of our own drawing (see ncf_protocol)."""
    if protocol == "sampled-100":
        return with_eval_negatives(dataset, 100, seed)
    if protocol == "ncf" and split == "validation":
        return replace(dataset, eval_negatives=dataset.validation_negatives)
    return dataset


def with_eval_negatives(dataset: RecDataset, count: int, seed: int) -> RecDataset:
    """The dataset with `count` sampled negatives for each user who has a held-out item, drawn from
    the items the user never interacted with in any split (train, validation or test)."""
    interacted = dataset.train + dataset.test
    heldout = dataset.test
    if dataset.validation is not None:
        interacted = interacted + dataset.validation
        heldout = heldout + dataset.validation
    interacted = interacted.tocsr()
    interacted.sort_indices()
    users = np.flatnonzero(np.diff(heldout.tocsr().indptr) > 0)
    rng = np.random.default_rng(derive_seed(seed, "eval", "negatives"))
    negatives = np.full((dataset.n_users, count), -1, dtype=np.int64)
    negatives[users] = sample_negatives(interacted, users, count, rng)
    return replace(dataset, eval_negatives=negatives)


def sample_negatives(
    interacted: sp.csr_matrix, users: np.ndarray, count: int, rng: np.random.Generator
) -> np.ndarray:
    """For each of `users`, `count` distinct items outside that user's row of `interacted`.

    Users with fewer than `count` such items get them all and -1 padding.
    """
    n_items = interacted.shape[1]
    out = np.full((len(users), count), -1, dtype=np.int64)
    for position, user in enumerate(users):
        seen = interacted.indices[interacted.indptr[user] : interacted.indptr[user + 1]]
        # Oversample then filter: cheap when the user has seen a small part of the catalogue.
        draw = rng.choice(n_items, size=min(n_items, count + 2 * len(seen) + 16), replace=False)
        fresh = draw[~np.isin(draw, seen)]
        if len(fresh) < count:
            fresh = rng.permutation(np.setdiff1d(np.arange(n_items), seen))
        take = fresh[:count]
        out[position, : len(take)] = take
    return out
