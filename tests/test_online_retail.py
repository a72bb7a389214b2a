import shutil

import numpy as np
import pandas as pd
import pytest

from fedshop.config import DataConfig
from fedshop.data import online_retail
from fedshop.data.datasets import load_dataset, online_retail_file
from fedshop.errors import DataError


def lines(*rows):
    frame = pd.DataFrame(rows, columns=list(online_retail.COLUMNS))
    frame["InvoiceDate"] = pd.to_datetime(frame["InvoiceDate"])
    frame["CustomerID"] = frame["CustomerID"].astype("Float64")
    return frame


def test_cleaning_rules_each_counted():
    raw = lines(
        ("536365", "85123A", "LANTERN", 6, "2010-12-01 08:26", 2.55, 17850, "United Kingdom"),
        ("536366", "71053", "METAL LANTERN", 6, "2010-12-01 08:28", 3.39, None, "United Kingdom"),
        ("C536379", "22556", "PLASTERS", -12, "2010-12-01 09:41", 1.65, 14527, "United Kingdom"),
        ("536370", "POST", "POSTAGE", 3, "2010-12-01 08:45", 18.0, 12583, "France"),
        ("536371", "gift_0001_20", "VOUCHER", 1, "2010-12-01 08:45", 16.67, 12583, "France"),
        ("536372", "22633", "HAND WARMER", 0, "2010-12-01 09:01", 1.85, 17850, "United Kingdom"),
        ("536373", "22632", "HAND WARMER RED", 6, "2010-12-01 09:02", 0.0, 17850, "United Kingdom"),
        ("C536380", "POST", "POSTAGE", -1, "2010-12-01 09:41", 18.0, 14527, "United Kingdom"),
    )
    cleaned = online_retail.clean(raw)
    assert cleaned.counts["missing_customer"] == 1
    assert cleaned.counts["cancellations"] == 2
    assert cleaned.counts["returns_non_product"] == 1
    assert cleaned.counts["non_product"] == 2
    assert cleaned.counts["non_positive_quantity"] == 1
    assert cleaned.counts["non_positive_price"] == 1
    assert list(cleaned.purchases["StockCode"]) == ["85123A"]
    assert list(cleaned.returns["InvoiceNo"]) == ["C536379"]
    assert cleaned.purchases["CustomerID"].dtype == np.int64
    # Every raw row is accounted for exactly once.
    removed = (
        sum(cleaned.counts[k] for k in online_retail.CLEANING_RULES)
        + cleaned.counts["purchase_rows"]
    )
    assert removed == cleaned.counts["raw_rows"]


def test_embedded_copy_is_the_complete_uci_table(data_dir):
    embedded = online_retail.read_raw(online_retail.embedded_path())
    shared = online_retail.read_raw(data_dir / "online_retail" / "online_retail.parquet")
    assert len(embedded) == online_retail.OFFICIAL_ROWS
    # The official statistics from SOURCES.md: total revenue and customer count.
    assert (embedded["Quantity"] * embedded["UnitPrice"]).sum() == pytest.approx(9_747_747.93)
    assert embedded["CustomerID"].nunique() == 4372
    pd.testing.assert_frame_equal(embedded, shared)


def test_csv_and_parquet_give_the_same_cleaned_table(tmp_path):
    raw = online_retail.read_raw(online_retail.embedded_path()).head(3000)
    raw.to_csv(tmp_path / "retail.csv", index=False)
    from_csv = online_retail.read_raw(tmp_path / "retail.csv")
    a = online_retail.clean(raw).purchases
    b = online_retail.clean(from_csv).purchases
    pd.testing.assert_frame_equal(a, b, check_dtype=False)


def test_xlsx_in_the_published_format(tmp_path):
    raw = online_retail.read_raw(online_retail.embedded_path()).head(200)
    raw.assign(CustomerID=raw["CustomerID"].astype(float)).to_excel(
        tmp_path / "Online Retail.xlsx", index=False
    )
    from_xlsx = online_retail.read_raw(tmp_path / "Online Retail.xlsx")
    assert len(from_xlsx) == 200
    assert online_retail.clean(from_xlsx).counts == online_retail.clean(raw).counts


def test_wrong_columns_are_a_clear_error(tmp_path):
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="missing column"):
        online_retail.read_raw(tmp_path / "bad.csv")


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(DataError, match="not found"):
        online_retail.read_raw(tmp_path / "nope.xlsx")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(DataError, match="unsupported"):
        online_retail.read_raw(tmp_path / "x.json")


def test_corrupt_file_is_a_clear_error(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="could not read"):
        online_retail.read_raw(tmp_path / "broken.parquet")


def test_source_resolution_order(tmp_path, monkeypatch):
    data_dir = tmp_path / "shared"  # laid out like ../shared/data
    (data_dir / "online_retail").mkdir(parents=True)
    shutil.copy(online_retail.embedded_path(), data_dir / "online_retail" / "online_retail.parquet")
    explicit = tmp_path / "mine.csv"
    assert online_retail_file(DataConfig(path=str(explicit)))[0] == explicit
    assert online_retail_file(DataConfig(data_dir=str(data_dir)))[0] == (
        data_dir / "online_retail" / "online_retail.parquet"
    )
    monkeypatch.setenv("FEDSHOP_DATA_DIR", str(data_dir))
    assert online_retail_file(DataConfig())[0].is_relative_to(data_dir)
    assert online_retail_file(DataConfig(source="embedded"))[0] == online_retail.embedded_path()
    monkeypatch.delenv("FEDSHOP_DATA_DIR")
    assert online_retail_file(DataConfig())[0] == online_retail.embedded_path()
    with pytest.raises(DataError, match="no Online Retail file"):
        online_retail_file(DataConfig(data_dir=str(tmp_path)))


def test_dataset_report_and_shapes(retail):
    report = retail.report
    assert report["cleaning"]["raw_rows"] == online_retail.OFFICIAL_ROWS
    assert retail.train.shape == (retail.n_users, retail.n_items)
    assert sum(s["customers"] for s in report["silos"]) == retail.n_users
    assert report["split"]["test_users"] == int((np.diff(retail.test.indptr) > 0).sum())
    # Item names come from the descriptions.
    assert "WHITE HANGING HEART T-LIGHT HOLDER" in set(retail.item_names)


def test_loads_from_an_explicit_csv(tmp_path):
    raw = online_retail.read_raw(online_retail.embedded_path())
    raw[raw["Country"].isin(["France", "Germany"])].to_csv(tmp_path / "eu.csv", index=False)
    dataset = load_dataset(DataConfig(path=str(tmp_path / "eu.csv"), min_silo_customers=1))
    assert set(dataset.silo_names) == {"France", "Germany"}


def test_official_zip_with_xlsx_inside(tmp_path):
    import zipfile

    raw = online_retail.read_raw(online_retail.embedded_path()).head(100)
    xlsx = tmp_path / "Online Retail.xlsx"
    raw.assign(CustomerID=raw["CustomerID"].astype(float)).to_excel(xlsx, index=False)
    with zipfile.ZipFile(tmp_path / "online+retail.zip", "w") as archive:
        archive.write(xlsx, "Online Retail.xlsx")
    from_zip = online_retail.read_raw(tmp_path / "online+retail.zip")
    pd.testing.assert_frame_equal(from_zip, online_retail.read_raw(xlsx))
