"""Which parts of the federated algorithm matter? Federated-only runs on the validation split.

Each variant changes one setting of the default federated configuration (embedded Online Retail, one
silo per country); medians over seeds of overall HR@10 and the silo-mean HR@10 (every storefront counts
once). Settings are chosen on validation baskets so that the test baskets stay for reporting.

    python benchmarks/federated_ablation.py --out DIR [--seeds 1 2 3]
writes DIR/federated_ablation.json and prints a table.
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

VARIANTS: dict[str, dict] = {
    "default": {},
    "fedavg instead of fednova": {"federated.aggregation": "fedavg"},
    "no silo item-bias offsets": {"model.silo_item_bias": False},
    "fedavg, no offsets (plain FedAvg MF)": {
        "federated.aggregation": "fedavg",
        "model.silo_item_bias": False,
    },
    "no final personalisation": {"federated.personalise_epochs": 0},
    "reconstruction 1 epoch/round": {"federated.reconstruction_epochs": 1},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    base = {
        "data.source": "embedded",
        "data.validation": True,
        "eval.split": "validation",
        "methods": ["federated"],
        "eval.eval_every": 1000,
    }
    dataset = load_dataset(load_config(overrides=base).data)
    results = {}
    for name, overrides in VARIANTS.items():
        runs = []
        for seed in args.seeds:
            config = load_config(overrides={**base, **overrides, "seed": seed})
            outcome = run_experiment(config, dataset).methods["federated"]
            runs.append(
                {
                    "seed": seed,
                    "hr@10": outcome.summary["hr@10"],
                    "silo_mean_hr@10": outcome.summary["silo_mean_hr@10"],
                    "seconds": round(outcome.seconds, 1),
                }
            )
            print(f"{name} seed {seed}: {runs[-1]}", flush=True)
        results[name] = {
            "overrides": overrides,
            "runs": runs,
            "median_hr@10": statistics.median(r["hr@10"] for r in runs),
            "median_silo_mean_hr@10": statistics.median(r["silo_mean_hr@10"] for r in runs),
            "median_seconds": statistics.median(r["seconds"] for r in runs),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "federated_ablation.json"
    document = {"benchmark": "federated_ablation", "split": "validation", "seeds": args.seeds}
    path.write_text(json.dumps({**document, "variants": results}, indent=2) + "\n")

    table = Table(title=f"Federated ablation, validation split, median over seeds {args.seeds}")
    for column in ("variant", "HR@10", "silo-mean HR@10", "seconds"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, r in results.items():
        table.add_row(
            name,
            f"{r['median_hr@10']:.4f}",
            f"{r['median_silo_mean_hr@10']:.4f}",
            f"{r['median_seconds']:.0f}",
        )
    Console().print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
