"""FedProx (a proximal term in every client's local loss) and the FedYogi server optimiser."""

import math

import pytest
import torch

from fedshop.config import FederatedConfig, ModelConfig, TrainConfig, load_config
from fedshop.errors import ConfigError
from fedshop.fl.cross_device import eligible_clients
from fedshop.fl.local_round import LocalTraining, draw_round, reference_round
from fedshop.fl.server_opt import FedAdam, FedYogi, make_server_optimizer
from fedshop.fl.vectorised import vectorised_round
from fedshop.models.spec import get_model
from fedshop.models.train import proximal_term, train_bpr

# ---------------------------------------------------------------------------------------------
# FedYogi


def test_fedyogi_steps_match_hand_computed_values():
    """Algorithm 2 of Reddi et al. with v starting at τ², two steps worked out by hand."""
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 0.01
    yogi = FedYogi(learning_rate=lr, beta1=b1, beta2=b2, tau=tau)
    w0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    first = torch.tensor([0.2, -0.004, 0.0], dtype=torch.float64)
    w1 = yogi.step({"w": w0}, {"w": first})["w"]
    # v0 = τ² = 1e-4; Δ² = (0.04, 1.6e-5, 0): sign(v0 − Δ²) = (−1, +1, +1), so
    # v1 = (1e-4 + 0.01·0.04, 1e-4 − 0.01·1.6e-5, 1e-4) = (5e-4, 9.984e-5, 1e-4); m1 = 0.1·Δ.
    v1 = [5e-4, 9.984e-5, 1e-4]
    m1 = [0.02, -0.0004, 0.0]
    expected1 = [w0[i].item() + lr * m1[i] / (math.sqrt(v1[i]) + tau) for i in range(3)]
    torch.testing.assert_close(w1, torch.tensor(expected1, dtype=torch.float64))
    # The first coordinate in closed form: 0.1·0.02 / (√5·0.01 + 0.01) = 0.05·(√5 − 1).
    assert w1[0].item() == pytest.approx(1 + 0.05 * (math.sqrt(5) - 1), abs=1e-12)
    torch.testing.assert_close(yogi.v["w"], torch.tensor(v1, dtype=torch.float64))

    second = torch.tensor([0.0, 0.3, -0.02], dtype=torch.float64)
    w2 = yogi.step({"w": w1}, {"w": second})["w"]
    # Δ² = (0, 0.09, 4e-4): sign(v1 − Δ²) = (+1, −1, −1), so v2 = (5e-4 − 0, 9.984e-5 + 0.01·0.09,
    # 1e-4 + 0.01·4e-4) = (5e-4, 9.9984e-4, 1.04e-4); m2 = 0.9·m1 + 0.1·Δ.
    v2 = [5e-4, 9.9984e-4, 1.04e-4]
    m2 = [0.018, 0.9 * -0.0004 + 0.03, -0.002]
    expected2 = [expected1[i] + lr * m2[i] / (math.sqrt(v2[i]) + tau) for i in range(3)]
    torch.testing.assert_close(yogi.v["w"], torch.tensor(v2, dtype=torch.float64))
    torch.testing.assert_close(w2, torch.tensor(expected2, dtype=torch.float64))


def test_fedyogi_second_moment_is_not_adams():
    """Yogi moves v by (1 − β2)·Δ² whatever v is; Adam decays v by β2: after a large update and
    then a tiny one, Adam's v has fallen by a factor β2 while Yogi's has fallen by (1 − β2)·Δ²."""
    adam, yogi = FedAdam(beta2=0.5, tau=1e-3), FedYogi(beta2=0.5, tau=1e-3)
    for optimiser in (adam, yogi):
        for d in (4.0, 0.1):
            optimiser.step({"w": torch.zeros(1, dtype=torch.float64)}, {"w": torch.tensor([d])})
    # Adam: v = 0.5·(0.5·16) + 0.5·0.01 = 4.005. Yogi: v = 1e-6 + 0.5·16 = 8.000001, then
    # 8.000001 − 0.5·0.01 = 7.995001.
    assert adam.v["w"].item() == pytest.approx(4.005)
    assert yogi.v["w"].item() == pytest.approx(7.995001)


