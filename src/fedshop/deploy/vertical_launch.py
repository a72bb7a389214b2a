"""`fedshop vertical local`: the vertical scenario as real parties on this machine.

Each party gets only its own file: the label holder's (the platform's rentals and fit labels) beside
the server's config, each feature holder's (the partner's profiles) in its SuperNode's folder. The
federation is `processes.LocalFederation` (a SuperLink with TLS and node authentication, its nginx
front door, one SuperNode per feature holder), with the FedShop app run as `task = "vertical"`: the
label holder is the ServerApp (`vertical_server.py`), each feature holder the ClientApp
(`vertical_party.py`). PSI runs over a direct link between the label holder and each feature
holder, TLS with both ends authenticated by a link CA made here (`pki.make_link_certs`); the link
ports listen on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from fedshop.deploy.launch import LogFollower
from fedshop.deploy.pki import make_link_certs
from fedshop.deploy.processes import DeploymentError, LocalFederation, Silo, free_port
from fedshop.deploy.vertical_server import OUTCOME_FILE
from fedshop.storage.private_files import private_dir, write_private
from fedshop.vertical.settings import VerticalConfig


def prepare_parties(config: VerticalConfig, scenario, folder: Path):
    """Each party's own file and state folder, the link certificates, and the server's config."""
    private_dir(folder)
    names = [t.name for t in scenario.features]
    links = make_link_certs(folder / "link", ["label", *names], ["127.0.0.1", "localhost"])
    label_file = scenario.label.save(private_dir(folder / "label") / "label.parquet")
    silos = []
    for index, table in enumerate(scenario.features):
        data = table.save(private_dir(folder / "silos") / f"silo-{index}.parquet")
        state = private_dir(folder / "silos" / f"silo-{index}-state")
        link = links[table.name]
        extra = {
            "psi-address": f"127.0.0.1:{free_port()}",
            "psi-ca": str(link.ca), "psi-cert": str(link.certificate), "psi-key": str(link.key),
        }  # fmt: skip
        silos.append(Silo(index, data, state, extra_config=extra))
    server_config = write_private(folder / "server" / "config.toml", config.to_toml())
    return silos, label_file, server_config, links["label"]


def deploy_vertical(
    config: VerticalConfig,
    scenario,
    out: Path,
    on_line: Callable[[str], None] | None = None,
    round_timeout: float = 300.0,
    wait_timeout: float = 300.0,
    run_timeout: float = 3600.0,
    on_started: Callable[[LocalFederation], None] | None = None,
) -> dict:
    """Run the scenario's parties as a local federation; the label holder's outcome (joint model,
    its own baseline, PSI) and the wall-clock seconds."""
    folder = (out / "deployment").resolve()
    silos, label_file, server_config, link = prepare_parties(config, scenario, folder)
    started = time.perf_counter()
    follower = LogFollower(folder / "server" / "server.log", on_line)
    with LocalFederation(folder, silos) as fed:
        fed.start()
        if on_started is not None:
            on_started(fed)
        run_config = {
            "task": "vertical",
            "config-path": str(server_config),
            "out-dir": str(folder / "server"),
            "node-silos": str(fed.nodes_file.resolve()),
            "silos": len(silos),
            "round-timeout": float(round_timeout),
            "wait-timeout": float(wait_timeout),
            "label-data": str(label_file.resolve()),
            "psi-address": f"127.0.0.1:{free_port()}",
            "psi-ca": str(link.ca), "psi-cert": str(link.certificate), "psi-key": str(link.key),
        }  # fmt: skip
        run_id = fed.submit(run_config)
        fed.wait(run_id, run_timeout, on_poll=follower)
    follower()
    path = folder / "server" / OUTCOME_FILE
    if not path.exists():
        raise DeploymentError("the label holder finished without writing its outcome")
    outcome = json.loads(path.read_text())
    outcome["deployment_seconds"] = round(time.perf_counter() - started, 3)
    return outcome
