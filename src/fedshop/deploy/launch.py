"""`fedshop deploy local`: a FedShop run as a real federation on this machine.

The data is split into one file per silo, each silo runs as its own SuperNode process with only its
own file and state folder, the server runs as Flower's ServerApp, and the result is written as the
same run folder (config.toml, metrics.json, report.html, models/) as the simulator's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedshop.config import RunConfig
from fedshop.data.interactions import RecDataset, with_eval_negatives
from fedshop.deploy import check_deployable
from fedshop.deploy.checkpoint import read_run_identity
from fedshop.deploy.outcome import SHARED_FILE, Outcome
from fedshop.deploy.processes import LocalFederation, Silo
from fedshop.deploy.silo_files import write_silo_file
from fedshop.experiment import ExperimentResult, method_result, slug
from fedshop.privacy.dp import PrivacySummary
from fedshop.storage.private_files import private_dir, write_private


@dataclass(frozen=True)
class DeploySettings:
    min_silos: int = 0  # 0: every sampled silo must reply
    round_timeout: float = 300.0
    wait_timeout: float = 300.0
    run_timeout: float = 3600.0


def write_silo_files(config: RunConfig, dataset: RecDataset, folder: Path) -> list[Path]:
    """Each silo's data file, silo-N.npz in `folder`, with what the config's evaluation needs."""
    if config.eval.protocol == "sampled-100":
        dataset = with_eval_negatives(dataset, 100, config.seed)
    return [
        write_silo_file(folder / f"silo-{index}.npz", dataset, index)
        for index in range(dataset.n_silos)
    ]


def prepare(config: RunConfig, dataset: RecDataset, folder: Path) -> tuple[list[Silo], Path]:
    """One data file and state folder per silo, and the server's config file, all owner-only."""
    private_dir(folder)
    silos = []
    for index, data in enumerate(write_silo_files(config, dataset, folder / "silos")):
        state = private_dir(folder / "silos" / f"silo-{index}-state")
        silos.append(Silo(index, data, state))
    server_config = write_private(folder / "server" / "config.toml", config.to_toml())
    return silos, server_config


def run_config(folder: Path, server_config: Path, n_silos: int, settings: DeploySettings) -> dict:
    """The Flower run config of the FedShop app (see flower_app/pyproject.toml)."""
    return {
        "config-path": str(server_config),
        "out-dir": str(folder / "server"),
        "silos": n_silos,
        "min-silos": settings.min_silos,
        "round-timeout": float(settings.round_timeout),
        "wait-timeout": float(settings.wait_timeout),
    }


def deploy_local(
    config: RunConfig,
    dataset: RecDataset,
    out: Path,
    settings: DeploySettings = DeploySettings(),
    on_line: Callable[[str], None] | None = None,
) -> ExperimentResult:
    """Run `config` on `dataset` as a local federation; returns the result the run folder shows."""
    check_deployable(config)
    config = replace(config, methods=("federated",))
    folder = (out / "deployment").resolve()  # the parties run in folders of their own
    silos, server_config = prepare(config, dataset, folder)
    started = time.perf_counter()
    follower = LogFollower(folder / "server" / "server.log", on_line)
    with LocalFederation(folder, silos) as fed:
        fed.start()
        run_id = fed.submit(run_config(folder, server_config, len(silos), settings))
        fed.wait(run_id, settings.run_timeout, on_poll=follower)
    follower()
    return collect(config, dataset, folder, time.perf_counter() - started)


def collect(config: RunConfig, dataset: RecDataset, folder: Path, seconds: float):
    """The run's result from what the server wrote and what each silo kept."""
    server = folder / "server"
    outcome = Outcome.read(server)
    federated = method_result(outcome.per_silo, seconds)
    weights = {"federated/shared": load_file(str(server / SHARED_FILE))}
    run = read_run_identity(server)
    for index, name in enumerate(dataset.silo_names):
        final = folder / "silos" / f"silo-{index}-state" / "runs" / run / "final.pt"
        if final.exists():
            state = torch.load(final, weights_only=True)
            state["users"] = torch.tensor(dataset.silo(index).users)
            weights[f"federated/silo-{slug(name)}"] = state
    return ExperimentResult(
        config, dataset, {"federated": federated}, outcome.history, weights,
        outcome.privacy or PrivacySummary(), outcome.protection,
    )  # fmt: skip


class LogFollower:
    """Called now and then, hands each new line of the server's log to `on_line` (the CLI prints
    them)."""

    def __init__(self, path: Path, on_line: Callable[[str], None] | None) -> None:
        self.path, self.on_line, self.seen = path, on_line, 0

    def __call__(self) -> None:
        if self.on_line is None or not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        for line in lines[self.seen :]:
            self.on_line(line)
        self.seen = len(lines)