def test_fedyogi_is_built_from_the_config():
    config = load_config(
        overrides={
            "federated.server_optimizer": "fedyogi",
            "federated.server_learning_rate": 0.05,
            "federated.server_momentum": 0.8,
            "federated.server_epsilon": 1e-6,
        }
    ).federated
    optimiser = make_server_optimizer(config)
    assert type(optimiser) is FedYogi
    assert (optimiser.learning_rate, optimiser.beta1, optimiser.tau) == (0.05, 0.8, 1e-6)


def _deltas(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "item_embedding": torch.randn(5, 3, generator=g),
        "item_bias": torch.randn(5, generator=g),
    }


def test_fedyogi_state_dict_round_trip_gives_identical_next_steps():
    params = {k: torch.zeros_like(v) for k, v in _deltas(0).items()}
    yogi = FedYogi(learning_rate=0.1, tau=1e-3)
    for seed in range(3):
        params = yogi.step(params, _deltas(seed))
    resumed = FedYogi(learning_rate=0.1, tau=1e-3)
    resumed.load_state_dict(yogi.state_dict())
    for seed in range(3, 6):  # several steps: the loaded state is a copy, not shared tensors
        a, b = yogi.step(params, _deltas(seed)), resumed.step(params, _deltas(seed))
        for k in a:
            assert torch.equal(a[k], b[k]), k
        params = a


def test_fedyogi_resumes_from_a_server_checkpoint(tmp_path):
    """Through the deployment's own checkpoint files (deploy/checkpoint.py), weight decay included."""
    from fedshop.deploy.checkpoint import load_checkpoint, save_checkpoint
    from fedshop.fl.server import silo_server
    from fedshop.messages import AggregationPipeline

    config = FederatedConfig(server_optimizer="fedyogi", server_weight_decay=0.01)
    start = {k: torch.zeros_like(v) for k, v in _deltas(0).items()}

    def server():
        return silo_server(config, 7, dict(start), 4, AggregationPipeline())

    first = server()
    for seed in range(3):
        first.step(_deltas(seed))
    save_checkpoint(tmp_path, first, [], "digest")
    second = server()
    assert load_checkpoint(tmp_path, second, "digest").round == 3
    for seed in range(3, 5):
        a, b = first.step(_deltas(seed)), second.step(_deltas(seed))
        for k in a:
            assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------
# FedProx


def test_proximal_gradient_is_mu_times_the_distance_to_the_global_model():
    g = torch.Generator().manual_seed(0)
    anchor = {"item_embedding": torch.randn(4, 3, generator=g), "w": torch.randn(5, generator=g)}
    params = {
        k: (v + torch.randn(v.shape, generator=g)).requires_grad_(True) for k, v in anchor.items()
    }
    mu = 0.37
    term = proximal_term(params, anchor, mu)
    expected = mu / 2 * sum(((params[k] - anchor[k]) ** 2).sum() for k in params)
    torch.testing.assert_close(term, expected)
    grads = torch.autograd.grad(term, list(params.values()))
    for (k, p), grad in zip(params.items(), grads, strict=True):
        torch.testing.assert_close(grad, mu * (p.detach() - anchor[k]), rtol=1e-6, atol=0.0)
    # At the global model itself the term and its gradient are zero: a client's first step is
    # the plain one.
    at_anchor = {k: v.clone().requires_grad_(True) for k, v in anchor.items()}
    zero = torch.autograd.grad(proximal_term(at_anchor, anchor, mu), list(at_anchor.values()))
    assert all(not z.any() for z in zero)


@pytest.fixture(scope="module")
def silo(retail):
    """A real storefront of Online Retail (the smallest with at least 200 purchases)."""
    silos = [s for s in retail.silos() if s.n_train >= 200]
    return min(silos, key=lambda s: s.n_train)


def _silo_start(silo, name="mf-bpr", dim=8):
    spec = get_model(name)
    model = ModelConfig(name=name, dim=dim)
    shared = spec.init_shared(silo.train.shape[1], model, torch.Generator().manual_seed(1))
    private = spec.init_private(
        silo.n_users, silo.train.shape[1], model, torch.Generator().manual_seed(2)
    )
    return spec, shared, private


def _norm(update: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.pow(2).sum()) for v in update.values()))


