"""Real deployment: SuperLink and SuperNodes as separate processes on 127.0.0.1, with TLS and node
authentication, the silos reaching the SuperLink through its front door (nginx; what the front door
lets through: test_front_door.py); the same model as the simulator; failures of a silo and of the
server."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedshop.config import DataConfig, load_config
from fedshop.data.datasets import load_dataset
from fedshop.deploy.checkpoint import read_run_identity
from fedshop.deploy.launch import DeploySettings, deploy_local, prepare, run_config
from fedshop.deploy.pki import make_node_keys
from fedshop.deploy.processes import LocalFederation, Silo
from fedshop.deploy.silo_files import SiloFileError, read_silo_file
from fedshop.errors import FedShopError
from fedshop.fl.in_process import run_cross_silo
from fedshop.report.run_folder import write_run
from fedshop.storage.audit import (
    AuditLog,
    Signer,
    Verified,
    read_entries,
    verify_entries,
    verify_run,
)
from test_deploy_traffic import check_history_traffic, model_bytes

# The coordinator's front door runs nginx: without it these tests are skipped (conftest `nginx`).
pytestmark = pytest.mark.usefixtures("nginx")

SMALL = {
    "methods": ["federated"], "model.dim": 8, "federated.rounds": 2, "data.max_silos": 3,
    "federated.personalise_epochs": 1,
}  # fmt: skip


@pytest.fixture(scope="module")
def three_silos(data_dir):
    return load_dataset(DataConfig(max_silos=3))


@pytest.fixture(scope="module")
def deployed(three_silos, tmp_path_factory):
    """A deployment under secure aggregation (the plain one is compared with the simulator in the
    restart test)."""
    config = load_config(overrides={**SMALL, "protection.kind": "secagg"})
    out = tmp_path_factory.mktemp("deployed")
    result = deploy_local(config, three_silos, out)
    return config, out, result


def _no_flower_processes_left() -> bool:
    listing = subprocess.run(["ps", "-eo", "stat,args"], capture_output=True, text=True).stdout
    return not [
        line
        for line in listing.splitlines()
        if any(
            name in line
            for name in ("flower-", "flwr-", "front-door/nginx.conf", "deploy.party_runtime")
        )
        and not line.startswith("Z")
    ]


def test_deployment_builds_the_same_model_as_the_simulator_under_secagg(
    three_silos, deployed, tmp_path
):
    """SecAgg's four steps as messages between the processes: the server sees only masked
    updates, and the model is the simulator's (whose SecAgg sums in one process)."""
    config, out, result = deployed
    # Its run folder's audit log verifies; the server held no single message to hash.
    (tmp_path / "run").mkdir()
    audit = verify_run(write_run(tmp_path / "run", result))
    assert audit.rounds == 2 and audit.acks == 3 * 2 + 3
    rounds = [e["body"] for e in read_entries(tmp_path / "run" / "audit.jsonl")]
    assert all(r["messages"] is None for r in rounds if "messages" in r)
    simulated = run_cross_silo(three_silos, config)
    shared = load_file(str(out / "deployment" / "server" / "shared.safetensors"))
    assert set(shared) == set(simulated.server.shared)
    for name, value in simulated.server.shared.items():
        torch.testing.assert_close(shared[name], value, rtol=0, atol=1e-6)
    # The per-round metrics too: the silos evaluated with the same private state.
    for deployed_round, simulated_round in zip(result.history, simulated.history, strict=True):
        assert deployed_round.clients == simulated_round.clients == [0, 1, 2]
        assert deployed_round.metrics["hr@10"] == pytest.approx(simulated_round.metrics["hr@10"])
        assert deployed_round.protection["bytes_per_client"] > 0
    assert result.protection.kind == "secagg" and result.protection.rounds == 2
    assert result.protection.details["dropped_after_shares"] == 0
    # No silo keeps a round's secrets once the round is over.
    run = read_run_identity(out / "deployment" / "server")
    for index in range(3):
        state = out / "deployment" / "silos" / f"silo-{index}-state" / "runs" / run / "secagg"
        assert state.is_dir() and not list(state.iterdir())
    assert _no_flower_processes_left()


def test_each_silo_holds_only_its_own_data(three_silos, deployed):
    _, out, _ = deployed
    for index in range(3):
        silo, meta = read_silo_file(out / "deployment" / "silos" / f"silo-{index}.npz")
        assert meta["index"] == index and silo.name == three_silos.silo_names[index]
        assert (silo.users == three_silos.silo(index).users).all()
        assert silo.train.shape == (len(silo.users), three_silos.n_items)
    with pytest.raises(SiloFileError, match="does not exist"):
        read_silo_file(out / "nowhere.npz")


