"""The retail tasks deployed (`fedshop deploy local` with `task = "returns"`, likewise "fraud" and
"demand"): each storefront a SuperNode with its own table rows only, the simulator's network and
round driver, and the storefronts' counts checked as they cross the wire.

The deployment (one SuperNode per storefront, 2 rounds) takes minutes on 2 cores: its tests are
`slow` (conftest: they run under CI=true or FEDSHOP_SLOW=1). The silo files and the wire are
checked here on a planted table (tests/test_retail_core.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from safetensors.torch import load_file

from deployed_runs import deploy_local, verified_audit
from fedshop.config import load_config
from fedshop.data.tabular import TabularDataset, TabularPart, TabularSilo
from fedshop.deploy import wire
from fedshop.deploy.outcome import Outcome
from fedshop.deploy.server_app import hello_shapes
from fedshop.deploy.silo_app import SiloNode
from fedshop.deploy.silo_files import (
    SiloFileError,
    read_any_silo_file,
    read_table_silo_file,
    write_table_silo_file,
)
from fedshop.deploy.silo_policy import SiloPolicy, policy_path
from fedshop.eval.tabular_metrics import BINS, BinaryCounts, ForecastSums
from fedshop.fl.client import LocalTask
from fedshop.fl.tabular_silo import (
    TableSchema,
    TabularSiloClient,
    head_of,
    init_shared,
    run_tabular_federated,
    shape_of,
    tabular_pipeline,
)
from fedshop.report.retail_counts import score_counts
from fedshop.retail_tasks import load_retail_dataset
from fedshop.secure.protected_sum import ProtectionSummary
from test_retail_core import planted_dataset

# Return risk on Online Retail, which every machine has (the fraud table is not shipped). The
# deployment runs one SuperNode per storefront: at most 4 here, the smallest countries merged
# (`[data] max_silos`), since 16 SuperNodes on 2 cores crowd the SuperLink.
FRAUD = {"task": "fraud", "federated.rounds": 2, "retail.methods": ["federated"]}  # planted tables
DEPLOYED = {
    "task": "returns", "federated.rounds": 2, "retail.methods": ["federated"],
    "data.max_silos": 4,
}  # fmt: skip


@pytest.fixture(scope="module")
def deployed(data_dir, nginx, tmp_path_factory):
    """One real deployment through the CLI, as an operator runs it: `--config returns.toml`."""
    config = load_config(overrides={**DEPLOYED, "data.data_dir": str(data_dir)})
    out, stdout = deploy_local(config, tmp_path_factory.mktemp("returns-deploy"), timeout=1500)
    return config, load_retail_dataset(config), out, stdout


@pytest.mark.slow
def test_deployed_returns_network_is_the_simulators(deployed):
    config, dataset, out, stdout = deployed
    simulated = run_tabular_federated(dataset, config)
    shared = load_file(str(out / "models" / "federated" / "shared.safetensors"))
    assert set(shared) == set(simulated.server.shared)
    for name, value in simulated.server.shared.items():
        torch.testing.assert_close(shared[name], value, rtol=0, atol=1e-5)
    # The rounds' and the final metrics too: the same counts from the same network.
    metrics = json.loads((out / "metrics.json").read_text())
    for deployed_round, simulated_round in zip(metrics["history"], simulated.history, strict=True):
        assert deployed_round["auc_pr"] == pytest.approx(simulated_round.metrics["auc_pr"])
    final = {name: counts.metrics()["auc_pr"] for name, counts in simulated.final.items()}
    per_silo = {name: m["federated"]["auc_pr"] for name, m in metrics["per_silo"].items()}
    assert per_silo == pytest.approx(final, nan_ok=True)
    outcome = json.loads((out / "deployment" / "server" / "outcome.json").read_text())
    assert outcome["task"] == "returns" and set(outcome["per_silo"]) == set(dataset.silo_names)
    assert outcome["summary"]["auc_pr"] == pytest.approx(metrics["federated"]["auc_pr"])
    assert metrics["scored_from"].startswith("each storefront's counts")
    assert "auc_pr" in stdout and (out / "report.html").exists()
    assert f"--silos {dataset.n_silos}" in stdout  # the commands for separate hosts


@pytest.mark.slow
def test_each_storefront_file_holds_only_its_own_rows(deployed):
    _, dataset, out, _ = deployed
    for silo in dataset.silos:
        data, meta = read_table_silo_file(out / "deployment" / "silos" / f"silo-{silo.index}.npz")
        assert meta["index"] == silo.index and data.name == silo.name
        for split in ("train", "test"):
            mine, kept = getattr(silo, split), getattr(data.silo, split)
            assert (kept.categorical == mine.categorical).all()
            assert (kept.target == mine.target).all() and len(kept) == len(mine)


@pytest.mark.slow
def test_a_deployed_returns_run_keeps_an_audit_log_that_verifies(deployed):
    _, dataset, out, _ = deployed
    # Each storefront signs its record of its own files: none (its network is all shared).
    verified = verified_audit(out, dataset.n_silos)
    assert verified.signed_by["models/federated/shared.safetensors"] == "server"


# What crosses the wire and what a storefront's file holds, on a planted table.


def _reply(values: dict, silo: int = 1) -> RecordDict:
    return RecordDict({"metrics": ConfigRecord({"silo": silo, **values})})


def test_binary_counts_cross_the_wire_and_malformed_ones_are_refused():
    rng = np.random.default_rng(0)
    counts = BinaryCounts.of(rng.random(500), rng.random(500) < 0.1)
    sent = RecordDict({"metrics": wire.table_counts_config(1, counts)})
    decoded = wire.record_binary_counts(sent, 1)
    assert decoded.histogram.dtype == np.int64 and (decoded.histogram == counts.histogram).all()
    good = {"histogram": [0] * (2 * BINS)}
    malformed = {
        "short": {"histogram": [0] * (2 * BINS - 1)},
        "negative": {"histogram": [-1] + [0] * (2 * BINS - 1)},
        "fractions": {"histogram": [0.5] * (2 * BINS)},
        "booleans": {"histogram": [True] * (2 * BINS)},
        "missing": {},
        "a forecaster's": {"absolute-error": 1.0, "actual": 2.0},
    }
    for reason, content in malformed.items():
        with pytest.raises(wire.BadReplyError, match="malformed table counts"):
            wire.record_binary_counts(_reply(content), 1)
            pytest.fail(reason)
    with pytest.raises(wire.BadReplyError, match="claimed for silo 2"):
        wire.record_binary_counts(_reply(good, silo=2), 1)


def test_forecast_sums_cross_the_wire_and_malformed_ones_are_refused():
    sums = ForecastSums(12.5, 40.0)
    sent = RecordDict({"metrics": wire.table_counts_config(3, sums)})
    assert wire.record_forecast_sums(sent, 3) == sums
    for values in ({"absolute-error": 1.0}, {"absolute-error": "1", "actual": 2.0}):
        with pytest.raises(wire.BadReplyError, match="malformed forecast sums"):
            wire.record_forecast_sums(_reply(values), 1)
    for values in (
        {"absolute-error": -1.0, "actual": 2.0},
        {"absolute-error": 1.0, "actual": float("nan")},
        {"absolute-error": float("inf"), "actual": 2.0},
    ):
        with pytest.raises(wire.BadReplyError, match="finite and not negative"):
            wire.record_forecast_sums(_reply(values), 1)
    with pytest.raises(wire.BadReplyError, match="claimed for silo 3"):
        wire.record_forecast_sums(sent, 1)


def quantile_dataset() -> TabularDataset:
    rng = np.random.default_rng(2)

    def part(n: int) -> TabularPart:
        extra = {"series": np.arange(n), "scale": rng.random(n).astype(np.float32) + 1}
        return TabularPart(
            rng.integers(1, 9, (n, 1)), rng.normal(size=(n, 2)), rng.random((n, 4)), extra
        )

    silos = [TabularSilo(i, f"shop{i}", part(40), part(10)) for i in range(2)]
    return TabularDataset("planted-demand", "quantile", silos, ["item"], [9], ["a", "b"], 4)


@pytest.mark.parametrize("make", [planted_dataset, quantile_dataset])
def test_a_storefront_file_holds_its_rows_and_the_public_schema(tmp_path, make):
    dataset = make()
    path = write_table_silo_file(tmp_path / "silo-1.npz", dataset, 1)
    assert path.stat().st_mode & 0o777 == 0o600  # owner-only: its rows
    data, meta = read_any_silo_file(path)
    silo = dataset.silos[1]
    assert data.name == silo.name and meta["index"] == 1 and meta["dataset"] == dataset.name
    for split in ("train", "test"):
        mine, kept = getattr(silo, split), getattr(data.silo, split)
        assert (kept.categorical == mine.categorical).all()
        assert (kept.numeric == mine.numeric).all() and (kept.target == mine.target).all()
        assert set(kept.extra) == set(mine.extra)
        for name, values in mine.extra.items():
            assert (kept.extra[name] == values).all()
    assert data.schema() == TableSchema.of(dataset)
    # Every storefront's file states the same schema; another table's does not.
    _, first = read_any_silo_file(write_table_silo_file(tmp_path / "silo-0.npz", dataset, 0))
    assert first["catalogue_digest"] == meta["catalogue_digest"]
    changed = TabularDataset(
        dataset.name, dataset.kind, dataset.silos, dataset.categorical_names,
        [c + 1 for c in dataset.cardinalities], dataset.numeric_names, dataset.horizon,
    )  # fmt: skip
    _, changed_meta = read_any_silo_file(write_table_silo_file(tmp_path / "x.npz", changed, 0))
    assert changed_meta["catalogue_digest"] != meta["catalogue_digest"]


def test_a_table_silo_file_with_codes_outside_the_schema_is_refused(tmp_path):
    dataset = planted_dataset(sizes=(300, 300))
    path = write_table_silo_file(tmp_path / "silo-0.npz", dataset, 0)
    with np.load(path) as f:
        arrays = dict(f)
    for bad in (-1, 50):  # below 0, or the vocabulary's size
        arrays["train_categorical"] = arrays["train_categorical"].copy()
        arrays["train_categorical"][0, 0] = bad
        np.savez(tmp_path / "bad.npz", **arrays)
        with pytest.raises(SiloFileError, match="not a complete table silo file"):
            read_table_silo_file(tmp_path / "bad.npz")


def test_a_storefront_node_says_its_schema_and_trains_as_the_simulators(tmp_path):
    """A node's hello carries the schema (no rows, no count), and the client it builds from its
    own file makes the simulator's storefront's update."""
    dataset = planted_dataset(sizes=(400, 300))
    config = load_config(overrides=FRAUD)
    path = write_table_silo_file(tmp_path / "silo-1.npz", dataset, 1)
    policy_path(path).write_text(SiloPolicy().to_toml())
    node = SiloNode({"silo-data": str(path), "state-dir": str(tmp_path / "state")})
    info = node.hello()["silo"]
    assert hello_shapes(info) == {
        "kind": "binary", "horizon": 1, "cardinalities": (50, 4), "n-numeric": 3,
    }  # fmt: skip
    assert not {"rows", "users", "customers"} & set(info.keys())
    shape = shape_of(config, dataset)
    simulated = TabularSiloClient(
        dataset.silos[1], shape, head_of(config, dataset), config, tabular_pipeline(config, shape)
    )
    deployed = node._table_client(config)
    shared = init_shared(config, shape, "shared", "init")
    a = simulated.fit(shared, LocalTask(epochs=1)).tensors
    b = deployed.fit(shared, LocalTask(epochs=1)).tensors
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_deployed_outcome_keeps_each_storefronts_counts(tmp_path):
    rng = np.random.default_rng(4)
    per_silo = {
        "a": BinaryCounts.of(rng.random(300), rng.random(300) < 0.2),
        "b": BinaryCounts.of(rng.random(100), rng.random(100) < 0.3),
    }
    Outcome([], per_silo, ["a", "b"], None, ProtectionSummary(), task="fraud").write(
        tmp_path, {"w": torch.zeros(2)}
    )
    read = Outcome.read(tmp_path)
    assert read.task == "fraud"
    for name, counts in per_silo.items():
        assert (read.per_silo[name].histogram == counts.histogram).all()
    sums = {"a": ForecastSums(3.0, 10.0), "b": ForecastSums(1.0, 5.0)}
    Outcome([], sums, ["a", "b"], None, ProtectionSummary(), task="demand").write(
        tmp_path, {"w": torch.zeros(2)}
    )
    assert Outcome.read(tmp_path).per_silo == sums
    summary = json.loads((tmp_path / "outcome.json").read_text())["summary"]
    assert summary["wape"] == pytest.approx(4 / 15)


def test_counts_score_a_run_as_the_exact_predictions_do():
    """The deployed report's metrics (from each storefront's binned counts) agree with the
    simulator's exact scores of the same predictions."""
    from fedshop.retail_experiment import score_binary

    dataset = planted_dataset()
    rng = np.random.default_rng(5)
    predictions = {
        s.name: np.clip(0.4 * s.test.target + 0.6 * rng.random(len(s.test)), 0, 1)
        for s in dataset.silos
    }
    exact = score_binary(dataset, predictions)
    counts = {s.name: BinaryCounts.of(predictions[s.name], s.test.target) for s in dataset.silos}
    scores = score_counts(dataset, counts)
    binned = scores.methods["federated"]
    for name in ("auc_pr", "silo_mean_auc_pr", "auc"):
        assert binned["summary"][name] == pytest.approx(exact["summary"][name], abs=0.01)
    for silo in dataset.silo_names:
        assert binned["per_silo"][silo]["rows"] == exact["per_silo"][silo]["rows"]
    assert scores.figures[0].title.startswith("Precision–recall")


def test_a_storefront_refuses_a_task_its_table_is_not_for(tmp_path):
    """A classifier's table does not train the demand task's forecaster, nor a recommender."""
    from fedshop.errors import FedShopError

    path = write_table_silo_file(tmp_path / "silo-0.npz", planted_dataset(sizes=(300, 300)), 0)
    policy_path(path).write_text(SiloPolicy().to_toml())
    node = SiloNode({"silo-data": str(path), "state-dir": str(tmp_path / "state")})
    with pytest.raises(FedShopError, match="table is binary"):
        node._table_client(load_config(overrides={**FRAUD, "task": "demand"}))
    with pytest.raises(FedShopError, match="holds a binary table"):
        node._client(load_config())


def test_a_malformed_table_schema_in_a_hello_is_refused():
    good = {"kind": "binary", "horizon": 1, "cardinalities": [5, 3], "n-numeric": 2}
    assert hello_shapes(ConfigRecord(good))["cardinalities"] == (5, 3)
    for bad in ({**good, "cardinalities": 5}, {**good, "cardinalities": [0, 3]}, {"kind": "x"}):
        with pytest.raises((KeyError, TypeError, ValueError)):
            hello_shapes(ConfigRecord(bad))
