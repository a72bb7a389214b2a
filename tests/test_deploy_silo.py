"""A deployed silo's state across the server's runs: `SiloNode` as Flower runs it (a fresh object per
message) on a real silo data file and state folder, with the server's task handed over in this
process; `test_deploy.py` runs the same over real processes."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedshop.config import load_config
from fedshop.deploy import wire
from fedshop.deploy.silo_app import SiloNode
from fedshop.deploy.silo_files import write_silo_file
from fedshop.deploy.silo_policy import SiloPolicy, policy_path
from fedshop.errors import FedShopError
from fedshop.experiment import record_level_plan
from fedshop.fl.aggregation import aggregation_pipeline
from fedshop.fl.in_process import make_server

SMALL = {"methods": ["federated"], "model.dim": 8, "federated.rounds": 2}
DP = {
    "privacy.mode": "record", "privacy.epsilon": 8.0, "privacy.budget": 20.0,
    "privacy.local_steps": 2,
}  # fmt: skip
RUN_A, RUN_B, RUN_C = "a" * 32, "b" * 32, "c" * 32


@pytest.fixture(scope="module")
def silo_file(retail, tmp_path_factory):
    """The data file of the smallest silo (the quickest to train)."""
    index = min(range(retail.n_silos), key=lambda i: retail.silo(i).n_users)
    path = write_silo_file(tmp_path_factory.mktemp("data") / "silo.npz", retail, index)
    # These tests train many runs on one silo: a policy with room for all of them.
    roomy = SiloPolicy(max_delta=1e-3, max_epsilon_per_run=1e3, budget_epsilon=1e6)
    policy_path(path).write_text(roomy.to_toml())
    return path


class _Server:
    """What the server sends a silo: its config, DP plan and initial model."""

    def __init__(self, retail, overrides: dict) -> None:
        self.config = load_config(overrides={**SMALL, **overrides})
        pipeline = aggregation_pipeline(self.config.federated.aggregation)
        pool = torch.arange(retail.n_silos)
        self.shared = make_server(self.config, retail.n_items, pool, pipeline).shared
        self.plan = None
        if self.config.privacy.enabled:
            counts = [retail.silo(i).n_users for i in range(retail.n_silos)]
            self.plan = json.dumps(asdict(record_level_plan(self.config, counts)))

    def train(self, silo_file, state_dir, run: str | None, round_number=1, shared=None):
        """The silo's update for `round_number` of `run`, from a fresh `SiloNode` (a process)."""
        task = {"round": round_number, "config": self.config.to_toml(), "evaluate": False}
        task["final"] = False
        if run is not None:
            task["run"] = run
        if self.plan is not None:
            task["dp-plan"] = self.plan
        model = wire.params_record(self.shared if shared is None else shared)
        node = SiloNode({"silo-data": str(silo_file), "state-dir": str(state_dir)})
        reply = node.train(RecordDict({"task": ConfigRecord(task), "shared": model}))
        return wire.record_params(reply["update"])


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_two_runs_on_one_state_folder_never_draw_the_same_noise(retail, silo_file, tmp_path):
    """The same silo, config and model in two runs: different DP noise; the same run asked again
    (a restarted server or silo) continues its own stream and sends the same update."""
    server = _Server(retail, DP)
    first = server.train(silo_file, tmp_path, RUN_A)
    other = server.train(silo_file, tmp_path, RUN_B)
    assert not _same(first, other)
    assert _same(first, server.train(silo_file, tmp_path, RUN_A))
    # Each run's secret, and so its streams, is its own, readable by the silo only.
    secrets = [tmp_path / "runs" / run / "secret" for run in (RUN_A, RUN_B)]
    assert secrets[0].read_bytes() != secrets[1].read_bytes()
    assert not (tmp_path / "secret").exists()


def test_a_run_never_starts_from_another_runs_state(retail, silo_file, tmp_path):
    """Round 2 of a new run starts from fresh private vectors, not from the state another run
    left after its round 1."""
    server = _Server(retail, {})
    server.train(silo_file, tmp_path, RUN_A, round_number=1)
    after_a = server.train(silo_file, tmp_path, RUN_A, round_number=2)
    fresh_b = server.train(silo_file, tmp_path, RUN_B, round_number=2)
    assert not _same(after_a, fresh_b)
    # The same as a silo that never saw run A.
    assert _same(fresh_b, server.train(silo_file, tmp_path / "elsewhere", RUN_C, round_number=2))
    assert sorted(p.name for p in (tmp_path / "runs" / RUN_B).glob("round-*")) == ["round-2.pt"]


def test_a_round_is_never_trained_again_on_another_model(retail, silo_file, tmp_path):
    """Its noise would be drawn again from the same state: the difference of the two updates
    would be noise-free. The same model again (a retried round) is answered."""
    server = _Server(retail, DP)
    first = server.train(silo_file, tmp_path, RUN_A)
    assert _same(first, server.train(silo_file, tmp_path, RUN_A))
    other = {k: v + 0.01 for k, v in server.shared.items()}
    with pytest.raises(FedShopError, match="already trained on another model"):
        server.train(silo_file, tmp_path, RUN_A, shared=other)


def test_an_earlier_round_is_never_trained_after_a_later_one(retail, silo_file, tmp_path):
    """Round 3 asked first draws from the state after round 1, as round 2 would: round 2 asked
    after it, on another model, would draw the same noise."""
    server = _Server(retail, DP)
    server.train(silo_file, tmp_path, RUN_A, round_number=1)
    server.train(silo_file, tmp_path, RUN_A, round_number=3)
    other = {k: v + 0.01 for k, v in server.shared.items()}
    with pytest.raises(FedShopError, match="already trained round 3 of this run"):
        server.train(silo_file, tmp_path, RUN_A, round_number=2, shared=other)


@pytest.mark.parametrize("run", [None, "", "../" * 10 + "etc", "A" * 32])
def test_a_task_without_a_run_id_of_the_servers_format_is_refused(retail, silo_file, tmp_path, run):
    server = _Server(retail, {})
    with pytest.raises(FedShopError, match="not a run id of 32 hex digits"):
        server.train(silo_file, tmp_path / "state", run)
    assert not (tmp_path / "etc").exists()
