"""The table network and its federation, shared by the demand, returns and fraud tasks.

The tables here are small and made in the test, with a rule planted in them, so that what the
training machinery must do (learn the rule, leave other storefronts' rows alone, sum the same under
secure aggregation) is checked on its own; each task's real table has its own test file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedshop.config import load_config
from fedshop.data.tabular import TabularDataset, TabularPart, TabularSilo
from fedshop.errors import ConfigError, DataError
from fedshop.eval.auc import average_precision, recall_at_fpr
from fedshop.eval.tabular_metrics import BinaryCounts, binary_metrics
from fedshop.fl.client import LocalTask
from fedshop.fl.tabular_silo import (
    TabularSiloClient,
    head_of,
    init_shared,
    shape_of,
    tabular_pipeline,
)
from fedshop.models.tabular import Head, pinball_loss
from fedshop.retail_experiment import run_retail_experiment, score_binary


def planted(n: int, rng: np.random.Generator, codes: tuple[int, int] = (1, 50)) -> TabularPart:
    """Label probability rises with the first numeric feature and for codes divisible by 7."""
    categorical = np.c_[rng.integers(*codes, n), rng.integers(1, 4, n)]
    numeric = rng.normal(size=(n, 3)).astype(np.float32)
    logit = 2 * numeric[:, 0] - 3 + 2 * (categorical[:, 0] % 7 == 0)
    target = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return TabularPart(categorical, numeric, target)


def planted_dataset(sizes=(3000, 800, 200, 100), seed: int = 0) -> TabularDataset:
    rng = np.random.default_rng(seed)
    silos = [
        TabularSilo(i, f"shop{i}", planted(n, rng), planted(max(n // 2, 200), rng))
        for i, n in enumerate(sizes)
    ]
    return TabularDataset("planted", "binary", silos, ["code", "kind"], [50, 4], ["x", "y", "z"])


def config(**overrides):
    return load_config(None, overrides={"task": "fraud", "federated.rounds": 5, **overrides})


def brute_average_precision(scores, positive) -> float:
    """Precision at every distinct threshold, weighted by the recall it adds."""
    total, previous_recall = 0.0, 0.0
    for threshold in sorted(set(scores), reverse=True):
        flagged = scores >= threshold
        recall = (flagged & positive).sum() / positive.sum()
        total += (recall - previous_recall) * (flagged & positive).sum() / flagged.sum()
        previous_recall = recall
    return total


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=2, max_size=40))
def test_average_precision_matches_its_definition_with_ties(rows):
    scores = np.array([s for s, _ in rows], dtype=float)
    positive = np.array([p for _, p in rows])
    if not positive.any():
        assert np.isnan(average_precision(scores, positive))
        return
    assert average_precision(scores, positive) == pytest.approx(
        brute_average_precision(scores, positive)
    )


def test_recall_at_fpr_by_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    positive = np.array([True, False, True, False, True, False])
    # One negative in three is a false-positive rate of 1/3: the threshold 0.7 flags two of three.
    assert recall_at_fpr(scores, positive, 1 / 3) == pytest.approx(2 / 3)
    assert recall_at_fpr(scores, positive, 0.0) == pytest.approx(1 / 3)
    assert recall_at_fpr(scores, positive, 1.0) == pytest.approx(1.0)


def test_binned_counts_agree_with_exact_metrics():
    rng = np.random.default_rng(3)
    labels = rng.random(5000) < 0.1
    scores = np.clip(0.3 * labels + rng.random(5000) * 0.7, 0, 1)
    exact = binary_metrics(scores, labels)
    binned = (
        BinaryCounts.of(scores[:2000], labels[:2000])
        + BinaryCounts.of(scores[2000:], labels[2000:])
    ).metrics()
    assert binned["auc"] == pytest.approx(exact["auc"], abs=2e-3)
    assert binned["auc_pr"] == pytest.approx(exact["auc_pr"], abs=1e-2)
    assert binned["positives"] == exact["positives"]


def test_pinball_loss_is_the_quantile_loss():
    predicted = torch.tensor([[[1.0, 2.0]]])
    target = torch.tensor([[3.0]])
    levels = torch.tensor([0.1, 0.9])
    # Under-forecast by 2 at level 0.1 costs 0.2; by 1 at level 0.9 costs 0.9.
    assert pinball_loss(predicted, target, levels).item() == pytest.approx((0.2 + 0.9) / 2)


def test_quantile_predictions_never_cross():
    head = Head("quantile", horizon=2, levels=(0.1, 0.5, 0.9))
    raw = torch.randn(20, head.outputs, generator=torch.Generator().manual_seed(0))
    predicted = head.predict(raw)
    assert predicted.shape == (20, 2, 3)
    assert (predicted.diff(dim=-1) >= 0).all()


def test_federation_learns_the_planted_rule_and_small_storefronts_gain():
    dataset = planted_dataset()
    result = run_retail_experiment(config(), dataset)
    scored = {m: score_binary(dataset, t.predictions) for m, t in result.methods.items()}
    federated = scored["federated"]["summary"]
    assert federated["auc"] > 0.8
    assert federated["silo_mean_auc_pr"] > scored["local_only"]["summary"]["silo_mean_auc_pr"]
    assert federated["auc_pr"] >= 0.9 * scored["centralized"]["summary"]["auc_pr"]
    smallest = "shop3"
    assert (
        scored["federated"]["per_silo"][smallest]["auc_pr"]
        > scored["local_only"]["per_silo"][smallest]["auc_pr"]
    )
    assert len(result.history) == 5
    assert result.audit is not None


def test_a_storefront_sends_only_the_embedding_rows_of_its_own_codes():
    rng = np.random.default_rng(1)
    dataset = planted_dataset()
    own = TabularSilo(0, "narrow", planted(300, rng, codes=(1, 5)), planted(50, rng, codes=(1, 5)))
    run_config = config()
    shape = shape_of(run_config, dataset)
    client = TabularSiloClient(
        own, shape, head_of(run_config, dataset), run_config, tabular_pipeline(run_config, shape)
    )
    shared = init_shared(run_config, shape, "shared", "init")
    message = client.fit(shared, LocalTask(epochs=1))
    changed = message.tensors["embedding.0"].abs().sum(1) > 0
    assert set(np.flatnonzero(changed.numpy())) <= {1, 2, 3, 4}
    assert changed[1:5].all()


def test_secure_aggregation_trains_the_same_model():
    dataset = planted_dataset(sizes=(600, 300, 200))
    plain = run_retail_experiment(config(**{"retail.methods": ["federated"]}), dataset)
    secure = run_retail_experiment(
        config(**{"retail.methods": ["federated"], "protection.kind": "secagg"}), dataset
    )
    a, b = (
        plain.methods["federated"].weights["federated/shared"],
        secure.methods["federated"].weights["federated/shared"],
    )
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-4), name
    assert secure.protection.kind == "secagg"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"federated.mode": "cross-device"}, "cross-silo"),
        ({"privacy.mode": "record"}, "no differentially private training"),
        ({"retail.quantiles": [0.1, 0.9]}, "must include 0.5"),
        ({"retail.quantiles": [0.9, 0.5]}, "increasing"),
        ({"retail.methods": ["popularity"]}, "methods"),
    ],
)
def test_config_refuses_what_a_retail_task_cannot_do(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(**overrides)


def test_table_refuses_codes_outside_their_vocabulary():
    part = TabularPart(np.array([[7]]), np.zeros((1, 1)), np.zeros(1))
    with pytest.raises(DataError, match="vocabulary"):
        TabularDataset("bad", "binary", [TabularSilo(0, "a", part, part)], ["c"], [5], ["x"])
