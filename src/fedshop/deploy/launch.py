"""`fedshop deploy local`: a FedShop run as a real federation on this machine.

The data is split into one file per silo, each silo runs as its own SuperNode process with only its
own file and state folder, the server runs as Flower's ServerApp, and the result is written as the
same run folder (config.toml, metrics.json, report.html, models/) as the simulator's. A fit run
(`task = "fit"`) deploys the same way: one SuperNode per shop, with that shop's records only; so
does a retail task (`task = "demand" | "returns" | "fraud"`): one SuperNode per storefront, with
that storefront's table rows only, its metrics scored from the counts the storefronts send
(`report/retail_counts.py`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file

from fedshop.config import RETAIL_TASKS, RunConfig
from fedshop.data.fit_feedback import FitDataset
from fedshop.data.interactions import RecDataset, for_protocol
from fedshop.data.tabular import TabularDataset
from fedshop.deploy import check_deployable
from fedshop.deploy.checkpoint import read_run_identity
from fedshop.deploy.outcome import SHARED_FILE, Outcome
from fedshop.deploy.processes import LocalFederation, Silo
from fedshop.deploy.silo_files import (
    write_fit_silo_file,
    write_silo_file,
    write_table_silo_file,
)
from fedshop.deploy.silo_policy import SiloPolicy, policy_path
from fedshop.errors import FedShopError
from fedshop.eval.fit_metrics import FitCounts
from fedshop.eval.metrics import MetricSums
from fedshop.experiment import ExperimentResult, method_result, slug
from fedshop.fl.contribution import unavailable
from fedshop.privacy.dp import DpPlan, PrivacySummary
from fedshop.storage.private_files import private_dir, write_private

if TYPE_CHECKING:
    from fedshop.fit_experiment import FitResult
    from fedshop.retail_experiment import RetailResult


@dataclass(frozen=True)
class DeploySettings:
    min_silos: int = 0  # 0: every sampled silo must reply
    round_timeout: float = 300.0
    wait_timeout: float = 300.0
    run_timeout: float = 3600.0


# A recommender's purchases, a fit run's shops, or a retail task's storefronts' table.
Dataset = RecDataset | FitDataset | TabularDataset


def write_silo_files(config: RunConfig, dataset: Dataset, folder: Path) -> list[Path]:
    """Each silo's data file, silo-N.npz in `folder`, with what the config's evaluation needs, and
    beside it the policy the silo will hold the coordinator to (`silo_policy.py`): the protection
    this config asks for, as the least the silo accepts. A silo owner reviews and edits it."""
    if isinstance(dataset, FitDataset):
        write = write_fit_silo_file
    elif isinstance(dataset, TabularDataset):
        write = write_table_silo_file
    else:
        dataset = for_protocol(dataset, config.eval.protocol, config.eval.split, config.seed)
        write = write_silo_file
    policy = policy_for(config, dataset).to_toml()
    paths = []
    for index in range(dataset.n_silos):
        paths.append(write(folder / f"silo-{index}.npz", dataset, index))
        write_private(policy_path(paths[-1]), policy)
    return paths


def customer_counts(dataset: Dataset) -> list[int]:
    """Each silo's customers (a table's storefronts: their training rows)."""
    if isinstance(dataset, FitDataset):
        return [silo.n_users for silo in dataset.silos]
    if isinstance(dataset, TabularDataset):
        return [len(silo.train) for silo in dataset.silos]
    return [dataset.silo(i).n_users for i in range(dataset.n_silos)]


def policy_for(config: RunConfig, dataset: Dataset) -> SiloPolicy:
    """The policy that accepts exactly the protection `config` asks for on `dataset`."""
    secagg = config.protection.kind == "secagg"
    if not config.privacy.enabled:
        return SiloPolicy(require_secagg=secagg)
    plan = simulator_plan(config, dataset)
    planned = plan.planned_epsilon()
    return SiloPolicy(
        require_secagg=secagg, require_dp=True,
        min_noise_multiplier=plan.noise_multiplier, max_delta=plan.delta,
        max_epsilon_per_run=planned, budget_epsilon=max(config.privacy.budget, planned),
    )  # fmt: skip


def with_delta(config: RunConfig, dataset: Dataset) -> RunConfig:
    """`config` with δ stated, under DP: the simulator's δ for `dataset` (sized to all silos'
    customers), which this trial can compute because it splits the data itself. A deployment's
    server never sees the customer counts, so it needs δ in the config."""
    if not config.privacy.enabled or config.privacy.delta:
        return config
    delta = simulator_plan(config, dataset).delta
    return replace(config, privacy=replace(config.privacy, delta=delta))


def simulator_plan(config: RunConfig, dataset: Dataset) -> DpPlan:
    """The DP plan the simulator makes for `config` on `dataset`, from every silo's count."""
    from fedshop.experiment import record_level_plan

    return record_level_plan(config, customer_counts(dataset))


