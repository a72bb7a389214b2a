import os
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
    from fedshop.data.registry import load_dataset

    return load_dataset(DataConfig())
