"""Differential privacy wired into training: the clip equals the pipeline's, ε is reported and written
to the ledger ahead of each release, budgets refuse runs before training, noise reaches every row."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedshop.attacks.membership import attack_auc, hold_out_users
from fedshop.config import PrivacyConfig, load_config
from fedshop.data.datasets import load_dataset
from fedshop.errors import ConfigError
from fedshop.experiment import open_privacy, record_level_plan, run_experiment
from fedshop.fl.cross_device import eligible_clients, run_cross_device
from fedshop.fl.local_round import LocalTraining, draw_round, reference_round
from fedshop.fl.vectorised import vectorised_sum
from fedshop.messages import AggregationPipeline, mean_of
from fedshop.models.spec import get_model
from fedshop.privacy.dp import resolve_delta
from fedshop.privacy.noise import ClipUpdate
from fedshop.seeding import torch_generator
from fedshop.storage.ledger import BudgetExceededError, Ledger

DEVICE = {
    "data.dataset": "movielens-100k",
    "federated.mode": "cross-device",
    "methods": ["federated"],
    "model.dim": 8,
    "federated.personalise_epochs": 0,
    "eval.eval_every": 100,
}


@pytest.fixture(scope="module")
def ml100k(data_dir):
    return load_dataset(load_config(overrides={**DEVICE}).data, seed=0)


def _ledger(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.sqlite'}"


@pytest.mark.parametrize("name", ["mf-bpr", "neumf"])
def test_vectorised_clip_equals_the_pipeline_clip_stage(retail, name):
    train = retail.train[eligible_clients(retail.train)[:40].numpy()]
    spec = get_model(name)
    model = load_config(overrides={"model.name": name, "model.dim": 8}).model
    shared = spec.init_shared(train.shape[1], model, torch.Generator().manual_seed(1))
    users = spec.init_users(train.shape[0], model, torch.Generator().manual_seed(2))
    training = LocalTraining(epochs=2, learning_rate=0.5, l2=0.01, negatives=2)
    clients = torch.arange(0, 40, 3)
    batch = draw_round(train, clients, 2, 2, torch.Generator().manual_seed(3))
    clip = 0.05  # below most clients' update norms, so clipping is really exercised
    pipeline = AggregationPipeline(client_stages=(ClipUpdate(clip),))
    expected, _ = reference_round(spec, shared, users, batch, training, pipeline)
    total, _ = vectorised_sum(spec, shared, users, batch, training, clip=clip)
    assert total.weight == len(clients)  # every client weighs 1 under DP
    for k, v in mean_of(total).items():
        torch.testing.assert_close(v, expected[k], rtol=1e-4, atol=1e-8)


def test_user_level_run_reports_epsilon_and_writes_every_round_ahead(ml100k, tmp_path):
    config = load_config(
        overrides={
            **DEVICE, "federated.rounds": 3, "privacy.mode": "user", "privacy.epsilon": 4.0,
            "privacy.budget": 10.0, "privacy.ledger_url": _ledger(tmp_path),
        }
    )  # fmt: skip
    result = run_experiment(config, ml100k)
    privacy = result.privacy
    assert 3.9 < privacy.epsilon <= 4.0 + 1e-9  # calibrated to the target, never above it
    assert privacy.delta == pytest.approx(1 / (10 * 943))
    assert privacy.delta_population == "943 shoppers" and privacy.protected_units == 943
    assert "shopper" in privacy.unit and privacy.accountant == "rdp"
    epsilons = [record.epsilon for record in result.history]
    assert epsilons == sorted(epsilons) and epsilons[-1] == privacy.epsilon
    balances = Ledger(_ledger(tmp_path)).balances()
    assert {b.silo for b in balances} == set(ml100k.silo_names)
    for balance in balances:
        assert balance.spent_epsilon == pytest.approx(privacy.epsilon)
        assert balance.budget_epsilon == 10.0 and balance.runs == 1


def test_noise_reaches_rows_that_no_client_touched(ml100k, tmp_path):
    few = {**DEVICE, "federated.rounds": 1, "federated.clients_per_round": 5}
    plain = run_cross_device(ml100k, load_config(overrides=few)).shared["item_embedding"]
    config = load_config(
        overrides={
            **few, "privacy.mode": "user", "privacy.noise_multiplier": 1.0,
            "privacy.budget": 1e6, "privacy.ledger_url": _ledger(tmp_path),
        }
    )  # fmt: skip
    noisy = run_cross_device(ml100k, config, guard=open_privacy(config, ml100k)).shared[
        "item_embedding"
    ]
    start = get_model("mf-bpr").init_shared(
        ml100k.n_items, config.model, torch_generator(config.seed, "shared", "init")
    )["item_embedding"]
    # Without DP only the rows of the ~5 sampled shoppers' items move; with DP every row carries
    # noise, or the update would reveal which items the sampled shoppers had.
    assert (plain != start).any(1).float().mean() < 0.5
    assert (noisy != start).any(1).all()


def test_a_run_over_budget_is_refused_before_training(tmp_path, data_dir):
    ledger = _ledger(tmp_path)
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "fedshop", "train", "--dataset", "movielens-100k",
        "--mode", "cross-device", "--rounds", "2", "--dp", "user", "--epsilon", "2",
        "--budget", "1", "--ledger", ledger, "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "budget ε = 1" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "metrics.json").exists()
    assert all(b.spent_epsilon == 0 for b in Ledger(ledger).balances())


def test_budget_spent_by_earlier_runs_counts(ml100k, tmp_path):
    overrides = {
        **DEVICE, "federated.rounds": 1, "privacy.mode": "user", "privacy.epsilon": 3.0,
        "privacy.budget": 5.0, "privacy.ledger_url": _ledger(tmp_path),
    }  # fmt: skip
    run_experiment(load_config(overrides=overrides), ml100k)
    with pytest.raises(BudgetExceededError, match="budget ε = 5"):
        run_experiment(load_config(overrides=overrides), ml100k)
    # A run cannot raise the budget the ledger holds.
    with pytest.raises(BudgetExceededError, match="fedshop privacy budget"):
        run_experiment(load_config(overrides={**overrides, "privacy.budget": 50.0}), ml100k)


def test_record_level_run_on_storefronts(retail, tmp_path):
    config = load_config(
        overrides={
            "methods": ["federated"], "model.dim": 8, "federated.rounds": 1,
            "federated.personalise_epochs": 0, "privacy.mode": "record", "privacy.epsilon": 8.0,
            "privacy.local_steps": 2, "privacy.budget": 20.0,
            "privacy.ledger_url": _ledger(tmp_path),
        }
    )  # fmt: skip
    assert config.model.silo_item_bias is False  # off by default under DP
    result = run_experiment(config, retail)
    privacy = result.privacy
    assert "customer of a silo" in privacy.unit and 7.9 < privacy.epsilon <= 8.0 + 1e-9
    assert privacy.steps == 2
    # δ is sized to every silo's customers together, not to the largest silo's.
    assert privacy.delta == pytest.approx(1 / (10 * retail.n_users))
    assert privacy.protected_units == retail.n_users
    assert privacy.delta_population == (
        f"{retail.n_users:,} customers of all {retail.n_silos} silos"
    )
    for balance in Ledger(_ledger(tmp_path)).balances():
        assert balance.spent_epsilon == pytest.approx(privacy.epsilon)
    assert np.isfinite(result.methods["federated"].summary["hr@10"])


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (
            {"privacy.mode": "user", "privacy.epsilon": 1.0},
            'needs [federated] mode = "cross-device"',
        ),
        (
            {"privacy.mode": "record", "privacy.epsilon": 1.0, "federated.mode": "cross-device"},
            'needs [federated] mode = "cross-silo"',
        ),
        ({"privacy.epsilon": 1.0}, 'mode = "none"'),
        ({"privacy.mode": "record"}, "exactly one of epsilon"),
        (
            {"privacy.mode": "record", "privacy.epsilon": 1.0, "privacy.noise_multiplier": 1.0},
            "exactly one of epsilon",
        ),
        (
            {"privacy.mode": "record", "privacy.epsilon": 1.0, "model.silo_item_bias": True},
            "silo_item_bias",
        ),
        ({"privacy.sampling_rate": 0.0}, "sampling_rate"),
    ],
)
def test_privacy_config_is_validated(overrides, fragment):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=overrides)
    assert fragment in str(error.value)


def test_delta_at_or_above_one_over_n_is_refused():
    assert resolve_delta(PrivacyConfig(mode="user", epsilon=1.0), 1000) == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="not below 1/n"):
        resolve_delta(PrivacyConfig(mode="user", epsilon=1.0, delta=1e-3), 1000)


def test_record_level_delta_is_sized_to_all_silos_customers():
    """Each silo's DP-SGD may fail one of its customers with probability δ; sized to the largest
    silo, δ over S silos would tolerate about S/10 customers' data published outright."""
    silos = [400, 300, 200, 100]
    overrides = {"privacy.mode": "record", "privacy.noise_multiplier": 1.0}
    plan = record_level_plan(load_config(overrides=overrides), silos)
    assert plan.delta <= 1 / (10 * sum(silos))
    assert plan.units == 1000
    assert plan.describe()["delta_population"] == "1,000 customers of all 4 silos"
    # A δ below one over the largest silo but not below one over all customers is refused.
    loose = load_config(overrides={**overrides, "privacy.delta": 1 / 500})
    with pytest.raises(ConfigError, match="not below 1/n"):
        record_level_plan(loose, silos)


