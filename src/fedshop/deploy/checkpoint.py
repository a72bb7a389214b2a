"""The server's checkpoint: written after every round, read by a restarted server.

It holds the global parameters, the server optimiser's state, the round just finished, the sampling
stream's state, the round history and the privacy ledger's run id (a resumed run continues that
ledger run and composes its completed rounds again): everything the next round depends on. Each
checkpoint is a folder written in full before a one-line `LATEST` file is replaced to point at it,
so a server killed while writing leaves the previous checkpoint intact; older ones are removed
then. Everything is owner-only: the state shows the model and the silos' metrics.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors.torch import load_file, save

from fedshop.errors import FedShopError
from fedshop.fl.rounds import RoundRecord
from fedshop.fl.server import FederatedServer
from fedshop.storage.private_files import private_dir, write_private


@dataclass
class Checkpoint:
    round: int
    history: list[RoundRecord]
    config_digest: str
    run_id: str | None  # the privacy ledger's run, continued after a restart


def save_checkpoint(
    folder: Path,
    server: FederatedServer,
    history: list[RoundRecord],
    digest: str,
    run_id: str | None = None,
) -> Path:
    target = folder / f"round-{server.round:05d}"
    private_dir(target)
    tensors = {f"shared/{k}": v.contiguous() for k, v in server.shared.items()}
    tensors |= {f"optimizer/{k}": v.contiguous() for k, v in server.optimizer.state_dict().items()}
    tensors["sampling"] = server.sampling_state()
    write_private(target / "state.safetensors", save(tensors))
    meta = {
        "round": server.round,
        "config_digest": digest,
        "run_id": run_id,
        "history": [asdict(record) for record in history],
    }
    write_private(target / "state.json", json.dumps(meta) + "\n")
    write_private(folder / "LATEST", target.name + "\n")
    for older in folder.glob("round-*"):
        if older != target:
            shutil.rmtree(older)
    return target


def load_checkpoint(folder: Path, server: FederatedServer, digest: str) -> Checkpoint | None:
    """Restore `server` from the latest checkpoint in `folder`; None when there is none yet."""
    latest = folder / "LATEST"
    if not latest.is_file():
        return None
    target = folder / latest.read_text().strip()
    meta = json.loads((target / "state.json").read_text())
    if meta["config_digest"] != digest:
        raise FedShopError(
            f"the checkpoint in {folder} belongs to a run with another config; resume with the "
            "same config or start in an empty folder"
        )
    tensors = load_file(str(target / "state.safetensors"))
    server.shared = {
        k.removeprefix("shared/"): v for k, v in tensors.items() if k.startswith("shared/")
    }
    server.optimizer.load_state_dict(
        {k.removeprefix("optimizer/"): v for k, v in tensors.items() if k.startswith("optimizer/")}
    )
    server.load_sampling_state(tensors["sampling"])
    server.round = int(meta["round"])
    history = [RoundRecord(**record) for record in meta["history"]]
    return Checkpoint(server.round, history, digest, meta.get("run_id"))


RUN_FILE = "run.json"


def run_identity(folder: Path, digest: str) -> str:
    """The deployment run's id, made when the server first starts in `folder` (its out-dir) and
    read again by a restarted server. It goes with every task: each silo keeps its state for the
    run, and its DP noise's secret, in a folder of that name, so a new run never loads another's
    state nor draws its noise, and a restarted server's run carries on with the silos' state."""
    path = folder / RUN_FILE
    if path.exists():
        recorded = json.loads(path.read_text())
        if recorded["config_digest"] != digest:
            raise FedShopError(
                f"{folder} belongs to a run with another config; resume with the same config or "
                "start in an empty folder"
            )
        return str(recorded["run"])
    run = secrets.token_hex(16)
    write_private(path, json.dumps({"run": run, "config_digest": digest}) + "\n")
    return run


def read_run_identity(folder: Path) -> str:
    """The run id `run_identity` made in `folder`."""
    return str(json.loads((folder / RUN_FILE).read_text())["run"])


def config_digest(toml_text: str) -> str:
    return hashlib.sha256(toml_text.encode()).hexdigest()[:16]
