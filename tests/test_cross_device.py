"""Cross-device federation: the vectorised round equals a plain per-client loop, and what travels."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedshop.config import ModelConfig, load_config
from fedshop.experiment import run_experiment
from fedshop.fl.cross_device import eligible_clients, run_cross_device
from fedshop.fl.local_round import LocalTraining, draw_round, reference_round
from fedshop.fl.vectorised import _BUCKET_FLOATS, plan_buckets, plan_chunks, vectorised_round
from fedshop.models.spec import get_model
from fedshop.seeding import torch_generator


@pytest.fixture(scope="module")
def small(retail):
    """The first 60 Online Retail customers with a training history: real, skewed basket sizes."""
    users = eligible_clients(retail.train)[:60].numpy()
    return retail.train[users]


def _setup(name: str, train: sp.csr_matrix, dim: int = 8):
    spec = get_model(name)
    model = ModelConfig(name=name, dim=dim)
    shared = spec.init_shared(train.shape[1], model, torch.Generator().manual_seed(1))
    users = spec.init_users(train.shape[0], model, torch.Generator().manual_seed(2))
    return spec, shared, users


@pytest.mark.parametrize(
    ("name", "layout", "mu"),
    [
        ("mf-bpr", "flat", 0.0),
        ("mf-bpr", "padded", 0.0),
        ("gmf", "flat", 0.0),
        ("gmf", "padded", 0.0),
        ("neumf", "auto", 0.0),  # padded: its per-client weight matrices cannot be laid out flat
        # FedProx: the proximal term on each client's copies equals the reference's on full tables
        ("mf-bpr", "flat", 0.5),
        ("gmf", "padded", 0.5),
        ("neumf", "auto", 0.5),
    ],
)
def test_vectorised_round_equals_sequential_reference(small, name, layout, mu):
    spec, shared, users = _setup(name, small)
    training = LocalTraining(epochs=3, learning_rate=0.3, l2=0.01, negatives=2, proximal_mu=mu)
    clients = torch.tensor([0, 2, 3, 5, 8, 13, 21, 34, 55, 59])
    batch = draw_round(small, clients, 3, 2, torch.Generator().manual_seed(3))
    ref_update, ref_users = reference_round(spec, shared, users, batch, training)
    vec_update, vec_users = vectorised_round(spec, shared, users, batch, training, layout=layout)
    assert set(ref_update) == set(vec_update) == set(shared)
    for k in shared:
        assert ref_update[k].abs().max() > 0, k  # the round really moved every shared parameter
        torch.testing.assert_close(vec_update[k], ref_update[k], rtol=1e-4, atol=1e-7)
    for k in users:
        torch.testing.assert_close(vec_users[k], ref_users[k], rtol=1e-4, atol=1e-6)


def test_flat_layout_is_refused_for_per_client_weight_matrices(small):
    spec, shared, users = _setup("neumf", small)
    batch = draw_round(small, torch.tensor([0, 1]), 1, 1, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="needs the padded layout"):
        vectorised_round(spec, shared, users, batch, LocalTraining(1, 0.1, 0.0, 1), layout="flat")


def test_personalisation_round_moves_only_user_vectors(small):
    spec, shared, users = _setup("neumf", small)
    training = LocalTraining(epochs=2, learning_rate=0.3, l2=0.0, negatives=1, update_shared=False)
    clients = torch.arange(10)
    batch = draw_round(small, clients, 2, 1, torch.Generator().manual_seed(0))
    update, new_vec = vectorised_round(spec, shared, users, batch, training)
    _, new_ref = reference_round(spec, shared, users, batch, training)
    assert update == {}
    for k in users:
        torch.testing.assert_close(new_vec[k], new_ref[k], rtol=1e-4, atol=1e-6)
        assert not torch.equal(new_vec[k], users[k][clients])


def test_round_draws_own_positives_and_foreign_negatives(small):
    clients = torch.tensor([1, 4, 9, 16, 25])
    batch = draw_round(small, clients, 2, 3, torch.Generator().manual_seed(5))
    for client, positives, negatives in zip(
        clients.tolist(), batch.positives, batch.negatives, strict=True
    ):
        own = small[client].indices
        assert sorted(positives.tolist()) == sorted(own.tolist())
        assert negatives.shape == (2, len(own), 3)
        assert not np.isin(negatives.numpy(), own).any()
    again = draw_round(small, clients, 2, 3, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(batch.negatives, again.negatives, strict=True))


def test_update_is_sparse_in_item_rows(small):
    """Rows no sampled client touched get exactly zero update: only touched rows are aggregated."""
    spec, shared, users = _setup("mf-bpr", small)
    clients = torch.tensor([0, 1, 2])
    batch = draw_round(small, clients, 1, 1, torch.Generator().manual_seed(0))
    update, _ = vectorised_round(spec, shared, users, batch, LocalTraining(1, 0.5, 0.01, 1))
    touched = torch.unique(torch.cat([*batch.positives, *[n.reshape(-1) for n in batch.negatives]]))
    moved = torch.nonzero(update["item_embedding"].abs().sum(1)).ravel()
    assert set(moved.tolist()) <= set(touched.tolist())
    assert len(moved) > 0


def test_groups_cover_every_client_once_with_bounded_padding_and_memory():
    sizes = torch.from_numpy(np.random.default_rng(0).zipf(1.6, 5000).clip(1, 3000))
    width = 1024  # wide enough that the memory bound must split the round
    for plan, slots in (
        (plan_buckets, lambda g: len(g) * int(sizes[g].max())),  # padded to the largest
        (plan_chunks, lambda g: int(sizes[g].sum())),  # end to end
    ):
        groups = plan(sizes, width=width, negatives=1)
        assert sorted(torch.cat(groups).tolist()) == list(range(5000))
        assert len(groups) > 1
        for group in groups:
            assert slots(group) * 2 * width <= _BUCKET_FLOATS or len(group) == 1
    buckets = plan_buckets(sizes, width=64, negatives=1)
    for bucket in buckets:
        assert len(bucket) * int(sizes[bucket].max()) <= 1.25 * int(sizes[bucket].sum())


def test_only_sampled_clients_change_their_state(retail):
    config = load_config(
        overrides={
            "federated.mode": "cross-device",
            "federated.rounds": 1,
            "federated.clients_per_round": 50,
            "federated.personalise_epochs": 0,
            "model.dim": 8,
        }
    )
    run = run_cross_device(retail, config)
    initial = get_model("mf-bpr").init_users(
        retail.n_users, config.model, torch_generator(config.seed, "devices", "users")
    )
    sampled = run.history[0].clients
    assert len(sampled) == 50
    changed = (run.user_tables["user_embedding"] != initial["user_embedding"]).any(1)
    assert sorted(torch.nonzero(changed).ravel().tolist()) == sorted(sampled)


def test_cross_device_experiment_learns_on_real_data(retail):
    """A short cross-device run (every customer a client) ranks far better than chance."""
    config = load_config(
        overrides={
            "federated.mode": "cross-device",
            "federated.rounds": 8,
            "federated.server_optimizer": "fedadam",
            "federated.server_learning_rate": 0.05,
            "federated.server_epsilon": 1e-8,
            "eval.protocol": "sampled-100",
            "eval.eval_every": 8,
            "methods": ["federated", "popularity"],
            "model.dim": 16,
        }
    )
    result = run_experiment(config, retail)
    federated = result.methods["federated"].summary
    # Chance on 1 + 100 candidates is about 10/101 for a single held-out item.
    assert federated["hr@10"] > 0.3
    assert result.config.model.silo_item_bias is False
    assert len(result.history) == 8


@pytest.mark.parametrize("name", ["gmf", "neumf"])
def test_ncf_models_train_in_cross_silo_mode_too(retail, name):
    """Silos send updates of every shared tensor (item tables and layers) and never user vectors."""
    from fedshop.fl.in_process import run_cross_silo

    config = load_config(
        overrides={
            "model.name": name,
            "model.dim": 8,
            "federated.rounds": 1,
            "federated.personalise_epochs": 0,
            "eval.eval_every": 1,
        }
    )
    run = run_cross_silo(retail, config)
    spec = get_model(name)
    assert set(run.server.shared) == set(spec.init_shared(retail.n_items, config.model, None))
    for client in run.clients:
        assert set(client.private_state()) == {*spec.user_tables, "silo_item_bias"}
    assert run.history[0].metrics["users"] > 2000


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_asking_for_cuda_without_a_gpu_is_a_clear_error(retail):
    from fedshop.errors import FedShopError

    config = load_config(overrides={"federated.mode": "cross-device", "federated.device": "cuda"})
    with pytest.raises(FedShopError, match="no CUDA device"):
        run_cross_device(retail, config)
