"""UCI Online Retail (Chen, Sain & Guo 2012; UCI ML Repository #352; CC BY 4.0).

A UK online gift retailer's invoice lines from 2010-12-01 to 2011-12-09. Reads the published xlsx, a csv
export, or parquet (the package ships a re-encoded copy of the complete table), checks that the columns
are the published ones, and cleans the table by documented rules, counting what each rule removes.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pandas as pd

from fedshop.errors import DataError

COLUMNS = (
    "InvoiceNo",
    "StockCode",
    "Description",
    "Quantity",
    "InvoiceDate",
    "UnitPrice",
    "CustomerID",
    "Country",
)
OFFICIAL_URL = "https://archive.ics.uci.edu/static/public/352/online+retail.zip"
OFFICIAL_ROWS = 541_909
# File names looked for inside a data directory, in order of preference.
DATA_DIR_CANDIDATES = (
    "online_retail/online_retail.parquet",
    "online_retail/Online Retail.xlsx",
    "online_retail/online_retail.csv",
    "Online Retail.xlsx",
    "online_retail.parquet",
    "online_retail.csv",
)
EMBEDDED_FILE = "online_retail.parquet"

# Stock codes that are services or bookkeeping, not products a shopper chooses: postage and carriage,
# manual adjustments, discounts, samples, bad-debt adjustments, bank and marketplace fees, charity
# commission, a packing line, and gift vouchers.
NON_PRODUCT_CODES = frozenset(
    {"POST", "DOT", "C2", "M", "D", "S", "B", "BANK CHARGES", "AMAZONFEE", "CRUK", "PADS"}
)
NON_PRODUCT_PREFIXES = ("gift_",)

CLEANING_RULES = {
    "missing_customer": "rows without CustomerID are dropped (they cannot be tied to a shopper)",
    "cancellations": "invoices starting with 'C' are kept apart as the returns table",
    "non_product": "service and bookkeeping stock codes are excluded: "
    + ", ".join(sorted(NON_PRODUCT_CODES))
    + ", gift_* vouchers",
    "non_positive_quantity": "remaining rows with quantity <= 0 (stock adjustments) are dropped",
    "non_positive_price": "remaining rows with unit price <= 0 (free or written-off goods) are dropped",
}


@dataclass(frozen=True)
class CleanedRetail:
    """Purchases and returns after cleaning, with the count each rule removed."""

    purchases: pd.DataFrame
    returns: pd.DataFrame
    counts: dict[str, int]
    source: str


def embedded_path() -> Path:
    """The compact copy of the complete UCI table shipped inside the package."""
    return Path(str(resources.files("fedshop.data.embedded").joinpath(EMBEDDED_FILE)))


def read_raw(path: Path) -> pd.DataFrame:
    """Read the published table from xlsx, csv, parquet or the official zip, checking its columns."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"Online Retail file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif suffix in (".xlsx", ".xls"):
            frame = pd.read_excel(path, dtype={"InvoiceNo": str, "StockCode": str})
        elif suffix == ".csv":
            frame = pd.read_csv(
                path, dtype={"InvoiceNo": str, "StockCode": str}, encoding_errors="replace"
            )
        elif suffix == ".zip":
            frame = _read_zip(path)
        else:
            raise DataError(
                f"unsupported Online Retail file type '{suffix}' ({path}); "
                "use .xlsx, .csv, .parquet or the official .zip"
            )
    except DataError:
        raise
    except Exception as exc:  # a corrupt or foreign file: say which and why, without a traceback
        raise DataError(f"could not read {path}: {exc}") from None
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path} is not the Online Retail table: missing column(s) {', '.join(missing)} "
            f"(expected {', '.join(COLUMNS)})"
        )
    return _normalise_types(frame[list(COLUMNS)], path)


def _read_zip(path: Path) -> pd.DataFrame:
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.lower().endswith(".xlsx")]
        if not names:
            raise DataError(f"{path} holds no .xlsx file")
        with archive.open(names[0]) as handle:
            return pd.read_excel(handle, dtype={"InvoiceNo": str, "StockCode": str})


