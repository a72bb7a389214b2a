"""Quality on Amazon Toys and Games (2014 5-core), one shopper = one client, full ranking.

Runs `configs/amazon-toys-cross-device.toml` for each seed: cross-device FedAvg MF, the centralized
MF on the same split, and popularity; each shopper's last item (in time order) is held out and ranked
against the whole catalogue, their other items excluded.

    python benchmarks/amazon_quality.py --out benchmarks/out [--seeds 1 2 3]
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
CONFIG = ROOT / "configs" / "amazon-toys-cross-device.toml"
METRICS = ("hr@10", "ndcg@10", "recall@20")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=None, help="override the config's rounds")
    args = parser.parse_args()

    runs: list[dict] = []
    for seed in args.seeds:
        config = load_config(CONFIG, overrides={"seed": seed, "federated.rounds": args.rounds})
        dataset = load_dataset(config.data, seed=seed)
        result = run_experiment(config, dataset)
        for method, outcome in result.methods.items():
            runs.append(
                {
                    "seed": seed,
                    "method": method,
                    **{m: outcome.summary[m] for m in METRICS},
                    "users": outcome.summary["users"],
                    "seconds": outcome.seconds,
                }
            )
    methods = list(dict.fromkeys(r["method"] for r in runs))
    medians = {
        method: {
            m: statistics.median(r[m] for r in runs if r["method"] == method)
            for m in (*METRICS, "seconds")
        }
        for method in methods
    }
    ratio = medians["federated"]["hr@10"] / medians["centralized"]["hr@10"]
    document = {
        "dataset": "amazon-toys",
        "protocol": "full",
        "config": str(CONFIG.relative_to(ROOT)),
        "split_rule": dataset.report["split_rule"],
        "seeds": args.seeds,
        "runs": runs,
        "medians": medians,
        "federated_over_centralized_hr@10": ratio,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "amazon_quality.json").write_text(json.dumps(document, indent=2) + "\n")

    table = Table(title=f"Amazon Toys, 1 shopper = 1 client, full ranking (seeds {args.seeds})")
    table.add_column("method")
    for header in ("HR@10", "NDCG@10", "Recall@20", "time"):
        table.add_column(header, justify="right")
    for method, row in medians.items():
        table.add_row(method, *(f"{row[m]:.4f}" for m in METRICS), f"{row['seconds']:.0f}s")
    console = Console()
    console.print(table)
    console.print(f"federated / centralized HR@10 = {ratio:.3f}")


if __name__ == "__main__":
    main()