def prepare(config: RunConfig, dataset: Dataset, folder: Path) -> tuple[list[Silo], Path]:
    """One data file and state folder per silo, and the server's config file (δ stated under DP),
    all owner-only."""
    config = with_delta(config, dataset)
    private_dir(folder)
    silos = []
    for index, data in enumerate(write_silo_files(config, dataset, folder / "silos")):
        state = private_dir(folder / "silos" / f"silo-{index}-state")
        silos.append(Silo(index, data, state))
    server_config = write_private(folder / "server" / "config.toml", config.to_toml())
    return silos, server_config


def run_config(
    folder: Path, server_config: Path, n_silos: int, settings: DeploySettings, nodes: Path
) -> dict:
    """The Flower run config of the FedShop app (see flower_app/pyproject.toml)."""
    return {
        "config-path": str(server_config),
        "out-dir": str(folder / "server"),
        "node-silos": str(nodes.resolve()),
        "silos": n_silos,
        "min-silos": settings.min_silos,
        "round-timeout": float(settings.round_timeout),
        "wait-timeout": float(settings.wait_timeout),
    }


def deploy_local(
    config: RunConfig,
    dataset: Dataset,
    out: Path,
    settings: DeploySettings = DeploySettings(),
    on_line: Callable[[str], None] | None = None,
) -> ExperimentResult | FitResult | DeployedTable:
    """Run `config` on `dataset` as a local federation; returns the result the run folder shows."""
    check_deployable(config)
    config = with_delta(only_federated(config), dataset)
    folder = (out / "deployment").resolve()  # the parties run in folders of their own
    silos, server_config = prepare(config, dataset, folder)
    started = time.perf_counter()
    follower = LogFollower(folder / "server" / "server.log", on_line)
    with LocalFederation(folder, silos) as fed:
        fed.start()
        run_id = fed.submit(run_config(folder, server_config, len(silos), settings, fed.nodes_file))
        fed.wait(run_id, settings.run_timeout, on_poll=follower)
    follower()
    seconds = time.perf_counter() - started
    if isinstance(dataset, FitDataset):
        return collect_fit(config, dataset, folder, seconds)
    if isinstance(dataset, TabularDataset):
        return collect_table(config, dataset, folder, seconds)
    return collect(config, dataset, folder, seconds)


def only_federated(config: RunConfig) -> RunConfig:
    """A deployment runs the federated method only (the baselines are the simulator's)."""
    if config.task == "fit":
        return replace(config, fit=replace(config.fit, methods=("federated",)))
    if config.task in RETAIL_TASKS:
        return replace(config, retail=replace(config.retail, methods=("federated",)))
    return replace(config, methods=("federated",))


def collect(config: RunConfig, dataset: RecDataset, folder: Path, seconds: float):
    """The run's result from what the server wrote and what each silo kept."""
    server = folder / "server"
    outcome = Outcome.read(server)
    run = read_run_identity(server)
    per_silo = outcome.per_silo or kept_metrics(dataset, folder, run)
    federated = method_result(per_silo, seconds)
    weights = {"federated/shared": load_file(str(server / SHARED_FILE))}
    for index, name in enumerate(dataset.silo_names):
        final = folder / "silos" / f"silo-{index}-state" / "runs" / run / "final.pt"
        if final.exists():
            state = torch.load(final, weights_only=True)
            state["users"] = torch.tensor(dataset.silo(index).users)
            weights[f"federated/silo-{slug(name)}"] = state
    return ExperimentResult(
        config, dataset, {"federated": federated}, outcome.history, weights,
        outcome.privacy or PrivacySummary(), outcome.protection, audit=server_audit(server),
        contribution=unavailable(DEPLOYED_CONTRIBUTION),
    )  # fmt: skip


DEPLOYED_CONTRIBUTION = (
    "fedshop deploy: the server would have to send each silo every candidate model of a round "
    "for evaluation, which the deployment's protocol does not do yet (the simulator does)"
)