def _normalise_types(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            "InvoiceNo": frame["InvoiceNo"].astype(str).str.strip(),
            "StockCode": frame["StockCode"].astype(str).str.strip(),
            "Description": frame["Description"].astype(str).str.strip(),
        }
    )
    try:
        out["Quantity"] = pd.to_numeric(frame["Quantity"], errors="raise").astype("int64")
        out["InvoiceDate"] = pd.to_datetime(frame["InvoiceDate"], errors="raise")
        out["UnitPrice"] = pd.to_numeric(frame["UnitPrice"], errors="raise").astype("float64")
        out["CustomerID"] = pd.to_numeric(frame["CustomerID"], errors="raise").astype("Float64")
    except (ValueError, TypeError) as exc:
        raise DataError(f"{path}: a column has values of the wrong type ({exc})") from None
    out["Country"] = frame["Country"].astype(str).str.strip()
    return out


def is_non_product(codes: pd.Series) -> pd.Series:
    return codes.isin(NON_PRODUCT_CODES) | codes.str.startswith(NON_PRODUCT_PREFIXES)


def clean(raw: pd.DataFrame, source: str = "") -> CleanedRetail:
    """Apply the cleaning rules in `CLEANING_RULES` order; every removed row is counted once."""
    counts = {"raw_rows": len(raw)}
    has_customer = raw["CustomerID"].notna()
    counts["missing_customer"] = int((~has_customer).sum())
    rows = raw[has_customer]

    cancelled = rows["InvoiceNo"].str.startswith("C")
    counts["cancellations"] = int(cancelled.sum())
    returns = rows[cancelled]
    rows = rows[~cancelled]

    non_product = is_non_product(rows["StockCode"])
    counts["non_product"] = int(non_product.sum())
    rows = rows[~non_product]
    returns_non_product = is_non_product(returns["StockCode"])
    counts["returns_non_product"] = int(returns_non_product.sum())
    returns = returns[~returns_non_product]

    bad_quantity = rows["Quantity"] <= 0
    counts["non_positive_quantity"] = int(bad_quantity.sum())
    rows = rows[~bad_quantity]
    bad_price = rows["UnitPrice"] <= 0
    counts["non_positive_price"] = int(bad_price.sum())
    rows = rows[~bad_price]

    purchases = rows.assign(CustomerID=rows["CustomerID"].astype("int64")).reset_index(drop=True)
    returns = returns.assign(CustomerID=returns["CustomerID"].astype("int64")).reset_index(
        drop=True
    )
    counts["purchase_rows"] = len(purchases)
    counts["return_rows"] = len(returns)
    counts["customers"] = int(purchases["CustomerID"].nunique())
    counts["products"] = int(purchases["StockCode"].nunique())
    counts["invoices"] = int(purchases["InvoiceNo"].nunique())
    counts["countries"] = int(purchases["Country"].nunique())
    return CleanedRetail(purchases=purchases, returns=returns, counts=counts, source=source)


def resolve_path(path: str | None, data_dir: str | None) -> tuple[Path, str]:
    """Pick the file to read: an explicit path, else a data directory, else the embedded copy.

    Returns the path and a short description of where it came from (for the data report).
    """
    if path:
        return Path(path).expanduser(), f"file {path}"
    if data_dir:
        base = Path(data_dir).expanduser()
        if not base.is_dir():
            raise DataError(f"data directory not found: {base}")
        for candidate in DATA_DIR_CANDIDATES:
            if (base / candidate).exists():
                return base / candidate, f"data directory {base}"
        raise DataError(
            f"no Online Retail file in data directory {base} (looked for "
            f'{", ".join(DATA_DIR_CANDIDATES)}); set data.source = "download" to fetch it'
        )
    return embedded_path(), "embedded copy (UCI Online Retail, CC BY 4.0)"