def test_everything_the_deployment_wrote_is_owner_only(deployed):
    """Keys, certificates, silo data files and state, the server's config, checkpoints and outcome,
    Flower's database and homes, every party's log: no group or other permission bit on any."""
    _, out, _ = deployed
    folder = out / "deployment"
    written = [folder, *folder.rglob("*")]
    modes = {path: os.lstat(path).st_mode for path in written}
    loose = {
        str(path.relative_to(out)): oct(stat.S_IMODE(mode))
        for path, mode in modes.items()
        if not stat.S_ISLNK(mode) and stat.S_IMODE(mode) & 0o077
    }
    assert not loose
    # What the walk covered, so that it cannot pass on a folder left empty.
    names = {str(path.relative_to(folder)) for path in written}
    for expected in (
        "certs/superlink.key", "keys/silo-0", "superlink.db", "logs/silo-0.log",
        "logs/superlink.log", "silos/silo-0.npz", "server/config.toml", "server/server.log",
        "server/outcome.json", "server/checkpoints/LATEST", "home/silo-0", "app/pyproject.toml",
    ):  # fmt: skip
        assert expected in names
    state = folder / "silos" / "silo-0-state" / "runs" / read_run_identity(folder / "server")
    assert list(state.glob("round-*.pt")) and (state / "final.pt").exists()
    assert list(state.glob("unmasked/round-*.json"))  # the SecAgg rosters answered for


