import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# Tests read the real datasets from ../shared/data (see SOURCES.md there), never a download.
os.environ.setdefault("FEDSHOP_DATA_DIR", str(SHARED_DATA))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["FEDSHOP_DATA_DIR"])
    if not (path / "online_retail" / "online_retail.parquet").exists():
        pytest.fail(f"real datasets not found in {path}; set FEDSHOP_DATA_DIR to shared/data")
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
