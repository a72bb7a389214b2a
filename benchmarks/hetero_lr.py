"""Vertical logistic regression with Paillier-encrypted gradients against the same model in plaintext.

RentTheRunway rows with every feature present, split between a guest (the rental platform: the size
rented and the dress category, top 8 one-hot, plus the label "the item ran small") and one host (a
partner holding height, weight, age and bust size, standardised). `fedshop.vertical.hetero_lr` runs
FATE's coordinated-LR protocol with masked gradients (see its docstring) and the plaintext twin on the
same batches. Per case: seconds per epoch both ways and their ratio, ciphertext bytes per epoch by
route, AUC of both on 10,000 held-out rows, the largest weight difference.

All parties run in one process on one core, one after another: an epoch's seconds are every party's
work added up (no network). Nothing is extrapolated: each row count is run in full.

    python benchmarks/hetero_lr.py --out benchmarks/out [--rows 2000 10000] [--key-bits 2048 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from fedshop.vertical.hetero_lr import (
    HeteroLRConfig,
    renttherunway_columns,
    renttherunway_rows,
    time_per_epoch,
)

TEST_ROWS = 10_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--rows", type=int, nargs="+", default=[2000, 10_000])
    parser.add_argument("--key-bits", type=int, nargs="+", default=[2048, 1024])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("FEDSHOP_DATA_DIR", "../shared/data"))
    )
    args = parser.parse_args()

    # Standardised over all clean rows, then the held-out rows first and the training rows after.
    X_guest, X_host, y = renttherunway_columns(renttherunway_rows(args.data_dir))
    test = (X_guest[:TEST_ROWS], [X_host[:TEST_ROWS]], y[:TEST_ROWS])
    cases = []
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "hetero_lr.json"
    for key_bits in args.key_bits:
        for rows in args.rows:
            train = slice(TEST_ROWS, TEST_ROWS + rows)
            config = HeteroLRConfig(
                key_bits=key_bits, epochs=args.epochs, batch_size=args.batch_size
            )
            result = time_per_epoch(X_guest[train], [X_host[train]], y[train], config, test=test)
            cases.append(result)
            print(
                f"{key_bits}-bit, {rows:,} rows: {result['encrypted_seconds_per_epoch']:.1f} s/epoch "
                f"encrypted, {1e3 * result['plaintext_seconds_per_epoch']:.2f} ms plaintext "
                f"(×{result['he_overhead_ratio']:,.0f}); AUC {result['auc_encrypted']:.4f} / "
                f"{result['auc_plaintext']:.4f}; |Δw| ≤ {result['max_weight_difference']:.1e}",
                flush=True,
            )
            document = {
                "machine": {
                    "python": platform.python_version(),
                    "cpu": platform.processor(),
                    "cores_used": 1,
                },
                "label": "fit == 'small'",
                "test_rows": TEST_ROWS,
                "cases": cases,
            }
            path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
