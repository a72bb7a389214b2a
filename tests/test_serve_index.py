"""The catalogue index: exact search is brute force, faiss search finds what exact search finds on
vectors like a trained model's, bought items never come back, and the cache is used only when it
was built for these very vectors and settings and nobody else could have written it."""

from __future__ import annotations

import json
import os

import faiss
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedshop.config import load_config
from fedshop.data.datasets import load_dataset
from fedshop.errors import ConfigError
from fedshop.experiment import run_experiment
from fedshop.models.spec import get_model, score_all
from fedshop.report.run_folder import run_folder, write_run
from fedshop.serve.index import (
    CatalogueIndex,
    IndexSettings,
    cache_key,
    item_vectors,
    query_vectors,
    recall_at_k,
)
from fedshop.serve.model import ServingModel
from fedshop.serve.synthetic import draw_rows, enlarge_run, fit_rows


def brute_force(vectors, query, k, exclude=(), offsets=None):
    """Top-k by scoring every item in float64 and sorting the whole list."""
    scores = vectors.astype(np.float64) @ query.astype(np.float64)
    if offsets is not None:
        scores = scores + offsets
    allowed = [i for i in np.argsort(-scores, kind="stable") if i not in set(exclude)]
    return np.array(allowed[:k])


@pytest.fixture(scope="module")
def random_vectors():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5_000, 17)).astype(np.float32)
    queries = rng.normal(size=(40, 17)).astype(np.float32)
    return vectors, queries


# ---- a trained model's vectors ----------------------------------------------------------------------

CATALOGUE = 60_000  # above the default exact_below: served through the default faiss index


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    """A real federated MF run on Online Retail (dim 32, 3 rounds) in the serving format."""
    config = load_config(
        overrides={
            "seed": 5,
            "model.dim": 32,
            "federated.rounds": 3,
            "federated.personalise_epochs": 1,
            "methods": ["federated"],
            "eval.eval_every": 1000,
        }
    )
    dataset = load_dataset(config.data, seed=config.seed)
    with run_folder(tmp_path_factory.mktemp("runs") / "trained") as folder:
        write_run(folder, run_experiment(config, dataset))
    return folder


@pytest.fixture(scope="module")
def enlarged(trained_folder, tmp_path_factory):
    """The trained run with its catalogue enlarged as benchmarks/serving.py does."""
    return enlarge_run(trained_folder, tmp_path_factory.mktemp("runs") / "large", CATALOGUE, seed=0)


@pytest.fixture(scope="module")
def served_catalogue(enlarged):
    """The enlarged catalogue's search vectors, and 300 real customers as queries with their
    histories and their storefront's offsets, read from the run folder's files."""
    serving = json.loads((enlarged / "serving.json").read_text())
    spec = get_model(serving["model"])
    models = enlarged / "models" / "federated"
    shared = load_file(models / "shared.safetensors")
    queries, exclude, offsets = [], [], []
    for silo in serving["silos"]:
        tables = load_file(models / f"silo-{silo['slug']}.safetensors")
        customers = np.load(models / f"silo-{silo['slug']}.customers.npz")
        indptr, items = customers["history_indptr"], customers["history_items"]
        for row, vector in enumerate(query_vectors(spec, shared, tables)):
            queries.append(vector)
            exclude.append(items[indptr[row] : indptr[row + 1]])
            offsets.append(tables["silo_item_bias"].numpy().reshape(-1))
    pick = np.random.default_rng(1).choice(len(queries), 300, replace=False)
    return {
        "vectors": item_vectors(spec, shared),
        "queries": np.stack([queries[i] for i in pick]),
        "exclude": [exclude[i] for i in pick],
        "offsets": np.stack([offsets[i] for i in pick]),
    }


# ---- exact ----------------------------------------------------------------------------------------


