"""New products (cold-start items): item features, the feature model, the hold-out and its metrics."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedshop.cold_items import feature_popularity, full_catalogue_model, prepare
from fedshop.config import DataConfig, load_config
from fedshop.data.cold_items import hold_out_items
from fedshop.data.item_features import amazon_attributes, load_item_features, retail_features
from fedshop.errors import ConfigError, DataError
from fedshop.models.features import CODE_TABLES, MF_FEATURES, SLOTS, feature_codes, item_parts
from fedshop.models.spec import get_model, score_all

TINY = {
    "seed": 3,
    "model.name": "mf-features",
    "model.dim": 8,
    "federated.rounds": 2,
    "federated.personalise_epochs": 1,
    "baselines.epochs": 2,
    "eval.cold_items": 0.1,
    "methods": ["federated", "centralized"],
}


@pytest.fixture(scope="module")
def retail_featured():
    """Online Retail (embedded) with its item features, before any hold-out."""
    config = load_config(None, TINY)
    from fedshop.data.datasets import load_dataset

    dataset = load_dataset(config.data, seed=config.seed)
    featured, _ = prepare(load_config(None, {**TINY, "eval.cold_items": 0.0}), dataset)
    return config, featured


def test_retail_features_are_aligned_with_the_catalogue(retail_featured):
    _, dataset = retail_featured
    features = retail_features(dataset.item_names, dataset.item_prices)
    assert features.matrix.shape[0] == dataset.n_items
    report = dataset.report["item_features"]
    assert report["items"] == dataset.n_items and report["features"] == features.n_features
    assert report["features_by_kind"]["price"] == 8
    # Every item with a known price has exactly one price bucket.
    prices = features.matrix[:, [i for i, n in enumerate(features.names) if n.startswith("price:")]]
    assert (np.asarray(prices.sum(axis=1)).ravel() == 1).all()
    row = int(np.flatnonzero(np.char.find(dataset.item_names.astype(str), "HEART") >= 0)[0])
    words = {features.names[c] for c in features.matrix[row].indices}
    assert any(w.startswith("word:heart") for w in words) and any(
        w.startswith("price:") for w in words
    )


def test_amazon_attributes_follow_the_item_ids(data_dir):
    path = data_dir / "amazon-2014-5core" / "Toys_and_Games_item2attributes.json"
    features = amazon_attributes(path, np.array(["4", "145", "999999"], dtype=object))
    names = [{features.names[c] for c in features.matrix[r].indices} for r in range(3)]
    assert names[0] == {f"attribute:{a}" for a in (1, 2, 3, 4, 5)}
    assert names[1] == {f"attribute:{a}" for a in (1, 2, 6, 7, 8)}
    assert names[2] == set()  # an id without attributes has none


def test_missing_attributes_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"item2attributes\.json"):
        amazon_attributes(tmp_path / "Toys_item2attributes.json", np.array(["1"]))
    sequences = tmp_path / "shop.txt"
    sequences.write_text("1 1 2 3 4 5\n2 2 3 4 5 1\n")
    config = DataConfig(dataset="amazon-sequential", path=str(sequences), silos=2)
    from fedshop.data.datasets import load_dataset

    dataset = load_dataset(config, seed=0)
    with pytest.raises(DataError, match=r"shop_item2attributes\.json"):
        load_item_features(dataset, config)


def test_held_out_items_never_reach_training(retail_featured, monkeypatch):
    config, dataset = retail_featured
    warm, cold = hold_out_items(dataset, 0.1, config.seed)
    assert cold.n_items == round(0.1 * dataset.n_items)
    assert not set(warm.item_ids) & set(cold.item_ids)
    assert warm.n_items == dataset.n_items - cold.n_items
    for name in ("train", "test", "validation"):
        matrix = getattr(warm, name)
        assert matrix is None or matrix.shape[1] == warm.n_items
    removed = dataset.train[:, cold.items].nnz
    assert removed > 0 and warm.train.nnz == dataset.train.nnz - removed
    assert warm.item_features.shape[0] == warm.n_items
    # The relevant set: every interaction with a held-out item, in any split.
    assert cold.relevant.nnz == (dataset.train + dataset.test)[:, cold.items].nnz
    # Same seed, same items; another seed, others.
    assert np.array_equal(hold_out_items(dataset, 0.1, config.seed)[1].items, cold.items)
    assert not np.array_equal(hold_out_items(dataset, 0.1, config.seed + 1)[1].items, cold.items)

    # Every method trains on the catalogue without them: spy on the one training routine and
    # on the model's initialisation (the catalogue's size and features).
    import fedshop.experiment as experiment
    import fedshop.fl.client as client
    from fedshop.models.train import train_bpr

    seen = []

    def spy(shared, private, train, *args, **kwargs):
        seen.append((train.shape[1], shared["item_embedding"].shape[0]))
        return train_bpr(shared, private, train, *args, **kwargs)

    monkeypatch.setattr(client, "train_bpr", spy)
    monkeypatch.setattr(experiment, "train_bpr", spy)
    result = experiment.run_experiment(config, dataset)
    assert seen and all(shape == (warm.n_items, warm.n_items) for shape in seen)
    assert result.dataset.n_items == warm.n_items
    assert set(result.dataset.item_ids) == set(warm.item_ids)


def test_an_unseen_item_is_placed_by_its_features_alone():
    features = sp.csr_matrix(
        np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1], [1, 1, 0, 0]], dtype=np.float32)
    )
    config = load_config(None, {"model.name": "mf-features", "model.dim": 4})
    generator = torch.Generator().manual_seed(0)
    shared = MF_FEATURES.init_model(4, config.model, generator, features)
    assert torch.equal(shared["item_embedding"], torch.zeros(4, 4))  # zero until trained
    codes = torch.stack([shared[name] for name in CODE_TABLES], -1)
    assert codes.shape == (4, SLOTS) and codes[0, :2].tolist() == [0.0, 1.0]
    assert (codes[0, 2:] == -1).all()

    # Items 0..2 were trained (id embeddings moved); item 3 is new, with item 0's features.
    from fedshop.data.cold_items import ColdItems

    cold = ColdItems(np.array([3]), np.arange(3), sp.csr_matrix((1, 1)), features, np.array(["x"]))
    trained = {
        "item_embedding": torch.randn(3, 4, generator=generator),
        "feature_table": shared["feature_table"],
        **{name: value[:3] for name, value in feature_codes(features[:3]).items()},
    }
    full = full_catalogue_model(MF_FEATURES, trained, cold)
    assert torch.equal(full["item_embedding"][3], torch.zeros(4))
    vector, bias = item_parts({k: full[k] for k in MF_FEATURES.item_tables}, full)
    table = shared["feature_table"]
    assert torch.allclose(vector[3], table[[0, 1], :4].mean(0))
    assert torch.allclose(bias[3], table[[0, 1], 4].mean())
    # Whatever the trained items' id rows are, the new item scores the same.
    users = {"user_embedding": torch.randn(2, 4, generator=generator)}
    before = score_all(MF_FEATURES, full, users, torch.arange(2))[:, 3]
    moved = dict(trained, item_embedding=trained["item_embedding"] * 5 + 1)
    again = full_catalogue_model(MF_FEATURES, moved, cold)
    assert torch.allclose(score_all(MF_FEATURES, again, users, torch.arange(2))[:, 3], before)


def test_feature_popularity_rule():
    # Features: a, b, c. Items 0-2 trained (popularity 10, 2, 4); item 3 new with a and c; item 4
    # new with b and a feature nobody trained has (d); item 5 new without features.
    features = sp.csr_matrix(
        np.array(
            [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 0, 0]],
            dtype=np.float32,
        )
    )
    scores = feature_popularity(features, np.array([0, 1, 2]), np.array([10.0, 2.0, 4.0]))
    # a: mean of 10 and 2 = 6; b: 2; c: 4; d: 0 (no trained item has it).
    assert scores.tolist() == [10.0, 2.0, 4.0, (6 + 4) / 2, (2 + 0) / 2, 0.0]


@pytest.mark.parametrize("mode", ["cross-silo", "cross-device"])
def test_feature_model_beats_random_on_new_products(retail_featured, mode, tmp_path):
    config, dataset = retail_featured
    overrides = {**TINY, "federated.mode": mode}
    if mode == "cross-device":
        overrides |= {"federated.clients_per_round": 200, "federated.rounds": 3}
    config = load_config(None, overrides)
    from fedshop.experiment import run_experiment
    from fedshop.report.run_folder import metrics_document

    result = run_experiment(config, dataset)
    block = result.cold_items
    methods = block["methods"]
    assert set(methods) == {"federated", "centralized", "feature popularity", "random"}
    for method in ("federated", "centralized"):
        assert methods[method]["hr@10"] > 1.5 * methods["random"]["hr@10"], methods
    assert methods["federated"]["users"] > 1000
    assert 0 <= methods["federated"]["among_all"]["hr@10"] <= 1
    assert block["held_out_items"] == round(0.1 * dataset.n_items)
    # The fixed feature-id tables never moved in training.
    shared = result.weights["federated/shared"]
    for name, value in feature_codes(result.dataset.item_features).items():
        assert torch.equal(shared[name].cpu(), value)
    # metrics.json carries the block, valid JSON.
    document = json.loads(json.dumps(metrics_document(result)))
    assert document["cold_items"]["methods"]["random"]["hr@10"] == methods["random"]["hr@10"]
    report = result.dataset.report  # the data report: feature and hold-out counts
    assert report["cold_items"]["held_out_items"] == block["held_out_items"]
    assert report["item_features"]["features"] == result.dataset.item_features.shape[1]


def test_config_errors():
    with pytest.raises(ConfigError, match="cold_items must be in"):
        load_config(None, {**TINY, "eval.cold_items": 0.7})
    with pytest.raises(ConfigError, match="cold_items must be in"):
        load_config(None, {**TINY, "eval.cold_items": -0.1})
    with pytest.raises(ConfigError, match="mf-features"):
        load_config(None, {"eval.cold_items": 0.1})  # mf-bpr cannot place a new product
    with pytest.raises(ConfigError, match="needs item features; movielens-1m has none"):
        load_config(None, {"model.name": "mf-features", "data.dataset": "movielens-1m"})
    with pytest.raises(ConfigError, match="differential privacy"):
        load_config(
            None, {"model.name": "mf-features", "privacy.mode": "record", "privacy.epsilon": 8.0}
        )
    assert get_model("mf-features") is MF_FEATURES


def fedshop(*args):
    return subprocess.run(
        [sys.executable, "-m", "fedshop", *map(str, args)],
        capture_output=True, text=True, timeout=300, env=os.environ.copy(),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--cold-items", "0.7", "--model", "mf-features"), "cold_items must be in"),
        (("--cold-items", "0.1"), "mf-features"),
        (("--model", "mf-features", "--dataset", "movielens-100k"), "needs item features"),
    ],
)
def test_cli_errors_are_one_line(args, fragment, tmp_path):
    result = fedshop("train", *args, "--out", tmp_path / "run")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.stderr


def test_serving_reads_the_feature_model_through_its_item_vectors():
    from fedshop.models.fold_in import fold_in, interaction_vectors

    features = sp.csr_matrix(np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]], dtype=np.float32))
    config = load_config(None, {"model.name": "mf-features", "model.dim": 4})
    shared = MF_FEATURES.init_model(3, config.model, torch.Generator().manual_seed(1), features)
    shared["item_embedding"] = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    vectors = interaction_vectors(MF_FEATURES, shared)
    expected, _ = item_parts({k: shared[k] for k in MF_FEATURES.item_tables}, shared)
    assert torch.allclose(vectors, expected)
    user = fold_in(MF_FEATURES, shared, torch.tensor([0, 2]))
    assert user["user_embedding"].shape == (1, 4) and torch.isfinite(user["user_embedding"]).all()