def server_audit(server: Path):
    """The server's audit log, for the run folder's writer to close with the weights files (with
    the server's key: on one machine the coordinator writes the run folder); None without one."""
    from fedshop.fl.audit import AuditTrail, RoundAudit
    from fedshop.storage.audit import LOG_FILE, AuditLog, Problem, Signer, read_entries

    path, key = server / LOG_FILE, server / "audit-server.key"
    if not path.exists() or not key.exists():
        return None
    entries = read_entries(path)
    if isinstance(entries, Problem):
        raise FedShopError(f"the server's audit log {path} is damaged: {entries}")
    return AuditTrail(RoundAudit(AuditLog(Signer.from_pem(key.read_bytes()), entries=entries)), {})


def collect_fit(config: RunConfig, dataset: FitDataset, folder: Path, seconds: float):
    """A fit run's result, as `fedshop train --task fit` reports its federated method. A shop's
    weights file holds its private tables and, as `users`, its customers by their own ids (what
    its silo file holds, `silo_files.write_fit_silo_file`; it never knows the trial's row
    indices, which the simulator's file holds there): the bytes the shop signed for the audit log
    (`silo_app.SiloNode._final_audit`)."""
    from fedshop.fit_experiment import FitResult, fit_method_result, message_bytes

    server = folder / "server"
    outcome = Outcome.read(server)
    run = read_run_identity(server)
    per_silo = outcome.per_silo or kept_metrics(dataset, folder, run)
    shared = load_file(str(server / SHARED_FILE))
    weights = {"federated/shared": shared}
    customer_ids = np.asarray(dataset.user_ids, dtype=np.int64)
    for silo in dataset.silos:
        final = folder / "silos" / f"silo-{silo.index}-state" / "runs" / run / "final.pt"
        if final.exists():
            state = torch.load(final, weights_only=True)
            weights[f"federated/silo-{slug(silo.name)}"] = {
                **state, "users": torch.tensor(customer_ids[silo.users]),
            }  # fmt: skip
    return FitResult(
        config, dataset, {"federated": fit_method_result(per_silo, seconds)}, outcome.history,
        weights, outcome.privacy or PrivacySummary(), outcome.protection,
        message_bytes(shared, dataset), audit=server_audit(server),
    )  # fmt: skip


@dataclass
class DeployedTable:
    """A deployed retail task's result and the storefronts' final counts of their held-out rows,
    which the run folder's writer scores (`report/retail_counts.py`)."""

    result: RetailResult
    per_silo: dict


def collect_table(
    config: RunConfig, dataset: TabularDataset, folder: Path, seconds: float
) -> DeployedTable:
    """A retail task's result, as `fedshop train --task …` reports its federated method: the
    shared network the server ended with (`models/federated/shared.safetensors`, the simulator's path;
    a storefront has no weights of its own), the rounds, and the metrics scored from the counts
    the storefronts sent of their held-out rows (`report/retail_counts.py` scores them: no row's
    score left its storefront)."""
    from fedshop.retail_experiment import RetailResult, Trained, message_bytes

    server = folder / "server"
    outcome = Outcome.read(server)
    shared = load_file(str(server / SHARED_FILE))
    federated = Trained({}, seconds, {"federated/shared": shared})
    result = RetailResult(
        config, dataset, {"federated": federated}, outcome.history, outcome.protection,
        server_audit(server), message_bytes(shared, dataset),
    )  # fmt: skip
    return DeployedTable(result, outcome.per_silo)


def kept_metrics(dataset: Dataset, folder: Path, run: str) -> dict[str, MetricSums]:
    """Under DP the silos keep their final metrics in their own state folders (nothing about their
    held-out baskets leaves them); this trial runs every party on one machine, so its report reads
    them there. On separate hosts each silo reads its own."""
    per_silo = {}
    for index, name in enumerate(dataset.silo_names):
        path = folder / "silos" / f"silo-{index}-state" / "runs" / run / "metrics-final.json"
        if path.exists():
            per_silo[name] = read_kept_metrics(json.loads(path.read_text()))
    return per_silo


def read_kept_metrics(kept: dict) -> MetricSums | FitCounts:
    """What `silo_app.kept_metrics_data` wrote: a fit run's counts, or metric sums."""
    if "confusion" in kept:
        return FitCounts(
            np.asarray(kept["confusion"], np.int64), np.asarray(kept["histograms"], np.int64)
        )
    return MetricSums(kept["sums"], int(kept["users"]))


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
