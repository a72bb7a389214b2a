"""`fedshop train --task demand | returns | fraud`: each task's run end to end on its real table, as a
user runs it, with short settings (one or two rounds) so the suite stays fast; the measured results
are benchmarks/retail_tasks.py's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fedshop.cli import app
from fedshop.config import load_config
from fedshop.retail_experiment import run_retail_experiment
from fedshop.retail_tasks import load_retail, score_run
from fedshop.storage.ledger import BudgetExceededError, Ledger

runner = CliRunner()


def test_demand_run_folder_scores_every_method_and_the_inventory_policy(tmp_path):
    # statsforecast's per-series search takes a minute: tests/test_demand.py checks it apart.
    config = load_config("configs/demand.toml", overrides={"retail.statistical_baseline": False})
    (tmp_path / "demand.toml").write_text(config.to_toml())
    out = tmp_path / "demand"
    done = runner.invoke(
        app,
        ["train", "--config", str(tmp_path / "demand.toml"), "--rounds", "1", "--out", str(out)],
    )
    assert done.exit_code == 0, done.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "demand" and "best_statistical" not in metrics
    for method in ("federated", "centralized", "local_only", "seasonal_naive"):
        assert 0 < metrics[method]["wape"] < 3, method
        assert metrics[method]["inventory_cost"] > 0
        assert 0 < metrics[method]["fill_rate"] <= 1
    assert set(metrics["per_silo"]) >= {"United Kingdom", "Germany", "France"}
    # Bytes on the wire, as every task reports them: each storefront's, in the round and in all.
    (entry,) = metrics["history"]
    assert entry["traffic"]["source"] == "encoded"
    assert entry["traffic"]["parties"]["United Kingdom"]["sent"] > 0
    assert metrics["communication"]["bytes"]["sent"] == entry["traffic"]["sent"]
    curve = metrics["inventory"]["cost_curve"]
    # A dearer stock-out never makes the same policy cheaper.
    assert all(a <= b for a, b in zip(curve["federated"], curve["federated"][1:], strict=False))
    report = (out / "report.html").read_text()
    assert report.count("<svg") >= 2 and "Forecast against actual" in report
    verified = subprocess.run(
        [sys.executable, "-m", "fedshop", "audit", "verify", str(out)], capture_output=True
    )
    assert verified.returncode == 0, verified.stdout[-2000:]


def returns_config(ledger_url: str, **overrides):
    return load_config(
        "configs/returns.toml",
        overrides={"federated.rounds": 1, "privacy.ledger_url": ledger_url, **overrides},
    )


def test_returns_run_releases_the_quality_view_from_the_ledger(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    config = returns_config(url)
    table = load_retail(config)
    result = run_retail_experiment(config, table.dataset)
    scores = score_run(result, table)
    for method in ("federated", "centralized", "local_only"):
        summary = scores.methods[method]["summary"]
        assert summary["auc"] > 0.6, method  # a purchase line's return is learnable at all
        assert 0 < summary["auc_pr"] < 1
    quality = scores.blocks["quality"]
    assert quality["noise_seed_known"] is False  # privacy noise is secret unless asked otherwise
    assert quality["epsilon"] == pytest.approx(1.0, rel=1e-3)
    assert quality["top_items"] and all(
        q["low"] <= q["rate"] <= q["high"] for q in quality["top_items"]
    )
    # Every storefront paid ε for the view, once.
    ledger = Ledger(url)
    for storefront in quality["storefronts"]:
        assert ledger.balance(storefront, "online-retail").spent_epsilon == pytest.approx(
            quality["epsilon"]
        )


def test_returns_run_stops_before_training_when_the_view_would_overspend(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    with pytest.raises(BudgetExceededError, match="nothing was trained or released"):
        load_retail(returns_config(url, **{"privacy.budget": 0.5}))
    ledger = Ledger(url)
    assert ledger.balance("United Kingdom", "online-retail").spent_epsilon == 0
    with pytest.raises(BudgetExceededError, match=r"\[privacy\] budget"):
        load_retail(
            returns_config(f"sqlite:///{tmp_path / 'empty.sqlite'}", **{"privacy.budget": 0.0})
        )


def test_fraud_without_the_table_says_where_to_put_it(tmp_path):
    command = [
        sys.executable, "-m", "fedshop", "train", "--config", "configs/fraud.toml",
        "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2  # a user's mistake: one line, no traceback
    assert "ecommerce_fraud" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()
