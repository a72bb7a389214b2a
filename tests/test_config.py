import ast
from pathlib import Path

import pytest

from fedshop.config import Environment, RunConfig, load_config
from fedshop.errors import ConfigError


def test_defaults_round_trip_through_toml(tmp_path):
    config = load_config(overrides={"federated.rounds": 7, "data.min_silo_customers": 3})
    path = tmp_path / "run.toml"
    path.write_text(config.to_toml())
    assert load_config(path) == config
    assert isinstance(load_config(), RunConfig)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[model]\ndimension = 3\n", "unknown config key 'dimension' in \\[model\\]"),
        ("colour = 'red'\n", "unknown config key 'colour' at the top level"),
        ("[model]\ndim = -3\n", "\\[model\\] dim must be at least 1"),
        ("[model]\ndim = 'big'\n", "\\[model\\] dim must be an integer"),
        ("[federated]\nrounds = 0\n", "rounds must be at least 1"),
        ("[train]\nlearning_rate = 0\n", "learning_rate must be greater than 0"),
        ("[data]\ndataset = 'mnist'\n", "dataset must be one of"),
        ("[data]\nvalidation = 'yes'\n", "must be true or false"),
        ("methods = ['federated', 'magic']\n", "methods must be one of"),
        ("[eval]\nsplit = 'validation'\n", "needs \\[data\\] validation = true"),
        ("[federated]\nserver_momentum = 1.0\n", "server_momentum must be in"),
        ("[privacy]\nnoise_seed = -1\n", "noise_seed must be a positive integer"),
        ("[privacy]\nnoise_seed = true\n", "noise_seed must be an integer"),
        ("model = 3\n", "\\[model\\] must be a table"),
        ("[model\n", "not valid TOML"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_baseline_epochs_default_to_federated_passes():
    config = load_config(overrides={"federated.rounds": 4, "federated.local_epochs": 3})
    assert config.baseline_epochs == 12
    assert load_config(overrides={"baselines.epochs": 5}).baseline_epochs == 5


def test_example_configs_are_valid():
    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))
    assert len(configs) >= 3
    for path in configs:
        load_config(path)
    assert load_config(configs[0].parent / "demo.toml") == load_config()


def test_cross_device_mode_brings_its_own_defaults_unless_the_user_chose():
    device = load_config(overrides={"federated.mode": "cross-device"})
    assert device.federated.server_optimizer == "fedadam"
    assert device.federated.server_epsilon == 1e-8 and device.federated.local_epochs == 2
    chosen = load_config(
        overrides={"federated.mode": "cross-device", "federated.server_optimizer": "fedavg"}
    )
    # Picking the optimiser keeps the generic settings that go with it.
    assert chosen.federated.server_optimizer == "fedavg"
    assert chosen.federated.server_learning_rate == 1.0
    assert load_config().federated.server_optimizer == "fedavg"
    assert device.model.silo_item_bias is False and load_config().model.silo_item_bias is True
    with pytest.raises(ConfigError, match="silo_item_bias is cross-silo only"):
        load_config(overrides={"federated.mode": "cross-device", "model.silo_item_bias": True})


def test_environment_variables_are_read_in_the_config_layer_only(monkeypatch):
    monkeypatch.setenv("FEDSHOP_DATA_DIR", "/srv/data")
    monkeypatch.setenv("FEDSHOP_CACHE_DIR", "/srv/cache")
    monkeypatch.delenv("FEDSHOP_LEDGER_URL", raising=False)
    assert Environment.from_os() == Environment(data_dir="/srv/data", cache_dir="/srv/cache")
    source = Path(__file__).resolve().parents[1] / "src" / "fedshop"
    readers = {
        path.relative_to(source).as_posix()
        for path in source.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Attribute | ast.Name)
        and (node.attr if isinstance(node, ast.Attribute) else node.id) in ("environ", "getenv")
    }
    # deploy/processes.py hands the whole environment on to the parties' processes.
    # secure/psi_spu.py hands it on to each PSI session's own process (with TMPDIR set for it).
    assert readers == {"config.py", "deploy/processes.py", "secure/psi_spu.py"}
