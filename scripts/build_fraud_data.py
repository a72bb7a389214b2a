"""Join the published e-commerce fraud files into one parquet file (the layout data/fraud.py reads as
`ecommerce_fraud.parquet`): the 11 published columns of Fraud_Data.csv in their original row order,
ip_address kept, plus `country` from IpAddress_to_Country.csv ("Unknown" where no range holds it).

    python scripts/build_fraud_data.py SOURCE [TARGET]

SOURCE: the Kaggle zip, or Fraud_Data.csv with IpAddress_to_Country.csv beside it (both checked
against the published git blob ids). TARGET defaults to <SOURCE's folder>/ecommerce_fraud.parquet;
`src/fedshop/data/embedded/ecommerce_fraud.parquet` ships it in the package, which the publisher's
terms (no licence stated) do not clearly allow: see the README's "E-commerce fraud" section first.
It prints the file's size and sha256, for fraud.JOINED_SHA256.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fedshop.data import fraud
from fedshop.data.download import sha256_of


def main(source: str, target: str | None = None) -> None:
    table = fraud.load_fraud(path=source)  # verifies the files and the published counts
    out = Path(target) if target else Path(source).with_name(fraud.JOINED)
    frame = table.purchases.copy()
    # The narrowest types that hold the published values exactly (the loader re-types on reading).
    frame["user_id"] = frame["user_id"].astype("int32")
    frame["age"] = frame["age"].astype("int8")
    if (frame["purchase_value"] % 1 == 0).all():
        frame["purchase_value"] = frame["purchase_value"].astype("int16")
    for column in ("signup_time", "purchase_time"):
        frame[column] = frame[column].astype("datetime64[s]")
    for column in ("source", "browser", "sex", "country"):
        frame[column] = frame[column].astype("category")
    pq.write_table(
        pa.Table.from_pandas(frame, preserve_index=False),
        out,
        compression="zstd",
        compression_level=19,
    )
    print(f"wrote {out} ({out.stat().st_size:,} bytes, sha256 {sha256_of(out)})")
    print({k: v for k, v in table.counts.items()})


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(*sys.argv[1:])