def test_exact_search_is_brute_force(random_vectors):
    vectors, queries = random_vectors
    index = CatalogueIndex.build(vectors, IndexSettings(kind="exact"))
    rng = np.random.default_rng(2)
    offsets = rng.normal(size=len(vectors)).astype(np.float32)
    for k in (1, 10, 100):
        exclude = [rng.choice(len(vectors), 30, replace=False) for _ in queries]
        found = index.search(queries, k, exclude, offsets)
        for q, query in enumerate(queries):
            expected = brute_force(vectors, query, k, exclude[q], offsets)
            np.testing.assert_array_equal(found.items[q], expected)
            np.testing.assert_allclose(
                found.scores[q], vectors[expected] @ query + offsets[expected], rtol=1e-5
            )


def test_auto_is_exact_below_the_threshold_and_faiss_above(random_vectors):
    vectors, _ = random_vectors
    assert CatalogueIndex.build(vectors, IndexSettings(exact_below=5_001)).kind == "exact"
    above = CatalogueIndex.build(vectors, IndexSettings(exact_below=5_000))
    assert above.kind == "ivf" and isinstance(above.faiss_index, faiss.IndexIVFFlat)
    hnsw = IndexSettings(exact_below=5_000, approximate="hnsw")
    assert isinstance(CatalogueIndex.build(vectors, hnsw).faiss_index, faiss.IndexHNSWFlat)


def test_fewer_items_left_than_k_pads_the_answer():
    vectors = np.eye(4, dtype=np.float32)
    index = CatalogueIndex.build(vectors, IndexSettings(kind="exact"))
    found = index.search(vectors[:1], 10, [[0, 2]])
    assert list(found.items[0][:2]) == [1, 3] or list(found.items[0][:2]) == [3, 1]
    assert (found.items[0][2:] == -1).all() and np.isneginf(found.scores[0][2:]).all()


@pytest.mark.parametrize("k", [0, 101])
def test_k_out_of_range_is_refused(random_vectors, k):
    vectors, queries = random_vectors
    with pytest.raises(ValueError, match="k must be between 1 and 100"):
        CatalogueIndex.build(vectors, IndexSettings(kind="exact")).search(queries, k)


# ---- augmented vectors: the model's own scores ----------------------------------------------------


@pytest.mark.parametrize("model", ["mf-bpr", "gmf", "neumf"])
def test_index_scores_are_the_models_scores(model):
    spec = get_model(model)
    config = load_config(overrides={"model.name": model, "model.dim": 8}).model
    generator = torch.Generator().manual_seed(0)
    shared = spec.init_shared(300, config, generator)
    # Trained weights are not at their initial values: move every table off its start.
    shared = {k: v + 0.3 * torch.randn(v.shape, generator=generator) for k, v in shared.items()}
    users = spec.init_users(5, config, generator)
    index = CatalogueIndex.for_model(spec, shared)
    expected = score_all(spec, shared, users, torch.arange(5))
    got = index.exact_scores(query_vectors(spec, shared, users))
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_neumf_is_only_scored_exactly():
    spec = get_model("neumf")
    config = load_config(overrides={"model.name": "neumf", "model.dim": 8}).model
    shared = spec.init_shared(300, config, torch.Generator().manual_seed(0))
    assert CatalogueIndex.for_model(spec, shared, IndexSettings(exact_below=10)).kind == "exact"
    with pytest.raises(ConfigError, match="not an inner product"):
        CatalogueIndex.for_model(spec, shared, IndexSettings(kind="hnsw"))


# ---- faiss ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_faiss_never_returns_an_excluded_item(random_vectors, kind):
    vectors, queries = random_vectors
    index = CatalogueIndex.build(vectors, IndexSettings(kind=kind))
    exact = CatalogueIndex.build(vectors, IndexSettings(kind="exact"))
    # Exclude each query's own exact top 50: the search must look past all of them.
    exclude = list(exact.search(queries, 50).items)
    found = index.search(queries, 10, exclude)
    for q in range(len(queries)):
        assert not np.isin(found.items[q], exclude[q]).any()
        assert (found.items[q] >= 0).all()
        assert (np.diff(found.scores[q]) <= 0).all()
        np.testing.assert_allclose(found.scores[q], vectors[found.items[q]] @ queries[q], rtol=1e-5)


