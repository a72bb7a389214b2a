"""The command line as a user meets it: real subprocesses, real files."""

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from fedshop.errors import DataError
from fedshop.report.run_folder import INCOMPLETE, run_folder

FAST = ["--rounds", "2"]
FAST_TOML = """
seed = 5
[model]
dim = 8
[federated]
rounds = 2
personalise_epochs = 1
"""


def fedshop(*args, cwd=None, columns=None):
    # COLUMNS: the width rich lays tables out for when the output is not a terminal.
    env = {**os.environ, "COLUMNS": str(columns)} if columns else None
    return subprocess.run(
        [sys.executable, "-m", "fedshop", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
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
    result = fedshop("train", "--config", config, "--out", out, columns=80)
    assert result.returncode == 0, result.stderr
    assert "HR@10 per silo" in result.stdout
    # At 80 columns a country name stays on one line and no method name is cut.
    lines = result.stdout.splitlines()
    assert any("United Kingdom" in line and "2244" in line for line in lines), result.stdout
    assert any("centralized" in line and "local_only" in line for line in lines)
    # The closing `fedshop serve RUN` line is never wrapped (so that it copies as one command).
    table = [line for line in lines if not line.lstrip().startswith("fedshop serve ")]
    assert "…" not in result.stdout and max(map(len, table)) <= 80
    assert lines[-1].strip() == f"fedshop serve {out}"
    assert "left 0:00:00" in result.stdout  # the bars' time-left column, at the end of the run
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
    # The demo holds new shoppers out and says how a folded-in basket serves them.
    assert "New shoppers (cold start" in result.stdout
    assert json.loads((out / "metrics.json").read_text())["cold_start"]["customers"] > 200
    # It ends with the cross-border insight (released through the session's throwaway ledger),
    # then the one command that serves the run.
    assert "Cross-border insight: each of the 11 storefronts spent ε = 1" in result.stdout
    assert json.loads((out / "insight.json").read_text())["epsilon"] == pytest.approx(1, rel=1e-3)
    assert result.stdout.strip().splitlines()[-1].strip() == f"fedshop serve {out}"


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        ("[model]\nsize = 3\n", "unknown config key 'size'"),
        ("[federated]\nrounds = -1\n", "rounds must be at least 1"),
        ("[data]\npath = '/nonexistent/retail.xlsx'\n", "not found"),
        ("[eval]\ncold_start = 0.7\n", "cold_start must be in [0, 0.5]"),
        ('[data]\ndataset = "movielens-1m"\n[eval]\ncold_start = 0.1\n', "needs purchase days"),
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
    out = tmp_path / "runs" / "o"
    assert_one_line_error(fedshop("train", "--data-path", bad, "--out", out), "missing column")
    assert not (tmp_path / "runs").exists()  # no empty run folder left behind, nor its parent


def test_ctrl_c_says_so_and_leaves_no_run_folder(tmp_path):
    out = tmp_path / "runs" / "interrupted"
    command = [sys.executable, "-m", "fedshop", "train", "--rounds", "50", "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if "training interactions" in line:  # the data is loaded, training has begun
            break
    assert out.is_dir()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.strip()] == [
        "interrupted (Ctrl-C): stopped before the end"
    ]
    assert not (tmp_path / "runs").exists()


def test_an_unfinished_run_leaves_no_folder_or_one_marked_incomplete(tmp_path):
    with pytest.raises(DataError), run_folder(tmp_path / "a" / "b") as out:
        assert out.is_dir()
        raise DataError("bad file")
    assert not (tmp_path / "a").exists()

    kept = tmp_path / "kept"
    with pytest.raises(KeyboardInterrupt), run_folder(kept) as out:
        (out / "server.log").write_text("round 1\n")
        raise KeyboardInterrupt
    assert (kept / "server.log").is_file()
    assert "interrupted" in (kept / INCOMPLETE).read_text()
    with run_folder(kept) as out:  # a finished run in the same folder is no longer incomplete
        (out / "metrics.json").write_text("{}")
    assert not (kept / INCOMPLETE).exists()

    # An earlier complete run, overwritten by a run that fails before writing: not marked.
    with pytest.raises(DataError), run_folder(kept, overwrite=True):
        raise DataError("bad file")
    assert not (kept / INCOMPLETE).exists() and (kept / "metrics.json").is_file()


def test_unknown_option_is_a_usage_error():
    result = fedshop("train", "--colour", "red")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "No such option" in result.stderr


def test_help_lists_the_commands():
    result = fedshop("--help")
    assert result.returncode == 0
    assert "demo" in result.stdout and "train" in result.stdout


def test_the_cli_imports_no_heavy_library():
    """`fedshop --help` and one-line errors answer at once: the libraries that take seconds to
    import are imported by the commands that use them."""
    heavy = (
        "torch",
        "dp_accounting",
        "matplotlib",
        "flwr",
        "pandas",
        "scipy",
        "fedshop.experiment",
    )
    code = f"import fedshop.cli, sys; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]"


def test_deploy_offers_only_the_protections_it_accepts(tmp_path):
    from fedshop.choices import choices

    shown = fedshop("deploy", "local", "--help", columns=200)
    line = next(line for line in shown.stdout.splitlines() if "--protection" in line)
    assert choices("protection", tag="deploy") == ("none", "secagg")
    assert "none or secagg" in line
    assert "ckks" not in shown.stdout and "paillier" not in shown.stdout
    refused = fedshop("deploy", "local", "--protection", "ckks", "--out", tmp_path / "o")
    assert_one_line_error(refused, "ckks needs a key-holder party")
    assert not (tmp_path / "o").exists()


def test_deploy_commands_are_printed_unbroken_at_80_columns():
    from fedshop.cli import print_commands
    from fedshop.deploy.processes import commands

    text = commands(4, "superlink.example.com")
    assert max(map(len, text.splitlines())) > 80  # some would be broken by wrapping
    printed = io.StringIO()
    print_commands(Console(file=printed, width=80), text)
    assert set(text.splitlines()) <= set(printed.getvalue().splitlines())


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--epsilon", "0"], "--epsilon must be greater than 0, got 0"),
        (["--dp", "record", "--epsilon", "0"], "--epsilon must be greater than 0, got 0"),
        (["--dp", "record", "--epsilon", "-1"], "--epsilon must be greater than 0, got -1"),
        (["--dp", "record", "--noise-multiplier", "0"], "--noise-multiplier must be greater"),
        (["--dp", "record", "--epsilon", "1", "--delta", "0"], "--delta must be between 0 and 1"),
        (["--delta", "1"], "--delta must be between 0 and 1"),
        (["--dp", "record", "--epsilon", "1", "--clip", "0"], "--clip must be greater than 0"),
        (["--budget", "-1"], "--budget must be at least 0"),
        (["--epsilon", "2"], 'epsilon is set but mode = "none"'),
        (["--dp", "record", "--epsilon", "1", "--noise-seed", "0"], "--noise-seed must be a"),
    ],
)
def test_privacy_values_that_mean_nothing_are_refused(tmp_path, options, fragment):
    out = tmp_path / "o"
    result = fedshop("train", *options, "--out", out)
    assert result.returncode == 2
    assert_one_line_error(result, fragment)
    assert not out.exists()


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
    long_name = fedshop(
        "privacy", "budget", "United Kingdom", "amazon-sequential", "--epsilon", "4", "--delta",
        "1.25e-05",
    )  # fmt: skip
    assert long_name.returncode == 0, long_name.stderr
    shown = fedshop("privacy", "ledger", columns=80)
    assert shown.returncode == 0 and "Germany" in shown.stdout
    # At 80 columns no name or number is cut or broken over two lines.
    assert "…" not in shown.stdout
    for text in ("amazon-sequential", "United Kingdom", "1.25e-05", "online-retail"):
        assert text in shown.stdout
    assert_one_line_error(fedshop("privacy", "reset"), "--yes")
    assert fedshop("privacy", "reset", "--yes").returncode == 0


def test_a_dp_run_with_a_known_noise_seed_says_it_is_not_private(tmp_path):
    config = tmp_path / "dp.toml"
    config.write_text('methods = ["federated"]\n' + FAST_TOML.replace("rounds = 2", "rounds = 1"))
    out = tmp_path / "run"
    result = fedshop(
        "train", "--config", config, "--dp", "record", "--noise-multiplier", "1", "--budget",
        "1000", "--ledger", f"sqlite:///{tmp_path / 'ledger.sqlite'}", "--noise-seed", "9",
        "--out", out, columns=200,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Not private: noise seed known" in result.stdout
    assert "customers of all" in result.stdout  # whom δ was sized to
    privacy = json.loads((out / "metrics.json").read_text())["privacy"]
    assert privacy["noise_seed_known"] is True and "customers of all" in privacy["delta_population"]
    assert "noise_seed = 9" in (out / "config.toml").read_text()
    assert "not private: noise seed known" in (out / "report.html").read_text()
