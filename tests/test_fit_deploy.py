"""Fit prediction deployed (`fedshop deploy local` with `task = "fit"`): each shop a SuperNode with
its own records only, the simulator's model, and fit counts checked as they cross the wire.

The deployment (8 shops, 2 rounds) takes over two minutes on 2 cores: its tests are `slow`
(conftest: they run under CI=true or FEDSHOP_SLOW=1)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from safetensors.torch import load_file

from deployed_runs import deploy_local, verified_audit
from fedshop.config import load_config
from fedshop.data.fit_feedback import load_fit_dataset
from fedshop.data.partition import slug
from fedshop.deploy import wire
from fedshop.deploy.silo_files import read_fit_silo_file
from fedshop.eval.fit_metrics import BINS, FitCounts
from fedshop.fl.fit_silo import run_fit_federated

FIT = {
    "task": "fit", "data.dataset": "renttherunway", "fit.max_shoppers": 2000,
    "fit.methods": ["federated"], "federated.rounds": 2,
}  # fmt: skip


@pytest.fixture(scope="module")
def deployed(data_dir, nginx, tmp_path_factory):
    """One real deployment through the CLI, as an operator runs it: `--config fit.toml`."""
    config = load_config(overrides={**FIT, "data.data_dir": str(data_dir)})
    out, stdout = deploy_local(config, tmp_path_factory.mktemp("fit-deploy"), timeout=900)
    dataset = load_fit_dataset(config.data, config.fit, config.seed)
    return config, dataset, out, stdout


@pytest.mark.slow
def test_deployed_fit_model_is_the_simulators(deployed):
    config, dataset, out, stdout = deployed
    simulated = run_fit_federated(dataset, config)
    shared = load_file(str(out / "models" / "federated" / "shared.safetensors"))
    assert set(shared) == set(simulated.server.shared)
    for name, value in simulated.server.shared.items():
        torch.testing.assert_close(shared[name], value, rtol=0, atol=1e-5)
    # The rounds' and the final metrics too: the shops evaluated with the same private state.
    metrics = json.loads((out / "metrics.json").read_text())
    for deployed_round, simulated_round in zip(metrics["history"], simulated.history, strict=True):
        assert deployed_round["auc_macro"] == pytest.approx(simulated_round.metrics["auc_macro"])
    final = {name: counts.means()["auc_macro"] for name, counts in simulated.final.items()}
    per_silo = {name: m["federated"]["auc_macro"] for name, m in metrics["per_silo"].items()}
    assert per_silo == pytest.approx(final, nan_ok=True)
    outcome = json.loads((out / "deployment" / "server" / "outcome.json").read_text())
    assert outcome["task"] == "fit" and set(outcome["per_silo"]) == set(dataset.silo_names)
    assert outcome["summary"]["auc_macro"] == pytest.approx(metrics["federated"]["auc_macro"])
    assert "auc_macro" in stdout and (out / "report.html").exists()
    assert f"--silos {dataset.n_silos}" in stdout  # the commands for separate hosts, one per shop


@pytest.mark.slow
def test_each_shop_file_holds_only_its_own_records(deployed):
    _, dataset, out, _ = deployed
    for silo in dataset.silos:
        data, meta = read_fit_silo_file(out / "deployment" / "silos" / f"silo-{silo.index}.npz")
        assert meta["index"] == silo.index and data.name == silo.name
        # Its own customers, by their own ids, and their measurements only.
        assert (data.silo.users == dataset.user_ids[silo.users]).all()
        assert (data.measurements == dataset.measurements[silo.users]).all()
        for split in ("train", "validation", "test"):
            mine, kept = getattr(silo, split), getattr(data.silo, split)
            assert (kept.user == dataset.user_ids[mine.user]).all()
            assert (kept.product == mine.product).all() and (kept.label == mine.label).all()
            assert np.isin(kept.user, data.silo.users).all()
        assert (data.product_item == dataset.product_item).all()  # the public catalogue


@pytest.mark.slow
def test_a_deployed_fit_run_keeps_an_audit_log_that_verifies(deployed):
    """The server's log closed in the run folder: every shop's key from its hello, its
    acknowledgements, its signed record of its own weights file; verified with the shops' keys."""
    _, dataset, out, _ = deployed
    verified = verified_audit(out, dataset.n_silos)
    for silo in dataset.silos:  # each shop vouches for its own weights file
        path = f"models/federated/silo-{slug(silo.name)}.safetensors"
        assert verified.signed_by[path] == silo.name
    assert verified.signed_by["models/federated/shared.safetensors"] == "server"


def _reply(counts: dict, silo: int = 1) -> RecordDict:
    return RecordDict({"metrics": ConfigRecord({"silo": silo, **counts})})


def test_fit_counts_cross_the_wire_and_malformed_ones_are_refused():
    rng = np.random.default_rng(0)
    counts = FitCounts.of(rng.dirichlet(np.ones(3), 50), rng.integers(0, 3, 50))
    decoded = wire.record_fit_counts(RecordDict({"metrics": wire.fit_counts_config(1, counts)}), 1)
    assert (decoded.confusion == counts.confusion).all()
    assert (decoded.histograms == counts.histograms).all()
    good = {"confusion": [0] * 9, "histograms": [0] * (3 * 2 * BINS)}
    malformed = {
        "short": {**good, "confusion": [0] * 8},
        "negative": {**good, "confusion": [-1] + [0] * 8},
        "fractions": {**good, "confusion": [0.5] * 9},
        "missing": {"confusion": [0] * 9},
    }
    for reason, content in malformed.items():
        with pytest.raises(wire.BadReplyError, match="malformed fit counts"):
            wire.record_fit_counts(_reply(content), 1)
            pytest.fail(reason)
    with pytest.raises(wire.BadReplyError, match="claimed for silo 2"):
        wire.record_fit_counts(_reply(good, silo=2), 1)
