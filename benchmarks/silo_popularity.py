"""How different is each storefront's taste? Global vs silo-local popularity, per silo.

Ranks items by how many training customers bought them, either across all silos (global) or within the
customer's own silo (local), and scores each silo's held-out baskets with full-ranking HR@10. A large
gap means local taste matters, which is what the private silo item-bias offsets of the model capture.

    python benchmarks/silo_popularity.py --out DIR [--split test|validation]
writes DIR/silo_popularity.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from fedshop.config import DataConfig
from fedshop.data.datasets import load_dataset
from fedshop.eval.metrics import evaluate


def counts(matrix) -> torch.Tensor:
    return torch.from_numpy(np.asarray(matrix.sum(axis=0), dtype=np.float32).ravel())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--split", choices=("test", "validation"), default="validation")
    args = parser.parse_args()
    dataset = load_dataset(DataConfig(source="embedded", validation=args.split == "validation"))
    global_counts = counts(dataset.train)
    rows = []
    for silo in dataset.silos():
        # Ties in local counts are broken by global popularity.
        local = counts(silo.train) + 1e-3 * global_counts / global_counts.max()
        heldout = silo.heldout(args.split)
        g = evaluate(lambda r: global_counts.expand(len(r), -1), silo.train, heldout).means()
        loc = evaluate(lambda r, s=local: s.expand(len(r), -1), silo.train, heldout).means()
        rows.append(
            {"silo": silo.name, "users": g["users"], "global": g["hr@10"], "local": loc["hr@10"]}
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "silo_popularity.json"
    document = {
        "benchmark": "silo_popularity",
        "split": args.split,
        "metric": "hr@10",
        "silos": rows,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    table = Table(title=f"Popularity HR@10 per silo ({args.split} baskets, full ranking)")
    for column in ("silo", "customers", "global popularity", "silo-local popularity"):
        table.add_column(column, justify="left" if column == "silo" else "right")
    for row in rows:
        table.add_row(row["silo"], str(row["users"]), f"{row['global']:.2f}", f"{row['local']:.2f}")
    Console().print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