def test_recall_on_a_trained_models_catalogue(served_catalogue):
    """At the default settings, with what serving asks (bought items excluded, the storefront's
    offsets re-ranked on top), faiss finds ≥ 95% of the exact top 10 of real customers."""
    c = served_catalogue
    index = CatalogueIndex.build(c["vectors"])
    exact = CatalogueIndex.build(c["vectors"], IndexSettings(kind="exact"))
    assert index.kind == IndexSettings().approximate
    recall = recall_at_k(index, c["queries"], 10, exact, c["exclude"], c["offsets"])
    print(f"served recall@10 at the defaults: {recall:.4f}")
    assert recall >= 0.95, recall
    # And the measure can fail: a starved search misses much of it.
    starved = IndexSettings(ivf_nprobe=1, margin=0)
    index.settings = starved
    assert recall_at_k(index, c["queries"], 10, exact, c["exclude"], c["offsets"]) < recall


def test_synthetic_rows_match_the_real_rows(served_catalogue):
    real = served_catalogue["vectors"][:3_000].astype(np.float64)  # real items come first
    drawn = draw_rows(fit_rows(real), 100_000, seed=3).astype(np.float64)
    np.testing.assert_allclose(drawn.mean(0), real.mean(0), atol=0.02 * real.std())
    np.testing.assert_allclose(
        np.cov(drawn, rowvar=False), np.cov(real, rowvar=False), atol=0.05 * real.var()
    )
    # The same seed, the same rows.
    np.testing.assert_array_equal(
        draw_rows(fit_rows(real), 10, 3), draw_rows(fit_rows(real), 10, 3)
    )


# ---- the cache --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "other_build", "other_search"),
    [
        ("ivf", {"ivf_nlist": 50}, {"ivf_nprobe": 5}),
        ("hnsw", {"hnsw_m": 16}, {"hnsw_ef_search": 9}),
    ],
)
def test_cache_miss_then_hit_and_never_stale(
    random_vectors, tmp_path, kind, other_build, other_search
):
    vectors, queries = random_vectors
    settings = IndexSettings(kind=kind)
    first = CatalogueIndex.build(vectors, settings, cache_dir=tmp_path)
    assert first.cache == "miss" and first.cache_path.exists()
    assert first.cache_path.stat().st_mode & 0o777 == 0o600
    second = CatalogueIndex.build(vectors, settings, cache_dir=tmp_path)
    assert second.cache == "hit" and second.cache_path == first.cache_path
    np.testing.assert_array_equal(first.search(queries, 10).items, second.search(queries, 10).items)
    # Other vectors (a retrained model), other build settings: another file, built afresh.
    changed = vectors.copy()
    changed[7, 3] += 1e-3
    assert CatalogueIndex.build(changed, settings, cache_dir=tmp_path).cache == "miss"
    other = IndexSettings(kind=kind, **other_build)
    assert CatalogueIndex.build(vectors, other, cache_dir=tmp_path).cache == "miss"
    # Search-time settings are not part of the key, and take effect on a loaded index.
    searched = IndexSettings(kind=kind, **other_search)
    loaded = CatalogueIndex.build(vectors, searched, cache_dir=tmp_path)
    assert loaded.cache == "hit"
    exact = CatalogueIndex.build(vectors, IndexSettings(kind="exact"))
    assert recall_at_k(loaded, queries, 10, exact) < recall_at_k(second, queries, 10, exact)
    assert len(list(tmp_path.glob("*.faiss"))) == 3


def test_a_cache_for_other_vectors_under_the_right_name_is_not_used(random_vectors, tmp_path):
    vectors, _queries = random_vectors
    settings = IndexSettings(kind="hnsw")
    wrong = CatalogueIndex.build(vectors[:100], settings).faiss_index
    path = tmp_path / f"{cache_key(vectors, settings.build_key('hnsw'))}.faiss"
    path.write_bytes(faiss.serialize_index(wrong).tobytes())
    path.chmod(0o600)
    index = CatalogueIndex.build(vectors, settings, cache_dir=tmp_path)
    assert index.cache == "miss" and index.faiss_index.ntotal == len(vectors)