@pytest.mark.slow
def test_cli_writes_the_same_run_folder_as_the_simulator(tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "fedshop", "deploy", "local", "--silos", "3", "--rounds", "1",
        "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "cross-silo" and metrics["federated"]["hr@10"] > 0
    assert len(metrics["history"]) == 1 and set(metrics["per_silo"]) == {
        "United Kingdom", "Rest of world", "Germany",
    }  # fmt: skip
    assert (out / "report.html").exists()
    assert (out / "models" / "federated" / "shared.safetensors").exists()
    # Every round's bytes, as Flower serialised the messages, silo by silo.
    shared = load_file(str(out / "models" / "federated" / "shared.safetensors"))
    check_history_traffic(
        metrics, ["United Kingdom", "Rest of world", "Germany"], model_bytes(shared)
    )
    # The audit log of the deployed run verifies: chain, the server's and every silo's signatures
    # (made in the silos' processes with their own keys), every weights file.
    verified = subprocess.run(
        [sys.executable, "-m", "fedshop", "audit", "verify", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stderr
    audit = verify_run(out)
    assert audit.rounds == 1 and audit.acks == 3 + 3  # round 1 and the final model, each silo
    keys = out / "deployment" / "keys"
    assert {p["key"] for p in audit.parties.values()} == {
        (keys / f"audit-silo-{i}.pub").read_text().strip() for i in range(3)
    }
    silo_files = [p for p in audit.files if "/federated/silo-" in p and p.endswith(".safetensors")]
    assert len(silo_files) == 3 and all(audit.signed_by[p] != "server" for p in silo_files)
    assert "flower-supernode" in done.stdout  # the commands for separate hosts
    assert "fedshop deploy front-door" in done.stdout and "--host 0.0.0.0" not in done.stdout
    assert _no_flower_processes_left()


def test_an_unregistered_node_is_refused(tmp_path):
    silo = Silo(0, tmp_path / "none.npz", tmp_path / "state")
    with LocalFederation(tmp_path / "fed", [silo]) as federation:
        federation.start_superlink()
        intruder, _ = make_node_keys(tmp_path / "intruder", "intruder")
        process = federation.start_silo(silo, private_key=intruder)
        assert process.wait(timeout=60) != 0
        assert "Failed to activate SuperNode" in federation.log_tail("silo-0")
    assert _no_flower_processes_left()


def test_authentication_needs_tls(tmp_path):
    with pytest.raises(FedShopError, match="needs TLS"):
        LocalFederation(tmp_path, [], tls=False, authenticate=True)


def _wait_for_line(path: Path, text: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.5)
    raise AssertionError(f"{text!r} never appeared in {path}")


@pytest.mark.slow
def test_a_killed_silo_is_left_out_and_rejoins(three_silos, tmp_path):
    config = load_config(overrides={**SMALL, "federated.rounds": 5})
    folder = tmp_path / "deployment"
    silos, server_config = prepare(config, three_silos, folder)
    settings = DeploySettings(min_silos=2, round_timeout=30)
    log = folder / "server" / "server.log"
    with LocalFederation(folder, silos) as federation:
        federation.start()
        run_id = federation.submit(
            run_config(folder, server_config, 3, settings, federation.nodes_file)
        )
        _wait_for_line(log, "round 1: 3 silos trained")
        federation.stop_process("silo-2", signal.SIGTERM)
        _wait_for_line(log, "silos [2] dropped out")
        federation.start_silo(silos[2])  # the same key: the silo comes back
        federation.wait(run_id, timeout=600)
    history = json.loads((folder / "server" / "outcome.json").read_text())["history"]
    clients = [record["clients"] for record in history]
    assert [0, 1] in clients and clients[0] == [0, 1, 2] and clients[-1] == [0, 1, 2]
    assert all(record["metrics"] for record in history)


@pytest.mark.slow
def test_a_restarted_server_resumes_from_its_checkpoint(three_silos, tmp_path):
    """The SuperLink and the ServerApp are killed after round 2 of 4; a new SuperLink and a new
    run resume from the checkpoint, and the model is the uninterrupted simulator's."""
    config = load_config(overrides={**SMALL, "federated.rounds": 4})
    folder = tmp_path / "deployment"
    silos, server_config = prepare(config, three_silos, folder)
    log = folder / "server" / "server.log"
    with LocalFederation(folder, silos) as federation:
        settings = run_config(
            folder, server_config, 3, DeploySettings(round_timeout=60), federation.nodes_file
        )
        federation.start()
        federation.submit(settings)
        _wait_for_line(log, "round 2: 3 silos trained")
        federation.stop_process("superlink", signal.SIGKILL)
        federation.start_superlink()  # the same port and database: the silos reconnect
        run_id = federation.submit(settings)
        federation.wait(run_id, timeout=600)
    assert "resumed from the checkpoint after round 2" in log.read_text()
    outcome = json.loads((folder / "server" / "outcome.json").read_text())
    assert [record["round"] for record in outcome["history"]] == [1, 2, 3, 4]
    simulated = run_cross_silo(three_silos, config)
    shared = load_file(str(folder / "server" / "shared.safetensors"))
    for name, value in simulated.server.shared.items():
        torch.testing.assert_close(shared[name], value, rtol=0, atol=1e-6)
    # The resumed server's audit log holds each round once, chained across the restart, every
    # silo's signatures verify (closed here as the run folder's writer would close it).
    server = folder / "server"
    log = AuditLog(
        Signer.from_pem((server / "audit-server.key").read_bytes()),
        entries=read_entries(server / "audit.jsonl"),
    )
    log.close()
    audit = verify_entries(log.entries)
    assert isinstance(audit, Verified), audit
    assert audit.rounds == 4 and audit.acks == 4 * 3 + 3


@pytest.mark.slow
def test_deploy_run_submits_to_a_running_superlink(three_silos, tmp_path):
    """The coordinator's command for separate hosts, against parties started as they would be, from
    elsewhere: through the front door's operator listener, with the operator's credential."""
    config = load_config(overrides={**SMALL, "federated.rounds": 1})
    folder = tmp_path / "deployment"
    silos, server_config = prepare(config, three_silos, folder)
    with LocalFederation(folder, silos) as federation:
        federation.start()
        command = [
            sys.executable, "-m", "fedshop", "deploy", "run",
            "--superlink", f"localhost:{federation.operator_port}",
            "--ca", str(federation.tls_files.ca),
            "--operator-cert", str(federation.tls_files.operator_certificate),
            "--operator-key", str(federation.tls_files.operator_key),
            "--config", str(server_config), "--silos", "3", "--out", str(tmp_path / "run"),
            "--nodes", str(federation.nodes_file),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "round 1: 3 silos trained" in done.stdout
    outcome = json.loads((tmp_path / "run" / "server" / "outcome.json").read_text())
    assert len(outcome["history"]) == 1 and len(outcome["per_silo"]) == 3


@pytest.mark.slow
def test_ctrl_c_stops_every_process(tmp_path):
    command = [
        sys.executable, "-m", "fedshop", "deploy", "local", "--silos", "2", "--rounds", "20",
        "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if "round 1: 2 silos trained" in line:
            break
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=120)
    assert process.returncode == 130
    assert _no_flower_processes_left()


@pytest.mark.slow
def test_record_level_dp_and_secagg_in_deployment_state_and_ledger_epsilon(three_silos, tmp_path):
    """DP-SGD in each silo, its noisy update then masked by SecAgg: the two combine in deployment
    as in the simulator, with the simulator's ε."""
    from fedshop.experiment import open_privacy
    from fedshop.storage.ledger import Ledger

    ledger = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    config = load_config(
        overrides={
            **SMALL, "privacy.mode": "record", "privacy.epsilon": 8.0, "privacy.budget": 20.0,
            "privacy.local_steps": 2, "privacy.ledger_url": ledger, "protection.kind": "secagg",
        }
    )  # fmt: skip
    result = deploy_local(config, three_silos, tmp_path / "run")
    assert result.protection.kind == "secagg" and result.protection.rounds == 2
    # Under DP the server asks for no metric sums and so finds none missing.
    log = (tmp_path / "run" / "deployment" / "server" / "server.log").read_text()
    assert "malformed" not in log and "refused" not in log
    # The simulator's plan for the same config, in a ledger of its own.
    (tmp_path / "run.toml").write_text(config.to_toml())
    separate = {"privacy.ledger_url": f"sqlite:///{tmp_path / 'simulator.sqlite'}"}
    simulated = open_privacy(load_config(tmp_path / "run.toml", separate), three_silos)
    assert result.privacy.epsilon == pytest.approx(simulated.plan.planned_epsilon(), rel=1e-6)
    assert result.privacy.noise_multiplier == pytest.approx(simulated.plan.noise_multiplier)
    epsilons = [record.epsilon for record in result.history]
    assert epsilons == sorted(epsilons) and epsilons[-1] == result.privacy.epsilon
    balances = {b.silo: b.spent_epsilon for b in Ledger(ledger).balances()}
    assert balances == pytest.approx(dict.fromkeys(three_silos.silo_names, epsilons[-1]))
    # Each silo's DP noise comes from a secret of its own for this run, never from the run's seed.
    folder = tmp_path / "run" / "deployment"
    run = read_run_identity(folder / "server")
    for index in range(3):
        assert (folder / "silos" / f"silo-{index}-state" / "runs" / run / "secret").exists()


@pytest.mark.slow
def test_four_silos_on_loopback_keep_their_boundaries(tmp_path):
    """Issue 16's deployment, whole: 4 silos behind the front door. An outsider with the CA alone
    cannot register a key or submit an app, nor join with a key of its own; silo 3's policy asks for
    secure aggregation, so it refuses the plain rounds, which go on with the other three."""
    from fedshop.deploy.processes import Control, DeploymentError
    from fedshop.deploy.silo_policy import SiloPolicy, policy_path

    four = load_dataset(DataConfig(max_silos=4))
    config = load_config(overrides={**SMALL, "data.max_silos": 4, "federated.rounds": 1})
    folder = tmp_path / "deployment"
    silos, server_config = prepare(config, four, folder)
    policy_path(silos[3].data).write_text(SiloPolicy(require_secagg=True).to_toml())
    log = folder / "server" / "server.log"
    with LocalFederation(folder, silos) as federation:
        federation.start()
        outsider = Control(
            tmp_path / "outsider", f"127.0.0.1:{federation.public_port}", federation.tls_files.ca
        )
        intruder_private, intruder_public = make_node_keys(tmp_path / "intruder", "silo-1")
        with pytest.raises(DeploymentError, match="registering"):
            outsider.register(intruder_public)
        with pytest.raises(DeploymentError, match="flwr run failed"):
            outsider.submit({}, tmp_path / "outsider-app")
        # A SuperNode with an unregistered key, pretending to be silo 1: refused at the door.
        process = federation.start_silo(silos[1], private_key=intruder_private)
        assert process.wait(timeout=120) != 0
        settings = DeploySettings(min_silos=3, round_timeout=120)
        run_id = federation.submit(
            run_config(folder, server_config, 4, settings, federation.nodes_file)
        )
        federation.wait(run_id, timeout=900)
    history = json.loads((folder / "server" / "outcome.json").read_text())["history"]
    assert [record["clients"] for record in history] == [[0, 1, 2]]
    assert "the silo's policy requires secure aggregation" in log.read_text()
    assert "fedshop silo refused a task" in federation.log_tail("silo-3", 100_000)
    assert _no_flower_processes_left()
