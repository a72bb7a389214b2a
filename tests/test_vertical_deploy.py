"""The vertical scenario as real processes on loopback: the label holder as Flower's ServerApp, the
feature holder as a SuperNode with only its own file, TLS and node authentication, PSI over a TLS
link between them; and a party that disconnects stops the run with nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedshop.deploy.processes import DeploymentError
from fedshop.deploy.vertical_launch import deploy_vertical
from fedshop.errors import FedShopError
from fedshop.secure.psi import psi_available
from fedshop.vertical.scenario import PartyTable
from fedshop.vertical.settings import load_vertical_config
from fedshop.vertical.simulate import NoPartners, VerticalSettings, block, build_scenario
from fedshop.vertical.split_learning import FeatureHolder, LabelHolder, LocalTransport, train_split

pytestmark = [
    pytest.mark.usefixtures("nginx"),
    pytest.mark.skipif(not psi_available("rr22"), reason="spu (the RR22 PSI) is not installed"),
]


@pytest.fixture(scope="module")
def small(data_dir):
    config = load_vertical_config(
        None, {"scenario.max_customers": 2500, "split.rounds": 2, "split.batch_size": 512}
    )
    settings = VerticalSettings(data_dir=str(data_dir), max_customers=2500)
    return config, build_scenario(settings, config.seed)


@pytest.fixture(scope="module")
def deployed(small, tmp_path_factory):
    config, scenario = small
    out = tmp_path_factory.mktemp("vertical")
    return out, deploy_vertical(config, scenario, out, round_timeout=120, wait_timeout=120)


def test_the_deployment_aligns_by_psi_and_trains_as_the_simulator(small, deployed):
    config, scenario = small
    _, outcome = deployed
    aligned = scenario.aligned_ids()
    assert outcome["psi"]["aligned_customers"] == len(aligned)
    psi = outcome["psi"]["with"]["partner"]
    assert psi["intersection_size"] == len(aligned)
    assert psi["feature_holder_learned_intersection"] is True
    # The same algorithm in one process, on the clear intersection: the same model.
    plan = config.plan
    holders = {
        t.name: FeatureHolder(t.frame, t.columns, aligned, plan, name=t.name)
        for t in scenario.features
    }
    label = LabelHolder(scenario.label.frame, scenario.label.columns, aligned, plan)
    simulated = train_split(label, LocalTransport(holders), plan)
    assert outcome["exchanges"] == simulated.exchanges == 2 + plan.rounds
    assert outcome["joint"]["macro_auc"] == pytest.approx(simulated.metrics["macro_auc"], abs=1e-6)
    alone = block(
        train_split(
            LabelHolder(scenario.label.frame, scenario.label.columns, aligned, plan),
            NoPartners(),
            plan,
        )
    )
    assert outcome["label_holder_only"]["macro_auc"] == pytest.approx(alone["macro_auc"], abs=1e-6)


def test_each_party_holds_only_its_own_file(small, deployed):
    _, scenario = small
    out, _ = deployed
    folder = out / "deployment"
    partner = PartyTable.load(folder / "silos" / "silo-0.parquet")
    assert "fit" not in partner.frame.columns and "item_id" not in partner.frame.columns
    label = PartyTable.load(folder / "label" / "label.parquet")
    assert "height_in" not in label.frame.columns
    # The partner's customers outside the platform (C) are nowhere in the platform's file.
    only_partner = np.setdiff1d(partner.ids, scenario.label.ids)
    assert len(only_partner) > 0 and not np.isin(label.ids, only_partner).any()
    # The feature holder kept the aligned customers it learned, nothing of the label holder's A.
    state = folder / "silos" / "silo-0-state" / "runs"
    (run,) = list(state.iterdir())
    aligned = json.loads((run / "aligned.json").read_text())
    assert sorted(aligned) == sorted(int(i) for i in scenario.aligned_ids())
    for path in folder.rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"


@pytest.mark.slow
def test_a_feature_holder_that_disconnects_stops_the_run(small, tmp_path):
    config, scenario = small
    config = load_vertical_config(
        None, {"scenario.max_customers": 2500, "split.rounds": 30, "split.batch_size": 512}
    )

    def kill_the_partner(federation) -> None:
        import threading

        def later() -> None:
            import time

            deadline = time.monotonic() + 120
            log = federation.folder / "server" / "server.log"
            while time.monotonic() < deadline:
                if log.exists() and "exchange 3" in log.read_text():
                    federation.stop_process("silo-0")
                    return
                time.sleep(0.2)

        threading.Thread(target=later, daemon=True).start()

    with pytest.raises((DeploymentError, FedShopError)) as failure:
        deploy_vertical(
            config, scenario, tmp_path, round_timeout=10, wait_timeout=60,
            on_started=kill_the_partner,
        )  # fmt: skip
    assert "feature holder" in str(failure.value)
    assert not (tmp_path / "deployment" / "server" / "vertical-outcome.json").exists()