def test_a_damaged_or_foreign_writable_cache_is_rebuilt(random_vectors, tmp_path):
    vectors, _queries = random_vectors
    settings = IndexSettings(kind="hnsw")
    path = CatalogueIndex.build(vectors, settings, cache_dir=tmp_path).cache_path
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    assert CatalogueIndex.build(vectors, settings, cache_dir=tmp_path).cache == "miss"
    assert path.read_bytes() == good  # replaced by a whole one
    os.chmod(path, 0o666)  # anyone could have put something else there
    assert CatalogueIndex.build(vectors, settings, cache_dir=tmp_path).cache == "miss"
    assert path.stat().st_mode & 0o777 == 0o600


def test_an_unwritable_cache_folder_still_serves(random_vectors, tmp_path):
    vectors, queries = random_vectors
    blocker = tmp_path / "run"
    blocker.write_text("a file where the run folder should be")  # unwritable even for root
    index = CatalogueIndex.build(vectors, IndexSettings(kind="hnsw"), cache_dir=blocker / "index")
    assert index.cache == "unwritable"
    assert (index.search(queries, 10).items >= 0).all()


# ---- plugged into the service -----------------------------------------------------------------------


def test_the_service_ranks_a_large_catalogue_with_the_index(enlarged, trained_folder):
    real = ServingModel.load(trained_folder)
    model = ServingModel.load(enlarged)
    assert model.index is not None and model.index.kind == IndexSettings().approximate
    assert model.index.cache == "miss" and model.index.cache_path.parent == enlarged / "index"
    assert model.index.cache_path.stat().st_mode & 0o777 == 0o600
    assert ServingModel.load(enlarged).index.cache == "hit"
    exact = ServingModel.load(enlarged, index=IndexSettings(kind="exact"))
    assert exact.index is None
    overlaps = []
    for store in model.storefronts.values():
        for customer in store.customer_ids[:20]:
            got = model.recommend(str(customer), 10)
            row = store.row_of[str(customer)]
            bought = {str(model.catalogue.item_ids[i]) for i in store.history(row)}
            ids = [item["item_id"] for item in got["items"]]
            assert len(ids) == 10 and not bought & set(ids)
            expected = [item["item_id"] for item in exact.recommend(str(customer), 10)["items"]]
            overlaps.append(len(set(ids) & set(expected)) / 10)
            # The customers, their storefronts and histories are the real run's.
            assert real.customer(str(customer))[0].name == store.name
    assert np.mean(overlaps) >= 0.95, np.mean(overlaps)


def test_enlarged_run_keeps_the_real_items_first(enlarged, trained_folder):
    real = ServingModel.load(trained_folder, index=IndexSettings(kind="exact"))
    large = ServingModel.load(enlarged, index=IndexSettings(kind="exact"))
    n = len(real.catalogue)
    assert len(large.catalogue) == CATALOGUE
    np.testing.assert_array_equal(large.catalogue.item_ids[:n], real.catalogue.item_ids)
    np.testing.assert_array_equal(large.catalogue.prices[:n], real.catalogue.prices)
    assert large.catalogue.item(n)["name"] == "synthetic item 1"
    assert large.catalogue.item(CATALOGUE - 1)["item_id"] == f"SYN-{CATALOGUE - n}"
    real_prices = set(real.catalogue.prices[~np.isnan(real.catalogue.prices)])
    assert set(large.catalogue.prices[n:]) <= real_prices
    for name in real.spec.item_tables:
        torch.testing.assert_close(large.shared[name][:n], real.shared[name])
    for store in real.storefronts.values():
        twin = large.storefronts[store.name]
        torch.testing.assert_close(twin.item_offsets[:n], store.item_offsets)
        np.testing.assert_array_equal(twin.customer_ids, store.customer_ids)
        np.testing.assert_array_equal(twin.history_items, store.history_items)
    for path in (enlarged / "models" / "federated").iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path
