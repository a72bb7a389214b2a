"""How much easier is a random held-out item than the latest one? (Explains a gap to published numbers.)

The published MovieLens-1M numbers hold out each user's *latest* rating. Our copy of ML-1M has no
timestamps, so its held-out item is random. This benchmark measures the effect of that choice on a
dataset that has timestamps (MovieLens-100k by default): the same cross-device federated MF and
centralized MF as `configs/movielens-cross-device.toml`, sampled-100 protocol, once with
`leave_out = "last"` and once with `"random"`, same seeds.

    python benchmarks/leave_out_gap.py --out benchmarks/out [--dataset movielens-100k] [--seeds 1 2 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedshop.config import load_config
from fedshop.data.datasets import load_dataset
from fedshop.experiment import run_experiment

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "movielens-cross-device.toml"
METHODS = ("federated", "centralized", "popularity")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--dataset", default="movielens-100k")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()

    runs = []
    for leave_out in ("last", "random"):
        for seed in args.seeds:
            config = load_config(
                CONFIG,
                overrides={
                    "seed": seed, "data.dataset": args.dataset, "data.leave_out": leave_out,
                    "methods": list(METHODS),
                },
            )  # fmt: skip
            result = run_experiment(config, load_dataset(config.data, seed=seed))
            for method, outcome in result.methods.items():
                runs.append(
                    {
                        "leave_out": leave_out,
                        "seed": seed,
                        "method": method,
                        "hr@10": outcome.summary["hr@10"],
                        "ndcg@10": outcome.summary["ndcg@10"],
                    }
                )

    def median(leave_out: str, method: str, metric: str) -> float:
        return statistics.median(
            r[metric] for r in runs if r["leave_out"] == leave_out and r["method"] == method
        )

    medians = {
        method: {
            f"{metric}_{leave_out}": median(leave_out, method, metric)
            for leave_out in ("last", "random")
            for metric in ("hr@10", "ndcg@10")
        }
        for method in METHODS
    }
    for row in medians.values():
        row["hr@10_random_over_last"] = row["hr@10_random"] / row["hr@10_last"]
    document = {
        "dataset": args.dataset,
        "protocol": "sampled-100",
        "config": str(CONFIG.relative_to(ROOT)),
        "seeds": args.seeds,
        "runs": runs,
        "medians": medians,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "leave_out_gap.json").write_text(json.dumps(document, indent=2) + "\n")

    table = Table(title=f"{args.dataset}, sampled-100: latest vs random held-out item")
    for column in ("method", "HR@10 last", "HR@10 random", "random / last", "NDCG@10 last",
                   "NDCG@10 random"):  # fmt: skip
        table.add_column(column, justify="left" if column == "method" else "right")
    for method, row in medians.items():
        table.add_row(
            method, f"{row['hr@10_last']:.4f}", f"{row['hr@10_random']:.4f}",
            f"{row['hr@10_random_over_last']:.3f}", f"{row['ndcg@10_last']:.4f}",
            f"{row['ndcg@10_random']:.4f}",
        )  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()
