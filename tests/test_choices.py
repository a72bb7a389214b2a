"""The registries of named choices: what config validation accepts is what the dispatchers build and
what the help shows, and reading them imports nothing heavy."""

import subprocess
import sys

import pytest
from dp_accounting import pld, rdp

from fedshop.choices import (
    ACCOUNTANTS,
    AGGREGATIONS,
    DATASETS,
    MODELS,
    PROTECTIONS,
    REGISTRIES,
    SERVER_OPTIMIZERS,
    choices,
    help_text,
)
from fedshop.config import DataConfig, FederatedConfig, ProtectionConfig, load_config
from fedshop.data import amazon, movielens, renttherunway
from fedshop.data.datasets import load_dataset
from fedshop.deploy import check_deployable
from fedshop.errors import ConfigError, FedShopError
from fedshop.fl.aggregation import aggregation_pipeline, normalise_by_local_steps
from fedshop.fl.server_opt import make_server_optimizer
from fedshop.messages import AggregationPipeline
from fedshop.models.spec import get_model
from fedshop.privacy.accounting import make_accountant
from fedshop.secure.protected_sum import make_protection


def test_every_target_loads():
    for registry in REGISTRIES.values():
        for name in registry.names():
            if registry.check(name).target:
                assert registry.get(name) is not None, name


def test_datasets_are_the_ones_the_readers_know():
    known = {
        "online-retail", *movielens.RELEASES, *amazon.CATEGORIES, amazon.SEQUENTIAL_DATASET,
        renttherunway.DATASET,  # fit feedback, read by data/fit_feedback.py for --task fit
    }  # fmt: skip
    assert set(DATASETS.names()) == known


def test_dispatchers_build_what_the_name_says():
    for name in MODELS.names():
        assert get_model(name).name == name
    for name in SERVER_OPTIMIZERS.names():
        optimizer = make_server_optimizer(FederatedConfig(server_optimizer=name))
        assert type(optimizer).__name__.lower() == name
    assert isinstance(make_accountant("rdp"), rdp.RdpAccountant)
    assert isinstance(make_accountant("pld"), pld.PLDAccountant)
    assert set(ACCOUNTANTS.names()) == {"rdp", "pld"}
    pipelines = {name: aggregation_pipeline(name) for name in AGGREGATIONS.names()}
    assert pipelines["fedavg"] == AggregationPipeline()
    assert normalise_by_local_steps in pipelines["fednova"].client_stages
    assert make_protection(ProtectionConfig(kind="none")) is None
    for name in PROTECTIONS.names()[1:]:
        assert make_protection(ProtectionConfig(kind=name, paillier_key_bits=1024)).kind == name


def test_an_unknown_name_is_one_error_listing_the_accepted_ones():
    with pytest.raises(
        ConfigError,
        match=r"^model must be one of mf-bpr, gmf, neumf, mf-features, sasrec; got 'svd'$",
    ):
        get_model("svd")
    with pytest.raises(ConfigError, match=r"^accountant must be one of rdp, pld; got 'moments'$"):
        make_accountant("moments")
    with pytest.raises(ConfigError, match="aggregation must be one of fedavg, fednova; got 'x'"):
        aggregation_pipeline("x")
    with pytest.raises(ConfigError, match=r"^\[data\] dataset must be one of online-retail, "):
        load_config(overrides={"data.dataset": "mnist"})
    with pytest.raises(ConfigError, match="dataset must be one of"):
        load_dataset(DataConfig(dataset="mnist"))
    with pytest.raises(KeyError, match="no registry 'colour'; there are: dataset, model"):
        choices("colour")


def test_choices_and_help_read_the_registry():
    assert choices("protection") == ("none", "secagg", "ckks", "paillier")
    assert help_text("federated_mode") == (
        "cross-silo (silos are clients) or cross-device (every shopper is a client)"
    )
    assert help_text("model") == (
        "mf-bpr, gmf, neumf, mf-features (MF + item-feature tower) or sasrec (sequential; amazon-*)"
    )


def test_protections_tagged_for_deployment_are_the_ones_it_runs():
    assert choices("protection", tag="deploy") == ("none", "secagg")
    for name in PROTECTIONS.names():
        config = load_config(overrides={"protection.kind": name})
        if name in choices("protection", tag="deploy"):
            check_deployable(config)
        else:
            with pytest.raises(FedShopError, match="needs a key-holder party"):
                check_deployable(config)


def test_a_deployment_refuses_wire_codecs_and_runs_low_rank():
    with pytest.raises(FedShopError, match="simulated only"):
        check_deployable(load_config(overrides={"communication.codec": "int8-row"}))
    check_deployable(load_config(overrides={"communication.low_rank": 8}))


def test_reading_the_registries_and_the_config_imports_nothing_heavy():
    heavy = ("torch", "numpy", "pandas", "dp_accounting", "tenseal", "phe", "cryptography")
    code = (
        "import sys\n"
        "from fedshop.choices import REGISTRIES, help_text\n"
        "from fedshop.config import load_config\n"
        "load_config(overrides={'protection.kind': 'secagg', 'model.name': 'neumf'})\n"
        "[help_text(kind) for kind in REGISTRIES]\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
