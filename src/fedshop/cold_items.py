"""New products with no history: how well each method ranks items it never saw bought.

With [eval] cold_items = f, `prepare` holds a random share f of the catalogue out of training for
every method (data/cold_items.py); after training, `evaluate_cold_items` scores, for every shopper
who interacted with a held-out product and has training items left, the held-out products
(a) among all held-out products and (b) among the whole catalogue (the shopper's training items
excluded), with HR@10 / NDCG@10 / Recall@20 (eval/metrics.py). Methods:

- federated / centralized: the run's model with item features (models/features.py); a held-out
  product's id embedding and bias are zero, so only its features place it.
- feature popularity: FEATURE_POPULARITY_RULE.
- random: RANDOM_RULE.

`run(dataset, seed, ...)` trains and evaluates in one call (for benchmarks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from fedshop.config import Environment, RunConfig
from fedshop.data.cold_items import ColdItems, hold_out_items
from fedshop.data.interactions import RecDataset
from fedshop.data.partition import slug
from fedshop.eval.metrics import MetricSums, evaluate, summarise
from fedshop.models.spec import ModelSpec, Params, get_model, score_all
from fedshop.seeding import torch_generator

FEATURE_POPULARITY_RULE = (
    "a held-out product scores the mean, over its features, of the mean training popularity "
    "(distinct training buyers) of the catalogue items that have that feature (a feature no "
    "training item has counts 0; a product without features scores 0); a training item scores "
    "its own popularity"
)
RANDOM_RULE = "uniform random scores, drawn from a generator seeded by the run seed"
EXCLUDED_USERS = "shoppers with no training item left (nothing to personalise from) are not scored"

Scorer = Callable[[np.ndarray], torch.Tensor]  # global user indices -> (len, full catalogue)


def prepare(
    config: RunConfig, dataset: RecDataset, env: Environment | None = None
) -> tuple[RecDataset, ColdItems | None]:
    """Before any training: the item features the model reads (counts in the data report), and
    with [eval] cold_items the dataset without the held-out products, and those products."""
    spec = get_model(config.model.name)
    if spec.needs_item_features and dataset.item_features is None:
        from fedshop.data.item_features import load_item_features

        features = load_item_features(dataset, config.data, env)
        dataset = replace(
            dataset,
            item_features=features.matrix,
            report={**dataset.report, "item_features": features.report()},
        )
    if not config.eval.cold_items:
        return dataset, None
    return hold_out_items(dataset, config.eval.cold_items, config.seed)


def feature_popularity(features: sp.csr_matrix, warm: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Scores of the whole catalogue (rows of `features`) by FEATURE_POPULARITY_RULE; `warm` are the
    training items (rows of `features`) and `counts` their training popularity."""
    binary = (sp.csr_matrix(features) > 0).astype(np.float64).tocsr()
    counts = np.asarray(counts, dtype=np.float64)
    on_warm = binary[warm]
    items_with = np.asarray(on_warm.sum(axis=0)).ravel()
    total = on_warm.T @ counts
    per_feature = np.divide(total, items_with, out=np.zeros_like(total), where=items_with > 0)
    n_features = np.asarray(binary.sum(axis=1)).ravel()
    scores = np.divide(
        binary @ per_feature, n_features, out=np.zeros(binary.shape[0]), where=n_features > 0
    )
    scores[warm] = counts
    return scores


def full_catalogue_model(spec: ModelSpec, shared: Params, cold: ColdItems) -> Params:
    """The trained shared model over the full catalogue: held-out products get zero id rows and
    their own (public) feature ids, so only the feature tower places them."""
    if spec.item_inputs is None or cold.features is None:
        raise ValueError(f"model {spec.name} has no item features to place new products with")
    inputs = spec.item_inputs(cold.features)
    warm = torch.from_numpy(cold.warm)
    full = dict(spec.dense_of(shared))
    for name in spec.item_tables:
        if name in inputs:
            full[name] = inputs[name]
        else:
            table = shared[name].detach().cpu()
            out = torch.zeros(cold.n_catalogue, *table.shape[1:], dtype=table.dtype)
            out[warm] = table
            full[name] = out
    return full


def model_scorer(
    spec: ModelSpec,
    shared: Params,
    users: Params,
    silo_bias: torch.Tensor | None,
    user_silo: torch.Tensor,
    cold: ColdItems,
) -> Scorer:
    """Scores of global users against the full catalogue; `users` are every shopper's private rows,
    `silo_bias` the storefronts' offsets over the training catalogue (zero for held-out items)."""
    full = full_catalogue_model(spec, shared, cold)
    private = dict(users)
    if silo_bias is not None:
        offsets = torch.zeros(silo_bias.shape[0], cold.n_catalogue)
        offsets[:, torch.from_numpy(cold.warm)] = silo_bias.detach().cpu()
        private["silo_item_bias"] = offsets
    return lambda rows: score_all(spec, full, private, torch.from_numpy(rows), user_silo)


