"""Small real runs for the tests that serve them: trained once per test session (through the
experiment API and the run folder writer, as `fedshop train` does) and shared by every module that
asks, so the serving tests pay for each training once; and `LiveServer`, a real server for them."""

from __future__ import annotations

import atexit
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from fedshop.config import load_config
from fedshop.data.datasets import load_dataset
from fedshop.experiment import ExperimentResult, run_experiment
from fedshop.report.run_folder import run_folder, write_run

# Seconds, not quality: one round, small vectors, the federated model only.
SMALL = {
    "seed": 3,
    "model.dim": 8,
    "federated.rounds": 1,
    "federated.personalise_epochs": 1,
    "methods": ["federated"],
}
RUNS = {
    # Online Retail, one silo per country, each with its private item-bias row.
    "retail-mf-cross-silo": {},
    # Every shopper a client; the user tables written per storefront.
    "retail-gmf-cross-device": {
        "model.name": "gmf",
        "federated.mode": "cross-device",
        "federated.clients_per_round": 256,
    },
    # A dataset without prices, numeric item ids, and the model with an MLP tower.
    "ml100k-neumf-cross-device": {
        "data.dataset": "movielens-100k",
        "model.name": "neumf",
        "federated.mode": "cross-device",
    },
}


@dataclass(frozen=True)
class TrainedRun:
    folder: Path
    result: ExperimentResult


_trained: dict[str, TrainedRun] = {}
_root: Path | None = None


def trained_run(kind: str) -> TrainedRun:
    """The run folder of `kind` (a key of RUNS), trained on first use."""
    global _root
    if kind not in _trained:
        if _root is None:
            _root = Path(tempfile.mkdtemp(prefix="fedshop-serving-runs-"))
            atexit.register(shutil.rmtree, _root, ignore_errors=True)
        config = load_config(overrides={**SMALL, **RUNS[kind]})
        dataset = load_dataset(config.data, seed=config.seed)
        with run_folder(_root / kind) as folder:
            result = run_experiment(config, dataset)
            write_run(folder, result)
        _trained[kind] = TrainedRun(folder, result)
    return _trained[kind]


def copy_run(kind: str, destination: Path) -> Path:
    """A copy of a trained run folder to change (the original is shared)."""
    return Path(shutil.copytree(trained_run(kind).folder, destination))


class LiveServer:
    """uvicorn serving `app` on a free port of 127.0.0.1, in a thread of this process."""

    def __init__(self, app) -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", access_log=False, ws="none")
        )
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [listener]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def close(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)
