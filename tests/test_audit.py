"""The audit log (issue 21, item 4): a hash-chained, Ed25519-signed record of every round and weights
file, and `fedshop audit verify`. Real files, real keys, real runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedshop.cli import app
from fedshop.config import load_config
from fedshop.data.partition import slug
from fedshop.experiment import run_experiment
from fedshop.fl.audit import acknowledge, hash_message
from fedshop.messages import ClientMessage
from fedshop.report.run_folder import write_run
from fedshop.storage.audit import (
    LOG_FILE,
    AuditLog,
    Problem,
    Signer,
    Verified,
    ack_message,
    files_message,
    final_ack_message,
    message_digest,
    read_entries,
    safetensors_bytes,
    sha256_hex,
    signature_valid,
    silo_files_body,
    tensors_digest,
    verify_entries,
    verify_run,
    weight_files,
)

SMALL = {
    "seed": 3,
    "model.dim": 8,
    "federated.rounds": 2,
    "federated.personalise_epochs": 1,
    "methods": ["federated", "popularity"],
}

# -- the log as pure functions ----------------------------------------------------------------------


def _model(value: float) -> dict[str, torch.Tensor]:
    return {"items": torch.full((3, 2), value), "bias": torch.arange(3, dtype=torch.float32)}


def a_log(
    wrong_ack: bool = False, final_names_bob: bool = True
) -> tuple[list[dict], dict[str, Signer]]:
    """A two-silo, two-round log made by hand, as a run makes it. Bob's acknowledgement of the
    final model is missing: named with no signature (invalid), or not named (`final_names_bob`
    false: Bob was not sent the final model, and the log is valid)."""
    server, alice, bob = Signer.generate(), Signer.generate(), Signer.generate()
    log = AuditLog(server)
    log.header("run-1", "seed = 1\n", {0: ("Alice", alice.public), 1: ("Bob", bob.public)}, "x")
    models = [_model(float(v)) for v in range(3)]
    for r in (1, 2):
        sent = models[r - 1]
        bob_key = alice if wrong_ack and r == 2 else bob  # Bob's ack signed with Alice's key
        log.append(
            "round",
            {
                "round": r,
                "participants": [0, 1],
                "messages": {"0": "a" * 64, "1": "b" * 64},
                "model_in": tensors_digest(sent),
                "model_out": tensors_digest(models[r]),
                "epsilon": None,
                "sum": "c" * 64,
                "acks": {
                    "0": acknowledge(alice, "run-1", r, sent),
                    "1": acknowledge(bob_key, "run-1", r, sent),
                },
            },
        )
    final = models[2]
    log.append(
        "final",
        {
            "model": tensors_digest(final),
            "acks": {
                "0": acknowledge(alice, "run-1", 0, final),
                **({"1": None} if final_names_bob else {}),
            },
        },
    )
    log.append(
        "silo-files", silo_files_body(alice, "run-1", 0, "Alice", {"models/a.bin": "d" * 64})
    )
    log.append("files", {"files": {"models/s.bin": "e" * 64}, "model_file": None})
    log.close()
    return log.entries, {"server": server, "alice": alice, "bob": bob}


def test_a_log_made_by_the_parties_verifies_and_says_what_it_holds():
    entries, _ = a_log()
    # The final model's acknowledgement list names Bob with no signature: a missing ack fails.
    problem = verify_entries(entries)
    assert isinstance(problem, Problem) and problem.entry == 3 and "Bob" in problem.reason
    entries = a_log(final_names_bob=False)[0]
    result = verify_entries(entries)
    assert isinstance(result, Verified), result
    assert result.rounds == 2 and result.acks == 5
    assert result.files == {"models/a.bin": "d" * 64, "models/s.bin": "e" * 64}
    assert result.signed_by == {"models/a.bin": "Alice", "models/s.bin": "server"}


def test_a_wrong_signature_fails_naming_the_entry_and_the_party():
    entries, _ = a_log(wrong_ack=True)
    problem = verify_entries(entries)
    assert problem == Problem(2, "Bob's acknowledgement does not verify (or is missing)")


def test_a_silo_signature_on_other_files_fails():
    server, alice = Signer.generate(), Signer.generate()
    # The files entry re-made by someone with the server's key but not Alice's: Alice's old
    # signature does not cover other files.
    log = AuditLog(server, entries=[])
    log.header("run-1", "x", {0: ("Alice", alice.public)}, "x")
    body = silo_files_body(alice, "run-1", 0, "Alice", {"models/a.bin": "d" * 64})
    body["files"] = {"models/a.bin": "f" * 64}
    log.append("silo-files", body)
    log.close()
    problem = verify_entries(log.entries)
    assert problem == Problem(1, "Alice's signature on its files does not verify")


def test_a_reordered_removed_edited_or_cut_log_fails_at_the_first_bad_entry():
    entries = a_log(final_names_bob=False)[0]
    assert isinstance(verify_entries(entries), Verified)
    swapped = [entries[0], entries[2], entries[1], *entries[3:]]
    assert verify_entries(swapped).entry == 1
    removed = [*entries[:2], *entries[3:]]
    assert verify_entries(removed).entry == 2
    assert verify_entries(entries[:-1]) == Problem(
        len(entries) - 1, "the log has no end entry: it was cut short or never closed"
    )
    edited = json.loads(json.dumps(entries))
    edited[1]["body"]["epsilon"] = 0.1
    assert verify_entries(edited) == Problem(1, "its hash does not match its content (edited)")
    # Re-hashing the edited entry does not help: the server's signature covers it.
    from fedshop.storage.audit import entry_hash

    edited[1]["hash"] = entry_hash(edited[1])
    assert verify_entries(edited) == Problem(1, "the server's signature does not verify")


def test_a_chain_rewritten_with_another_server_key_fails_on_the_parties_signatures():
    """Whoever rewrites the log with a key of their own (and a header naming it) cannot make the
    silos' acknowledgements: a forged header with the forger's keys for the silos is the limit
    (the public keys must be checked against the parties' own, `--keys` below)."""
    entries = a_log(final_names_bob=False)[0]
    forger = AuditLog(Signer.generate())
    header = entries[0]["body"]
    forger.header(header["run"], "seed = 2\n", {
        p["id"]: (p["name"], p["key"]) for p in header["parties"]
    }, "x")  # fmt: skip
    other = tensors_digest(_model(7.0))
    for entry in entries[1:-1]:
        body = dict(entry["body"])
        if entry["kind"] == "round" and body["round"] == 2:
            body["model_out"] = other  # another model out of the last round …
        if entry["kind"] == "final":
            body["model"] = other  # … and as the final model
        forger.append(entry["kind"], body)
    forger.close()
    problem = verify_entries(forger.entries)
    # The chain and the server's signatures hold (the forger's key), but Alice never signed that
    # final model.
    assert problem == Problem(3, "Alice's acknowledgement does not verify (or is missing)")


def test_the_message_hash_covers_every_field_of_a_message():
    base = ClientMessage({"w": torch.tensor([1.0, 2.0])}, 2.0, num_examples=3.0, local_steps=4)
    digests = {
        hash_message(base),
        hash_message(ClientMessage({"w": torch.tensor([1.0, 2.5])}, 2.0, 3.0, 4)),
        hash_message(ClientMessage({"v": torch.tensor([1.0, 2.0])}, 2.0, 3.0, 4)),
        hash_message(ClientMessage({"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}, 2, 3, 4)),
        hash_message(ClientMessage({"w": torch.tensor([[1.0, 2.0]])}, 2.0, 3.0, 4)),
        hash_message(ClientMessage({"w": torch.tensor([1.0, 2.0])}, 2.0 + 1e-12, 3.0, 4)),
        hash_message(ClientMessage({"w": torch.tensor([1.0, 2.0])}, 2.0, 3.5, 4)),
        hash_message(ClientMessage({"w": torch.tensor([1.0, 2.0])}, 2.0, 3.0, 5)),
    }
    assert len(digests) == 8
    assert tensors_digest({"s": torch.tensor(1.0)}) != tensors_digest({"s": torch.tensor([1.0])})
    two = {"a": torch.ones(2), "b": torch.zeros(3)}
    assert tensors_digest(two) == tensors_digest(dict(reversed(two.items())))
    assert hash_message(base) == message_digest(base.tensors, 2, 3, 4)


# -- a real run -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def audited_run(retail, tmp_path_factory) -> Path:
    """A small cross-silo simulator run (2 rounds, the embedded data's 11 storefronts), written."""
    folder = tmp_path_factory.mktemp("audited") / "run"
    folder.mkdir()
    write_run(folder, run_experiment(load_config(overrides=SMALL), retail))
    return folder


@pytest.fixture
def run_copy(audited_run, tmp_path) -> Path:
    return Path(shutil.copytree(audited_run, tmp_path / "run"))


def fedshop(*args):
    return subprocess.run(
        [sys.executable, "-m", "fedshop", *map(str, args)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_an_untouched_simulator_run_verifies(audited_run):
    result = fedshop("audit", "verify", audited_run)
    assert result.returncode == 0, result.stderr
    assert "verified" in result.stdout and "Traceback" not in result.stderr
    verified = verify_run(audited_run)
    assert isinstance(verified, Verified)
    assert verified.rounds == 2 and len(verified.parties) == 11
    # Every silo signed the model of every round it took part in, and the final model.
    entries = read_entries(audited_run / LOG_FILE)
    rounds = [e["body"] for e in entries if e["kind"] == "round"]
    assert verified.acks == sum(len(r["participants"]) for r in rounds) + 11
    assert all(r["messages"] is not None and r["epsilon"] is None for r in rounds)
    files = weight_files(audited_run)
    assert set(files) == set(verified.files) and len(files) == 1 + 11 * 2 + 1
    silo_files = [p for p in files if "/silo-" in p]
    assert all(verified.signed_by[p] != "server" for p in silo_files)
    assert verified.signed_by["models/federated/shared.safetensors"] == "server"
    # No private key in the log: only the 32-byte public keys (64 hex digits).
    text = (audited_run / LOG_FILE).read_text()
    assert "PRIVATE" not in text
    assert all(len(p["key"]) == 64 for p in verified.parties.values())


def _flip(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_anywhere_in_the_log_fails_naming_its_entry(run_copy):
    check_log_flips(run_copy)


def check_log_flips(run_copy: Path, step: int = 97) -> None:
    """Flip bytes of the folder's log one at a time: each flip fails, naming the entry it hit."""
    log = run_copy / LOG_FILE
    original = log.read_bytes()
    line_of = [original[:i].count(b"\n") for i in range(len(original))]
    # Every 97th byte (`step`, a prime: it lands on every kind of field across the lines) and each
    # line's first and last byte.
    starts = [0, *[i + 1 for i, b in enumerate(original[:-1]) if b == ord("\n")]]
    positions = sorted({*range(0, len(original), step), *starts, *[s - 1 for s in starts[1:]]})
    assert len(positions) > 200
    for position in positions:
        _flip(log, position)
        problem = verify_run(run_copy)
        assert isinstance(problem, Problem), position
        # The newline closing line k belongs to entry k; a flip there merges it with the next.
        assert problem.entry == line_of[position], (position, problem)
        log.write_bytes(original)
    assert isinstance(verify_run(run_copy), Verified)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(fraction=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_the_cli_names_the_entry_of_any_flipped_bit_in_the_log(run_copy, fraction, bit):
    log = run_copy / LOG_FILE
    original = log.read_bytes()
    position = int(fraction * len(original))
    data = bytearray(original)
    data[position] ^= 1 << bit
    log.write_bytes(bytes(data))
    try:
        result = CliRunner().invoke(app, ["audit", "verify", str(run_copy)])
        assert result.exit_code == 1, result.output
        entry = original[:position].count(b"\n")
        assert f"entry {entry}:" in result.output
    finally:
        log.write_bytes(original)


def test_a_flipped_byte_in_any_weights_file_fails_naming_the_file(run_copy):
    check_weights_flips(run_copy)
    # The CLI names the file, and exits non-zero.
    shared = "models/federated/shared.safetensors"
    _flip(run_copy / shared, 100)
    result = CliRunner().invoke(app, ["audit", "verify", str(run_copy)])
    assert result.exit_code == 1 and shared in result.output


def check_weights_flips(run_copy: Path) -> None:
    """Flip bytes of every weights file one at a time: each flip fails, naming the file."""
    files = weight_files(run_copy)
    assert files
    for path in files:
        target = run_copy / path
        original = target.read_bytes()
        # The first and last byte, and ten more spread over the file (header and tensor data).
        size = len(original)
        for position in sorted({0, size - 1, *range(0, size, max(1, size // 10))}):
            _flip(target, position)
            problem = verify_run(run_copy)
            assert isinstance(problem, Problem) and problem.file == path, (path, position, problem)
            target.write_bytes(original)
    assert isinstance(verify_run(run_copy), Verified)


def test_a_missing_or_extra_weights_file_or_an_edited_config_fails(run_copy):
    silo = "models/federated/silo-france.safetensors"
    moved = (run_copy / silo).read_bytes()
    (run_copy / silo).unlink()
    problem = verify_run(run_copy)
    assert problem.file == silo and "missing" in problem.reason
    (run_copy / silo).write_bytes(moved)
    extra = run_copy / "models" / "federated" / "silo-atlantis.safetensors"
    extra.write_bytes(moved)
    problem = verify_run(run_copy)
    assert problem.file == "models/federated/silo-atlantis.safetensors"
    extra.unlink()
    config = run_copy / "config.toml"
    config.write_text(config.read_text().replace("seed = 3", "seed = 4"))
    assert verify_run(run_copy).file == "config.toml"


def test_a_removed_or_reordered_entry_in_a_run_log_fails(run_copy):
    log = run_copy / LOG_FILE
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join([lines[0], lines[2], lines[1], *lines[3:]]))
    result = CliRunner().invoke(app, ["audit", "verify", str(run_copy)])
    assert result.exit_code == 1 and "entry 1:" in result.output
    log.write_bytes(b"".join([*lines[:2], *lines[3:]]))
    assert verify_run(run_copy).entry == 2
    log.write_bytes(b"".join(lines[:-1]))
    assert verify_run(run_copy).entry == len(lines) - 1


def test_a_folder_without_a_log_is_a_one_line_error(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    for folder in (tmp_path, tmp_path / "nowhere"):
        result = fedshop("audit", "verify", folder)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, result.stderr
    assert "audit log" in lines[0] or "no such folder" in lines[0]


# -- a deployed silo (its `SiloNode` in this process, as Flower runs it) -----------------------------


def silo_task(config, shared, run: str, round_number: int, final: bool = False) -> RecordDict:
    """The server's training message of `round_number` (or the final one) to a deployed silo."""
    from fedshop.deploy import wire

    values = {"round": round_number, "config": config.to_toml(), "evaluate": False}
    values.update(final=final, run=run)
    return RecordDict({"task": ConfigRecord(values), "shared": wire.params_record(shared)})


def test_a_deployed_silo_signs_the_model_it_receives_and_its_own_weights_file(retail, tmp_path):
    from fedshop.deploy import wire
    from fedshop.deploy.pki import make_audit_keys
    from fedshop.deploy.silo_app import SiloNode
    from fedshop.deploy.silo_files import write_silo_file
    from fedshop.deploy.silo_policy import SiloPolicy, policy_path
    from fedshop.fl.aggregation import aggregation_pipeline
    from fedshop.fl.audit import silo_weights_file
    from fedshop.fl.in_process import make_server

    index = min(range(retail.n_silos), key=lambda i: retail.silo(i).n_users)
    data = write_silo_file(tmp_path / "silo.npz", retail, index)
    policy_path(data).write_text(SiloPolicy().to_toml())
    key, public = make_audit_keys(tmp_path / "keys", "silo-0")
    assert key.name == "audit-silo-0.key" and public.name == "audit-silo-0.pub"
    public = public.read_text().strip()
    config = load_config(overrides={"methods": ["federated"], "model.dim": 8})
    pool = torch.arange(retail.n_silos)
    shared = make_server(config, retail.n_items, pool, aggregation_pipeline("fedavg")).shared
    node_config = {
        "silo-data": str(data),
        "state-dir": str(tmp_path / "state"),
        "audit-key": str(key),
    }
    run = "d" * 32
    assert str(SiloNode(node_config).hello()["silo"]["audit-key"]) == public

    def task(round_number: int, final: bool = False) -> RecordDict:
        return silo_task(config, shared, run, round_number, final)

    reply = SiloNode(node_config).train(task(1))
    ack = wire.record_audit(reply, "ack")
    model = tensors_digest(shared)
    assert signature_valid(public, ack_message(run, 1, model), ack)
    assert not signature_valid(public, ack_message(run, 2, model), ack)  # bound to its round
    final = SiloNode(node_config).evaluate(task(1, final=True))
    assert signature_valid(
        public, final_ack_message(run, model), wire.record_audit(final, "final-ack")
    )
    body = json.loads(wire.record_audit(final, "files"))
    name = retail.silo_names[index]
    assert signature_valid(public, files_message(run, name, body["files"]), body["signature"])
    # The hash the silo signed is that of the file the run folder's writer makes of its vectors
    # (`deploy.launch.collect`: final.pt and the silo's users).
    saved = torch.load(tmp_path / "state" / "runs" / run / "final.pt", weights_only=True)
    saved["users"] = torch.tensor(retail.silo(index).users)
    assert body["files"] == {silo_weights_file(name): sha256_hex(safetensors_bytes(saved))}
    # Without a key a silo signs nothing (its acknowledgements are then missing from the log).
    del node_config["audit-key"]
    assert wire.record_audit(SiloNode(node_config).train(task(1)), "ack") is None


def test_verify_with_the_parties_own_keys_refuses_a_header_naming_others(audited_run, tmp_path):
    parties = verify_run(audited_run).parties
    keys = tmp_path / "keys"
    keys.mkdir()
    for party, info in parties.items():
        (keys / f"audit-silo-{party}.pub").write_text(info["key"] + "\n")
    result = CliRunner().invoke(app, ["audit", "verify", str(audited_run), "--keys", str(keys)])
    assert result.exit_code == 0, result.output
    (keys / "audit-silo-3.pub").write_text(Signer.generate().public + "\n")
    result = CliRunner().invoke(app, ["audit", "verify", str(audited_run), "--keys", str(keys)])
    assert result.exit_code == 1 and "entry 0:" in result.output
    assert f"{parties[3]['name']}'s key in the header is not the one" in result.output


def test_a_cross_device_run_is_logged_by_the_server_alone_and_verifies(retail, tmp_path):
    config = load_config(
        overrides={
            "federated.mode": "cross-device", "federated.rounds": 2,
            "federated.clients_per_round": 200, "eval.protocol": "sampled-100",
            "eval.eval_every": 2, "methods": ["federated"], "model.dim": 8,
        }
    )  # fmt: skip
    write_run(tmp_path, run_experiment(config, retail))
    verified = verify_run(tmp_path)
    assert isinstance(verified, Verified), verified
    assert verified.parties == {} and verified.acks == 0 and verified.rounds == 2
    rounds = [e["body"] for e in read_entries(tmp_path / LOG_FILE) if e["kind"] == "round"]
    # A count, not a list of shoppers; no per-shopper messages in the vectorised simulator.
    assert [r["participants"] for r in rounds] == [200, 200]
    assert all(r["messages_digest"] is None and "acks" not in r for r in rounds)
    assert set(verified.signed_by.values()) == {"server"}
    _flip(tmp_path / "models" / "federated" / "shared.safetensors", 200)
    assert verify_run(tmp_path).file == "models/federated/shared.safetensors"


def test_a_result_written_twice_gives_a_log_that_verifies_both_times(retail, tmp_path):
    config = load_config(overrides={**SMALL, "federated.rounds": 1, "methods": ["federated"]})
    result = run_experiment(config, retail)
    for folder in (tmp_path / "a", tmp_path / "b"):
        folder.mkdir()
        write_run(folder, result)
        assert isinstance(verify_run(folder), Verified)
    assert (tmp_path / "a" / LOG_FILE).read_bytes() == (tmp_path / "b" / LOG_FILE).read_bytes()


# -- a fit run (`--task fit`): the same log, the shops' keys ----------------------------------------

FIT = {
    "task": "fit", "data.dataset": "renttherunway", "fit.max_shoppers": 2000,
    "federated.rounds": 2, "fit.methods": ["federated", "majority", "local_only"],
}  # fmt: skip


@pytest.fixture(scope="module")
def audited_fit_run(data_dir, tmp_path_factory) -> Path:
    """A small fit run (2 rounds, RentTheRunway's 8 shops) with two baselines, written."""
    from fedshop.data.fit_feedback import load_fit_dataset
    from fedshop.fit_experiment import run_fit_experiment
    from fedshop.report.fit_run import write_fit_run

    config = load_config(overrides={**FIT, "data.data_dir": str(data_dir)})
    dataset = load_fit_dataset(config.data, config.fit, config.seed)
    folder = tmp_path_factory.mktemp("audited-fit") / "run"
    folder.mkdir()
    write_fit_run(folder, run_fit_experiment(config, dataset))
    return folder


def test_an_untouched_fit_run_verifies_and_each_shop_signs_its_own_files(audited_fit_run):
    result = fedshop("audit", "verify", audited_fit_run)
    assert result.returncode == 0, result.stderr
    assert "verified" in result.stdout
    verified = verify_run(audited_fit_run)
    assert isinstance(verified, Verified), verified
    assert verified.rounds == 2 and len(verified.parties) == 8
    entries = read_entries(audited_fit_run / LOG_FILE)
    assert [e["kind"] for e in entries] == [
        "header", "round", "round", "final", *["silo-files"] * 8, "files", "end",
    ]  # fmt: skip
    rounds = [e["body"] for e in entries if e["kind"] == "round"]
    assert verified.acks == sum(len(r["participants"]) for r in rounds) + 8
    assert all(r["messages"] is not None and r["epsilon"] is None for r in rounds)
    files = weight_files(audited_fit_run)
    # The shared model, each shop's file and customer map, each shop's local model, the majority.
    assert set(files) == set(verified.files) and len(files) == 1 + 8 * 2 + 8 + 1
    names = {info["name"] for info in verified.parties.values()}
    for path in files:
        who = verified.signed_by[path]
        if path.startswith("models/federated/silo-"):
            assert who in names and slug(who) in path
        else:  # the shared model and the baselines: the server's word
            assert who == "server"
    assert verified.model_file == "models/federated/shared.safetensors"


def test_a_flipped_byte_in_a_fit_runs_log_or_weights_fails_naming_it(audited_fit_run, tmp_path):
    run_copy = Path(shutil.copytree(audited_fit_run, tmp_path / "run"))
    check_log_flips(run_copy, step=53)  # a shorter log than a recommendation run's: more often
    check_weights_flips(run_copy)
    silo = next(p for p in weight_files(run_copy) if p.startswith("models/federated/silo-"))
    _flip(run_copy / silo, 50)
    result = CliRunner().invoke(app, ["audit", "verify", str(run_copy)])
    assert result.exit_code == 1 and silo in result.output


def test_a_deployed_shop_signs_the_model_it_receives_and_its_own_weights_file(data_dir, tmp_path):
    """A fit run's deployed shop (its `SiloNode` in this process, as Flower runs it): the same
    acknowledgements, and its signed record of the file `deploy.launch.collect_fit` writes."""
    from fedshop.data.fit_feedback import load_fit_dataset
    from fedshop.deploy import wire
    from fedshop.deploy.pki import make_audit_keys
    from fedshop.deploy.silo_app import SiloNode
    from fedshop.deploy.silo_files import write_fit_silo_file
    from fedshop.deploy.silo_policy import SiloPolicy, policy_path
    from fedshop.fl.audit import silo_weights_file
    from fedshop.fl.fit_silo import FitShapes, fit_pipeline, make_fit_server

    config = load_config(
        overrides={**FIT, "data.data_dir": str(data_dir), "fit.methods": ["federated"]}
    )
    dataset = load_fit_dataset(config.data, config.fit, config.seed)
    index = min(range(dataset.n_silos), key=lambda i: dataset.silos[i].n_users)
    data = write_fit_silo_file(tmp_path / "silo.npz", dataset, index)
    policy_path(data).write_text(SiloPolicy().to_toml())
    key, public = make_audit_keys(tmp_path / "keys", f"silo-{index}")
    public = public.read_text().strip()
    pipeline = fit_pipeline(config, private=False)
    shared = make_fit_server(config, FitShapes.of(dataset), dataset.n_silos, pipeline).shared
    node_config = {"silo-data": str(data), "state-dir": str(tmp_path / "state"),
                   "audit-key": str(key)}  # fmt: skip
    run = "f" * 32
    assert str(SiloNode(node_config).hello()["silo"]["audit-key"]) == public

    def task(round_number: int, final: bool = False) -> RecordDict:
        return silo_task(config, shared, run, round_number, final)

    model = tensors_digest(shared)
    ack = wire.record_audit(SiloNode(node_config).train(task(1)), "ack")
    assert signature_valid(public, ack_message(run, 1, model), ack)
    final = SiloNode(node_config).evaluate(task(1, final=True))
    assert signature_valid(
        public, final_ack_message(run, model), wire.record_audit(final, "final-ack")
    )
    body = json.loads(wire.record_audit(final, "files"))
    name = dataset.silos[index].name
    assert body["party"] == index
    assert signature_valid(public, files_message(run, name, body["files"]), body["signature"])
    # The hash the shop signed is that of the file the coordinator writes (`collect_fit`: final.pt
    # and the shop's customers by their own ids).
    saved = torch.load(tmp_path / "state" / "runs" / run / "final.pt", weights_only=True)
    ids = np.asarray(dataset.user_ids, dtype=np.int64)[dataset.silos[index].users]
    saved["users"] = torch.tensor(ids)
    assert body["files"] == {silo_weights_file(name): sha256_hex(safetensors_bytes(saved))}
