"""`fedshop vertical`: the run folder, and bad input answered in one line (never a traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fedshop.errors import FedShopError
from fedshop.secure.psi import psi_available
from fedshop.vertical.scenario import PartyTable, Scenario
from fedshop.vertical.settings import VerticalConfigError, load_vertical_config
from fedshop.vertical.simulate import VerticalSettings, align_by_psi, build_scenario

needs_psi = pytest.mark.skipif(not psi_available("rr22"), reason="spu is not installed")


def fedshop(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "fedshop", *map(str, args)],
        capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})},
    )  # fmt: skip


def one_line_error(result, fragment: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert fragment in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr


@needs_psi
def test_simulate_writes_a_run_folder_with_every_block(data_dir, tmp_path):
    out = tmp_path / "run"
    result = fedshop(
        "vertical", "simulate", "--max-customers", "3000", "--rounds", "2", "--out", out,
        env={"FEDSHOP_DATA_DIR": str(data_dir)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    for block in ("joint", "label_holder_only", "centralized"):
        assert 0.0 <= metrics[block]["macro_auc"] <= 1.0
        assert 0.0 <= metrics[block]["accuracy"] <= 1.0
    psi = metrics["psi"]
    assert psi["protocol"] == "rr22" and psi["aligned_customers"] > 0
    assert psi["with"]["partner"]["bytes_label_to_feature"] > 0
    protection = metrics["protection"]
    assert "attacks" in protection["unprotected"] and "epsilon" in protection["protected"]
    assert (out / "report.html").read_text().count("macro AUC") >= 1
    assert "[psi]" in (out / "config.toml").read_text()
    for path in out.iterdir():
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"


@pytest.mark.parametrize(
    "toml, fragment",
    [
        ("[psi]\nprotocol = 'magic'\n", "psi.protocol must be one of"),
        ("[scenario]\nfractions = [0.5, 0.0, 0.5]\n", "B (customers of both) must not be 0"),
        ("[scenario]\nfractions = [0.5, 0.6, 0.5]\n", "sum to 1"),
        ("[split]\nroundz = 3\n", "[split]"),
        ("[protection]\ngradient_noise = -1.0\n", "must not be negative"),
        ("[psi]\nreveal_to = 'label'\n", 'psi.reveal_to = "both"'),
        ("seed = 'x'\n", "seed must be an integer"),
        ("[scenario\n", "not valid TOML"),
    ],
)
def test_bad_configs_are_one_line_errors(tmp_path, toml, fragment):
    config = tmp_path / "v.toml"
    config.write_text(toml)
    one_line_error(
        fedshop("vertical", "simulate", "--config", config, "--out", tmp_path / "out"), fragment
    )
    assert not (tmp_path / "out").exists()


def test_local_refuses_a_message_based_psi(tmp_path):
    config = tmp_path / "v.toml"
    config.write_text("[psi]\nprotocol = 'openmined'\n")
    one_line_error(
        fedshop("vertical", "local", "--config", config, "--out", tmp_path / "out"),
        "direct link",
    )


def test_the_config_round_trips_through_toml(tmp_path):
    config = load_vertical_config(
        None, {"psi.protocol": "kkrt", "split.rounds": 7, "protection.gradient_clip": 0.3}
    )
    path = tmp_path / "again.toml"
    path.write_text(config.to_toml())
    again = load_vertical_config(path)
    assert again == config and again.plan.rounds == 7 and again.plan.gradient_clip == 0.3
    with pytest.raises(VerticalConfigError, match="belong in \\[protection\\]"):
        load_vertical_config(None, {"split.gradient_clip": 0.3})


@needs_psi
def test_an_empty_and_a_total_intersection(data_dir):
    settings = VerticalSettings(data_dir=str(data_dir), max_customers=1500)
    scenario = build_scenario(settings, 1)
    # Every platform customer is also the partner's (and only those): the total intersection.
    label_ids = scenario.label.ids
    partner = scenario.features[0]
    frame = partner.frame[partner.frame["user_id"].isin(label_ids)]
    missing = np.setdiff1d(label_ids, frame["user_id"].to_numpy())
    total = Scenario(scenario.label, (PartyTable(partner.name, frame, partner.columns),))
    block, aligned = align_by_psi(total, "rr22")
    assert len(aligned) == len(label_ids) - len(missing) == block["aligned_customers"]
    # Ids from another numbering (no customer in common): the intersection is empty, and a run
    # on it is refused with a reason instead of training on nothing.
    shifted = partner.frame.assign(user_id=partner.frame["user_id"] + 10**12)
    empty = Scenario(scenario.label, (PartyTable(partner.name, shifted, partner.columns),))
    block, aligned = align_by_psi(empty, "rr22")
    assert len(aligned) == 0 and block["with"][partner.name]["intersection_size"] == 0
    from fedshop.vertical.simulate import run_vertical

    with pytest.raises(FedShopError, match="no customer"):
        run_vertical(settings, seed=1, psi_intersection=aligned)
