"""Rebuild the embedded copy of UCI Online Retail shipped in src/fedshop/data/embedded/.

The copy is the complete published table (541,909 rows, the 8 published columns, original row order),
re-encoded as dictionary-encoded, zstd-compressed parquet: about 3 MB instead of 23 MB of xlsx.

    python scripts/build_embedded_data.py SOURCE   # SOURCE: the official xlsx/zip, a csv or parquet
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fedshop.data import online_retail
from fedshop.data.download import sha256_of

TARGET = Path(__file__).resolve().parents[1] / "src/fedshop/data/embedded/online_retail.parquet"


def main(source: str) -> None:
    raw = online_retail.read_raw(Path(source))
    if len(raw) != online_retail.OFFICIAL_ROWS:
        sys.exit(
            f"{source} has {len(raw)} rows, the published table has {online_retail.OFFICIAL_ROWS}"
        )
    raw["CustomerID"] = raw["CustomerID"].astype("float64")  # NaN where missing, as published
    for column in ("InvoiceNo", "StockCode", "Description", "Country"):
        raw[column] = raw[column].astype("category")
    table = pa.Table.from_pandas(raw, preserve_index=False)
    pq.write_table(table, TARGET, compression="zstd", compression_level=19)
    print(f"wrote {TARGET} ({TARGET.stat().st_size:,} bytes, sha256 {sha256_of(TARGET)})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
