"""One real `fedshop deploy local` through the CLI, as an operator runs it, and the check of the
audit log it leaves: shared by the deployed size/fit and retail-task tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fedshop.config import RunConfig
from fedshop.storage.audit import LOG_FILE, Verified, read_entries, verify_run


def deploy_local(config: RunConfig, folder: Path, timeout: int) -> tuple[Path, str]:
    """`config` written to `folder/config.toml` and deployed to `folder/run`; the run folder and
    what the command printed."""
    (folder / "config.toml").write_text(config.to_toml())
    out = folder / "run"
    command = [
        sys.executable, "-m", "fedshop", "deploy", "local", "--config",
        str(folder / "config.toml"), "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


def verified_audit(out: Path, parties: int, rounds: int = 2) -> Verified:
    """The run's audit log verified by the CLI with the parties' own keys and here: `rounds` rounds,
    `parties` parties, each party's signed record of its files, closed by the files and the end."""
    keys = out / "deployment" / "keys"
    done = subprocess.run(
        [sys.executable, "-m", "fedshop", "audit", "verify", str(out), "--keys", str(keys)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    verified = verify_run(out)
    assert isinstance(verified, Verified), verified
    assert verified.rounds == rounds and len(verified.parties) == parties
    kinds = [e["kind"] for e in read_entries(out / LOG_FILE)]
    assert kinds.count("silo-files") == parties and kinds[-2:] == ["files", "end"]
    return verified
