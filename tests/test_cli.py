"""The command line as a user meets it: real subprocesses, real files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

FAST = ["--rounds", "2"]
FAST_TOML = """
seed = 5
[model]
dim = 8
[federated]
rounds = 2
personalise_epochs = 1
"""


def fedshop(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "fedshop", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def assert_one_line_error(result, fragment):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0]


def test_train_writes_a_complete_run_folder(tmp_path):
    config = tmp_path / "quick.toml"
    config.write_text(FAST_TOML)
    out = tmp_path / "run"
    result = fedshop("train", "--config", config, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "HR@10 per silo" in result.stdout
    for name in ("config.toml", "data_report.json", "metrics.json", "report.html", "catalogue.csv"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    for method in ("federated", "centralized", "local_only", "popularity"):
        assert {"hr@10", "ndcg@10", "recall@20", "silo_mean_hr@10", "users"} <= set(metrics[method])
    assert metrics["seed"] == 5 and metrics["rounds"] == 2
    assert "United Kingdom" in metrics["per_silo"]
    assert set(metrics["per_silo"]["Germany"]) == {
        "federated",
        "centralized",
        "local_only",
        "popularity",
    }
    assert len(metrics["history"]) == 2
    assert (out / "models" / "federated" / "shared.safetensors").is_file()
    assert (out / "models" / "federated" / "silo-germany.safetensors").is_file()
    assert (out / "models" / "centralized.safetensors").is_file()
    html = (out / "report.html").read_text()
    assert "<svg" in html and "Per silo" in html
    # The resolved config reproduces the run.
    assert "rounds = 2" in (out / "config.toml").read_text()

    again = fedshop("train", "--config", config, "--out", out)
    assert_one_line_error(again, "already holds a run")


def test_demo_runs_on_the_embedded_data(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    result = fedshop("demo", "--out", out, *FAST, "--seed", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "data_report.json").read_text())
    assert report["source"].startswith("embedded")
    assert "Full-ranking results" in result.stdout


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        ("[model]\nsize = 3\n", "unknown config key 'size'"),
        ("[federated]\nrounds = -1\n", "rounds must be at least 1"),
        ("[data]\npath = '/nonexistent/retail.xlsx'\n", "not found"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, toml, fragment):
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    assert_one_line_error(fedshop("train", "--config", config, "--out", tmp_path / "o"), fragment)


def test_missing_config_and_wrong_columns(tmp_path):
    assert_one_line_error(fedshop("train", "--config", tmp_path / "absent.toml"), "not found")
    bad = tmp_path / "bad.csv"
    bad.write_text("InvoiceNo,StockCode\n1,2\n")
    assert_one_line_error(
        fedshop("train", "--data-path", bad, "--out", tmp_path / "o"), "missing column"
    )


def test_unknown_option_is_a_usage_error():
    result = fedshop("train", "--colour", "red")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "No such option" in result.stderr


def test_help_lists_the_commands():
    result = fedshop("--help")
    assert result.returncode == 0
    assert "demo" in result.stdout and "train" in result.stdout


def test_run_folder_path_that_is_a_file(tmp_path):
    target = tmp_path / "afile"
    target.write_text("x")
    assert_one_line_error(fedshop("demo", "--out", target, *FAST), "not a folder")


def test_readme_commands_exist():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "fedshop demo" in readme
    assert "python -m pytest" in readme


def test_train_cross_device_on_another_dataset_with_the_sampled_protocol(tmp_path, data_dir):
    config = tmp_path / "device.toml"
    config.write_text('methods = ["federated", "popularity"]\n' + FAST_TOML)
    out = tmp_path / "ml100k"
    result = fedshop(
        "train", "--config", config, "--dataset", "movielens-100k", "--mode", "cross-device",
        "--protocol", "sampled-100", "--model", "gmf", "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Sampled-100 results" in result.stdout and "cross-device" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] == "movielens-100k" and metrics["protocol"] == "sampled-100"
    assert metrics["mode"] == "cross-device" and metrics["model"] == "gmf"
    assert {"federated", "popularity"} <= set(metrics) and "centralized" not in metrics
    assert metrics["history"][0]["clients"] == 943  # every user a client, all sampled
    # Chance is about 10/101 with one held-out item among 101 candidates.
    assert metrics["popularity"]["hr@10"] > 0.2
    report = (out / "report.html").read_text()
    assert "sampled-100" in report and "MovieLens 100K" in report
    resolved = (out / "config.toml").read_text()
    assert 'server_optimizer = "fedadam"' in resolved  # the cross-device defaults, written down


def test_unknown_dataset_and_missing_sequential_path_are_one_line_errors(tmp_path):
    assert_one_line_error(fedshop("train", "--dataset", "netflix"), "dataset")
    assert_one_line_error(fedshop("train", "--dataset", "amazon-sequential"), "path")


def test_privacy_ledger_commands(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSHOP_LEDGER_URL", f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    set_budget = fedshop(
        "privacy", "budget", "Germany", "online-retail", "--epsilon", "8", "--delta", "1e-5"
    )
    assert set_budget.returncode == 0, set_budget.stderr
    shown = fedshop("privacy", "ledger")
    assert shown.returncode == 0 and "Germany" in shown.stdout
    assert_one_line_error(fedshop("privacy", "reset"), "--yes")
    assert fedshop("privacy", "reset", "--yes").returncode == 0