def test_cross_silo_mu_zero_is_the_plain_training_and_private_tables_are_free(silo):
    spec, shared, private = _silo_start(silo, "gmf")
    config = TrainConfig(learning_rate=0.01)

    def train(**kwargs):
        return train_bpr(
            shared, private, silo.train, 2, config, torch.Generator().manual_seed(3), spec=spec,
            **kwargs,
        )  # fmt: skip

    plain, zero = train(), train(proximal_mu=0.0)
    for k in {**plain.shared, **plain.private}:
        got = zero.shared.get(k, zero.private.get(k))
        assert torch.equal(got, plain.shared.get(k, plain.private.get(k))), k
    # Personalisation (shared parameters fixed) ignores μ: there is nothing to hold near.
    personal = train(update_shared=False)
    held = train(update_shared=False, proximal_mu=5.0)
    for k in personal.private:
        assert torch.equal(personal.private[k], held.private[k]), k


def test_cross_silo_local_update_shrinks_as_mu_grows(silo):
    spec, shared, private = _silo_start(silo)
    config = TrainConfig(learning_rate=0.01)
    norms = []
    for mu in (0.0, 0.1, 1.0, 10.0):
        result = train_bpr(
            shared, private, silo.train, 3, config, torch.Generator().manual_seed(3),
            spec=spec, proximal_mu=mu,
        )  # fmt: skip
        norms.append(_norm({k: result.shared[k] - shared[k] for k in shared}))
    assert norms == sorted(norms, reverse=True) and len(set(norms)) == 4, norms
    assert norms[-1] < 0.7 * norms[0], norms


@pytest.fixture(scope="module")
def shoppers(retail):
    """The first 60 Online Retail customers with a training history."""
    users = eligible_clients(retail.train)[:60].numpy()
    return retail.train[users]


def _device_round(shoppers, name: str, mu: float, layout: str = "auto", reference=False):
    spec = get_model(name)
    model = ModelConfig(name=name, dim=8)
    shared = spec.init_shared(shoppers.shape[1], model, torch.Generator().manual_seed(1))
    users = spec.init_users(shoppers.shape[0], model, torch.Generator().manual_seed(2))
    training = LocalTraining(epochs=4, learning_rate=0.3, l2=0.01, negatives=2, proximal_mu=mu)
    batch = draw_round(shoppers, torch.arange(0, 60, 3), 4, 2, torch.Generator().manual_seed(3))
    if reference:
        return reference_round(spec, shared, users, batch, training)
    return vectorised_round(spec, shared, users, batch, training, layout=layout)


@pytest.mark.parametrize(("name", "layout"), [("mf-bpr", "flat"), ("neumf", "auto")])
def test_cross_device_mu_zero_is_bit_identical_to_the_plain_round(shoppers, name, layout):
    spec = get_model(name)
    model = ModelConfig(name=name, dim=8)
    shared = spec.init_shared(shoppers.shape[1], model, torch.Generator().manual_seed(1))
    users = spec.init_users(shoppers.shape[0], model, torch.Generator().manual_seed(2))
    batch = draw_round(shoppers, torch.arange(0, 60, 3), 2, 2, torch.Generator().manual_seed(3))
    plain = LocalTraining(epochs=2, learning_rate=0.3, l2=0.01, negatives=2)
    zero = LocalTraining(epochs=2, learning_rate=0.3, l2=0.01, negatives=2, proximal_mu=0.0)
    for run in (vectorised_round, reference_round):
        kwargs = {"layout": layout} if run is vectorised_round else {}
        a_update, a_users = run(spec, shared, users, batch, plain, **kwargs)
        b_update, b_users = run(spec, shared, users, batch, zero, **kwargs)
        for k in {**a_update, **a_users}:
            got = b_update.get(k, b_users.get(k))
            assert torch.equal(got, a_update.get(k, a_users.get(k))), k