def federated_tables(
    spec: ModelSpec, weights: dict[str, dict[str, torch.Tensor]], dataset: RecDataset
) -> tuple[Params, torch.Tensor | None]:
    """Every shopper's private rows and every storefront's offsets, from the federated run's
    per-storefront files (in a deployment they never meet: this is the evaluation's view)."""
    users: Params = {}
    offsets = []
    for name in dataset.silo_names:
        state = weights[f"federated/silo-{slug(name)}"]
        index = state["users"].long()
        for table in spec.user_tables:
            if table not in users:
                users[table] = torch.zeros(dataset.n_users, state[table].shape[1])
            users[table][index] = state[table].detach().cpu()
        if "silo_item_bias" in state:
            offsets.append(state["silo_item_bias"].detach().cpu().reshape(1, -1))
    return users, (torch.cat(offsets) if len(offsets) == dataset.n_silos else None)


def evaluate_cold_items(
    config: RunConfig,
    dataset: RecDataset,
    cold: ColdItems,
    weights: dict[str, dict[str, torch.Tensor]],
) -> dict[str, Any]:
    """metrics.json "cold_items": every method's metrics on the held-out products (`dataset` is
    the training dataset, without them; `weights` the trained methods' run-folder tensors)."""
    spec = get_model(config.model.name)
    user_silo = torch.from_numpy(dataset.user_silo.copy())
    scorers: dict[str, Scorer] = {}
    if "federated/shared" in weights:
        users, offsets = federated_tables(spec, weights, dataset)
        scorers["federated"] = model_scorer(
            spec, weights["federated/shared"], users, offsets, user_silo, cold
        )
    if "centralized" in weights:
        state = weights["centralized"]
        private = {name: state[name] for name in spec.user_tables}
        shared = {
            k: v for k, v in state.items()
            if k not in spec.user_tables and k not in ("silo_item_bias", "user_silo")
        }  # fmt: skip
        scorers["centralized"] = model_scorer(
            spec, shared, private, state.get("silo_item_bias"), user_silo, cold
        )
    counts = np.asarray(dataset.train.sum(axis=0), dtype=np.float64).ravel()
    popularity = torch.from_numpy(feature_popularity(cold.features, cold.warm, counts)).float()
    scorers["feature popularity"] = lambda rows: popularity.expand(len(rows), -1)
    generator = torch_generator(config.seed, "cold-items", "random")
    scorers["random"] = lambda rows: torch.rand(len(rows), cold.n_catalogue, generator=generator)

    has_train = np.diff(dataset.train.indptr) > 0
    relevant = sp.diags(has_train.astype(np.float32)) @ cold.relevant
    relevant = sp.csr_matrix(relevant)
    relevant.eliminate_zeros()
    n_users = dataset.n_users
    # The full catalogue in its original order: held-out products at cold.items.
    relevant_full = _columns(relevant, cold.items, cold.n_catalogue)
    train_full = _columns(dataset.train, cold.warm, cold.n_catalogue)
    nothing = sp.csr_matrix((n_users, cold.n_items), dtype=np.float32)
    cold_columns = torch.from_numpy(cold.items)
    methods: dict[str, Any] = {}
    for method, scorer in scorers.items():
        among_cold: dict[str, MetricSums] = {}
        among_all: dict[str, MetricSums] = {}
        for index, name in enumerate(dataset.silo_names):
            members = np.flatnonzero(dataset.user_silo == index)
            among_cold[name] = evaluate(
                lambda rows, m=members, s=scorer: s(m[rows])[:, cold_columns],
                nothing[members], relevant[members],
            )  # fmt: skip
            among_all[name] = evaluate(
                lambda rows, m=members, s=scorer: s(m[rows]),
                train_full[members],
                relevant_full[members],
            )
        methods[method] = {**summarise(among_cold), "among_all": summarise(among_all)}
    return {
        "rule": dataset.report.get("cold_items", {}).get("rule", ""),
        "fraction": config.eval.cold_items,
        "held_out_items": cold.n_items,
        "catalogue_items": cold.n_catalogue,
        "model": config.model.name,
        "ranking": "among_cold: the held-out products only; among_all: the whole catalogue, the "
        "shopper's training items excluded; " + EXCLUDED_USERS,
        "feature_popularity_rule": FEATURE_POPULARITY_RULE,
        "random_rule": RANDOM_RULE,
        "methods": methods,
    }


def _columns(matrix: sp.csr_matrix, positions: np.ndarray, width: int) -> sp.csr_matrix:
    """`matrix`'s columns placed at `positions` of a wider matrix."""
    coo = sp.coo_matrix(matrix)
    out = sp.csr_matrix((coo.data, (coo.row, positions[coo.col])), shape=(matrix.shape[0], width))
    out.sort_indices()
    return out
