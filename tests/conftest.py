import os
import socket
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# The research datasets are read from ../shared/data when it sits beside this repository (or from
# $FEDSHOP_DATA_DIR), never downloaded. Without either, Online Retail comes from the copy inside the
# package and the tests that need a research dataset are skipped (see `data_dir`).
if SHARED_DATA.is_dir():
    os.environ.setdefault("FEDSHOP_DATA_DIR", str(SHARED_DATA))

# Tests never spend from the developer's own privacy ledger (`fedshop demo` ends by releasing its
# cross-border insight through the default one): a throwaway ledger per session unless one is named.
os.environ.setdefault(
    "FEDSHOP_LEDGER_URL",
    f"sqlite:///{Path(tempfile.mkdtemp(prefix='fedshop-test-ledger-')) / 'ledger.sqlite'}",
)

# What the tests read from a folder laid out like ../shared/data.
RESEARCH_FILES = {
    "Online Retail": "online_retail/online_retail.parquet",
    "MovieLens-1M": "movielens-1m",
    "MovieLens-100K": "movielens-100k",
    "Amazon Toys": "amazon-2014-5core/Toys_and_Games.txt",
    "RentTheRunway": "renttherunway/renttherunway_clean.parquet",
}


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The research datasets. A test that needs them is skipped when they are absent, with one line
    naming the variable to set; CI sets FEDSHOP_REQUIRE_DATA=1, which makes that a failure."""
    path = Path(os.environ.get("FEDSHOP_DATA_DIR", SHARED_DATA))
    missing = [name for name, file in RESEARCH_FILES.items() if not (path / file).exists()]
    if missing:
        found = f"{', '.join(missing)} not in {path}" if path.is_dir() else f"no {path}"
        message = (
            f"research data ({found}): set FEDSHOP_DATA_DIR to a folder laid out like shared/data"
        )
        if os.environ.get("FEDSHOP_REQUIRE_DATA") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def retail():
    """The real Online Retail dataset, cleaned, partitioned and split with default settings."""
    from fedshop.config import DataConfig
    from fedshop.data.datasets import load_dataset

    return load_dataset(DataConfig())


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """No network for this test (downloads go through a refused proxy), an empty download cache, and
    an empty data directory, which is returned."""
    with socket.socket() as probe:  # a port on loopback with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # https only: urllib's global opener keeps the proxies it first saw, and other tests talk plain
    # http to a server on loopback.
    for variable in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(variable, f"http://127.0.0.1:{port}")
    for variable in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("FEDSHOP_CACHE_DIR", str(tmp_path / "cache"))
    empty = tmp_path / "data"
    empty.mkdir()
    return empty


@pytest.fixture(scope="session")
def nginx() -> str:
    """nginx, which a deployment's front door runs. Without it the deployment tests are skipped with
    one line saying what to install; under CI (which installs it in .ci/run) that is a failure."""
    from fedshop.deploy.front_door import FrontDoorError, nginx_binary

    try:
        return nginx_binary()
    except FrontDoorError:
        message = "nginx not found: the deployment tests need it (Debian: apt-get install nginx)"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


# Tests marked `slow` (recovery from failures in a real deployment: minutes each) run under CI
# (`CI=true`, as .ci/run sets on a fresh machine) or with FEDSHOP_SLOW=1, and are skipped, saying so,
# in a developer's default run, which stays well under 15 minutes on 2 cores.
def pytest_collection_modifyitems(config, items):
    if os.environ.get("CI") == "true" or os.environ.get("FEDSHOP_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: runs under CI=true or FEDSHOP_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