def test_cross_device_update_shrinks_as_mu_grows_and_matches_the_reference(shoppers):
    norms = []
    for mu in (0.0, 0.3, 1.0, 3.0):  # lr·μ ≤ 0.9: each step pulls towards the global model
        update, _ = _device_round(shoppers, "gmf", mu)
        norms.append(_norm(update))
    assert norms == sorted(norms, reverse=True) and len(set(norms)) == 4, norms
    # The vectorised round's proximal term (touched rows and dense copies only) is the reference's
    # (every shared tensor) for both layouts.
    for layout in ("flat", "padded"):
        vec_update, vec_users = _device_round(shoppers, "gmf", 1.0, layout)
        ref_update, ref_users = _device_round(shoppers, "gmf", 1.0, reference=True)
        for k in ref_update:
            torch.testing.assert_close(vec_update[k], ref_update[k], rtol=1e-4, atol=1e-7)
        for k in ref_users:
            torch.testing.assert_close(vec_users[k], ref_users[k], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize("value", [-0.01, float("nan"), float("inf")])
def test_a_negative_or_non_finite_mu_is_refused(value):
    with pytest.raises(
        ConfigError, match=r"^\[federated\] proximal_mu must be a finite number ≥ 0"
    ):
        load_config(overrides={"federated.proximal_mu": value})


def test_mu_is_read_from_toml_and_refused_where_no_trainer_has_it(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[federated]\nproximal_mu = 0.01\n")
    config = load_config(path)
    assert config.federated.proximal_mu == 0.01
    from fedshop.fl.client import LocalTask

    assert LocalTask.of_run(config).proximal_mu == 0.01
    assert load_config().federated.proximal_mu == 0.0
    with pytest.raises(
        ConfigError, match=r"proximal_mu \(FedProx\) is not implemented with \[priv"
    ):
        load_config(
            path,
            overrides={
                "privacy.mode": "record", "privacy.noise_multiplier": 1.0,
                "model.silo_item_bias": False,
            },
        )  # fmt: skip
    with pytest.raises(ConfigError, match=r'not implemented with \[model\] name = "sasrec"'):
        load_config(path, overrides={"model.name": "sasrec", "data.dataset": "amazon-toys"})


# ---------------------------------------------------------------------------------------------
# End to end


def _tiny(retail_mode: str) -> dict:
    return {
        "federated.mode": retail_mode,
        "federated.rounds": 2,
        "federated.server_optimizer": "fedyogi",
        "federated.proximal_mu": 0.01,
        "federated.personalise_epochs": 0,
        "model.dim": 8,
        "eval.protocol": "sampled-100",
    }


def test_cross_silo_run_with_fedyogi_and_fedprox(retail, monkeypatch):
    import fedshop.fl.client as client
    from fedshop.fl.in_process import run_cross_silo

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("proximal_mu", 0.0))
        return train_bpr(*args, **kwargs)

    monkeypatch.setattr(client, "train_bpr", spy)
    config = load_config(overrides={**_tiny("cross-silo"), "federated.silos_per_round": 3})
    run = run_cross_silo(retail, config)
    assert type(run.server.optimizer) is FedYogi
    assert len(seen) == 6 and set(seen) == {0.01}  # 3 silos × 2 rounds, each with μ
    hr = run.history[-1].metrics["hr@10"]
    assert math.isfinite(hr) and 0.0 < hr <= 1.0


def test_cross_device_run_with_fedyogi_and_fedprox(retail, monkeypatch):
    import fedshop.fl.cross_device as cross_device
    from fedshop.fl.vectorised import vectorised_sum

    seen = []

    def spy(spec, shared, user_tables, batch, training, *args, **kwargs):
        seen.append(training.proximal_mu)
        return vectorised_sum(spec, shared, user_tables, batch, training, *args, **kwargs)

    monkeypatch.setattr(cross_device, "vectorised_sum", spy)
    overrides = {
        **_tiny("cross-device"),
        "federated.clients_per_round": 50,
        "federated.server_epsilon": 1e-8,
    }
    run = cross_device.run_cross_device(retail, load_config(overrides=overrides))
    assert seen == [0.01, 0.01]
    hr = run.history[-1].metrics["hr@10"]
    assert math.isfinite(hr) and 0.0 < hr <= 1.0


def test_tabular_silos_local_update_shrinks_as_mu_grows():
    """The retail tasks' trainer (fl/tabular_silo.py) has the term too, on a planted table."""
    from fedshop.fl.tabular_silo import head_of, init_shared, shape_of, train_tabular, training_of
    from test_retail_core import planted_dataset

    dataset = planted_dataset(sizes=(600, 200))
    run_config = load_config(overrides={"task": "fraud"})
    shape, head = shape_of(run_config, dataset), head_of(run_config, dataset)
    shared = init_shared(run_config, shape, "shared", "init")
    norms = []
    for mu in (0.0, 1.0, 10.0, 100.0):
        trained, _ = train_tabular(
            shared, head, dataset.silos[0].train, 3, training_of(run_config),
            torch.Generator().manual_seed(0), proximal_mu=mu,
        )  # fmt: skip
        norms.append(_norm({k: trained[k] - shared[k] for k in shared}))
    assert norms == sorted(norms, reverse=True) and len(set(norms)) == 4, norms