def test_membership_split_and_attack_auc(ml100k):
    split = hold_out_users(ml100k, 0.1, seed=3)
    assert split.dataset.n_users == ml100k.n_users - split.nonmember_train.shape[0]
    assert split.nonmember_train.shape[0] == len(split.members) == 94
    assert split.member_train.nnz > 0 and split.nonmember_train.nnz > 0
    kept = set(split.dataset.user_ids.tolist())
    held = set(ml100k.user_ids.tolist()) - kept
    assert len(held) == 94
    assert attack_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert attack_auc(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.5


def test_privacy_sweep_writes_json_and_report(tmp_path, data_dir):
    config = tmp_path / "sweep.toml"
    config.write_text(
        "[model]\ndim = 8\n[federated]\nrounds = 2\npersonalise_epochs = 1\n[eval]\neval_every = 10\n"
    )
    out = tmp_path / "sweep"
    command = [
        sys.executable, "-m", "fedshop", "privacy", "sweep", "--config", str(config),
        "--dataset", "movielens-100k", "--mode", "cross-device", "--protocol", "sampled-100",
        "--epsilons", "4", "--budget", "10", "--ledger", _ledger(tmp_path), "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    sweep = json.loads((out / "sweep.json").read_text())
    assert "shopper" in sweep["unit"]
    assert [p["target_epsilon"] for p in sweep["points"]] == [4.0, None]
    private, public = sweep["points"]
    assert private["epsilon"] <= 4.0 + 1e-9 and public["epsilon"] is None
    for point in sweep["points"]:
        assert 0.0 <= point["mia_auc"] <= 1.0 and 0.0 < point["hr@10"] <= 1.0
    assert "popularity" in sweep and sweep["noise_seed_known"] is False
    report = (out / "report.html").read_text()
    assert "<svg" in report and "membership" in report.lower()


def test_privacy_mistakes_on_the_command_line_are_one_clear_line(tmp_path):
    command = [sys.executable, "-m", "fedshop", "train", "--epsilon", "1", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # The section name survives the terminal markup ("[privacy]" is not a colour tag).
    assert '[privacy] epsilon is set but mode = "none"' in result.stderr
