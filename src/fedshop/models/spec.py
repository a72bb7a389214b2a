"""What the training loops need to know about a model, whatever its family.

A model's parameters fall into three groups, and the groups decide what travels:
- item tables: shared, one row per item (embeddings, biases). A client that touched a few items only
  changes those rows, so updates can be sent and aggregated sparsely.
- dense weights: shared, not tied to any row (the NCF layers). Every client changes all of them.
- user tables: private, one row per user. They never leave the client (silo or device).

`pair_scores(users, items, dense)` scores gathered rows and broadcasts over leading dimensions, so one
function serves single pairs, a batch with several negatives per positive, a whole catalogue, and the
cross-device simulator's stack of clients (there, dense weights carry a leading client dimension:
matrices (C, in, out), vectors (C, 1, n); see `stack_dense`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import scipy.sparse as sp
import torch

from fedshop.choices import MODELS
from fedshop.config import ModelConfig
from fedshop.errors import FedShopError

Params = dict[str, torch.Tensor]
PairScores = Callable[[Params, Params, Params], torch.Tensor]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    item_tables: tuple[str, ...]
    user_tables: tuple[str, ...]
    init_shared: Callable[[int, ModelConfig, torch.Generator], Params]
    init_users: Callable[[int, ModelConfig, torch.Generator], Params]
    pair_scores: PairScores
    # Optional fast path for users × whole catalogue (a matrix product instead of broadcasting).
    catalogue_scores: PairScores | None = None
    # Models that read public item features (data/item_features.py), given the items × features
    # matrix: `item_inputs` builds fixed item tables (each item's feature ids; never trained, so
    # their updates are zero) and `init_features` the shared weights of the features. See
    # models/features.py and `init_model`.
    item_inputs: Callable[[sp.csr_matrix], Params] | None = None
    init_features: Callable[[sp.csr_matrix, ModelConfig, torch.Generator], Params] | None = None

    @property
    def needs_item_features(self) -> bool:
        return self.item_inputs is not None

    def init_model(
        self,
        n_items: int,
        config: ModelConfig,
        generator: torch.Generator,
        item_features: sp.csr_matrix | None = None,
    ) -> Params:
        """`init_shared`, plus the item-feature tables and weights for models that read them."""
        shared = self.init_shared(n_items, config, generator)
        if self.item_inputs is None or self.init_features is None:
            return shared
        if item_features is None:
            raise FedShopError(
                f"model {self.name} needs item features and the dataset has none loaded"
            )
        if item_features.shape[0] != n_items:
            raise ValueError(f"item features for {item_features.shape[0]} items, not {n_items}")
        shared.update(self.item_inputs(item_features))
        shared.update(self.init_features(item_features, config, generator))
        return shared

    def dense_of(self, shared: Params) -> Params:
        """The shared weights that are not item tables (their names depend on the configuration)."""
        return {name: value for name, value in shared.items() if name not in self.item_tables}

    def init_private(
        self,
        n_users: int,
        n_items: int,
        config: ModelConfig,
        generator: torch.Generator,
        n_silos: int = 1,
    ) -> Params:
        """User tables for `n_users`, plus the per-silo item-bias offsets when configured."""
        private = self.init_users(n_users, config, generator)
        if config.silo_item_bias:
            private["silo_item_bias"] = torch.zeros(n_silos, n_items)
        return private


def gather_rows(tables: Params, names: tuple[str, ...], index: torch.Tensor) -> Params:
    return {name: tables[name][index] for name in names}


def stack_dense(dense: Params, copies: int) -> Params:
    """Per-client copies of dense weights in the layout `pair_scores` broadcasts over clients."""
    out = {}
    for name, value in dense.items():
        shaped = value.unsqueeze(0) if value.dim() >= 2 else value.reshape(1, 1, -1)
        out[name] = shaped.expand(copies, *shaped.shape[1:]).clone()
    return out


# Chunk catalogue scoring so that broadcast intermediates stay around this many floats.
_SCORE_CHUNK_FLOATS = 1 << 24


def score_all(
    spec: ModelSpec,
    shared: Params,
    private: Params,
    users: torch.Tensor,
    user_silo: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores of `users` (indices into the private tables) against the whole catalogue."""
    dense = spec.dense_of(shared)
    items = {name: shared[name] for name in spec.item_tables}
    n_items = shared[spec.item_tables[0]].shape[0]
    if spec.catalogue_scores is not None:
        scores = spec.catalogue_scores(gather_rows(private, spec.user_tables, users), items, dense)
    else:
        width = max([value.shape[-1] for value in shared.values() if value.dim() == 2] + [1])
        chunk = max(1, _SCORE_CHUNK_FLOATS // (n_items * width))
        catalogue = {name: value.unsqueeze(0) for name, value in items.items()}
        parts = []
        for start in range(0, len(users), chunk):
            rows = gather_rows(private, spec.user_tables, users[start : start + chunk])
            parts.append(
                spec.pair_scores({k: v.unsqueeze(1) for k, v in rows.items()}, catalogue, dense)
            )
        scores = torch.cat(parts) if parts else torch.empty(0, n_items)
    if "silo_item_bias" in private:
        silos = torch.zeros_like(users) if user_silo is None else user_silo[users]
        scores = scores + private["silo_item_bias"][silos]
    return scores


def get_model(name: str) -> ModelSpec:
    return MODELS.get(name)
