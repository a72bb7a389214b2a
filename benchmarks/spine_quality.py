"""Acceptance benchmark for the spine: federated vs centralized, local-only and popularity.

Runs the demo configuration (embedded Online Retail, one silo per country, full ranking) for several
seeds and reports each method's metrics and the acceptance ratios per seed and as medians:

    federated HR@10 / centralized HR@10                  target ≥ 0.95
    federated HR@10 > popularity HR@10
    federated silo-mean HR@10 / local-only silo-mean     target ≥ 1.3

    python benchmarks/spine_quality.py --out DIR [--seeds 1 2 3] [--split test|validation]
writes DIR/spine_quality.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedshop.config import load_config
from fedshop.data.datasets import load_dataset
from fedshop.experiment import run_experiment

METRICS = ("hr@10", "ndcg@10", "recall@20", "silo_mean_hr@10")


def silo_mean_standard_error(per_silo: dict[str, dict]) -> float:
    """Standard error of the unweighted silo mean of HR@10 from the customers each silo evaluated.

    HR@10 is 0/1 per customer, so a silo's mean has variance p(1-p)/n; the mean over S silos has
    variance sum(p(1-p)/n)/S^2. Tiny silos dominate it.
    """
    terms = [
        s["hr@10"] * (1 - s["hr@10"]) / s["users"] for s in per_silo.values() if s.get("users")
    ]
    return math.sqrt(sum(terms)) / len(terms)


def ratio_interval(num: float, num_se: float, den: float, den_se: float) -> list[float]:
    """Approximate 95% interval of num/den by the delta method (treating the two as independent,
    which overstates the spread a little: both methods are scored on the same customers)."""
    ratio = num / den
    se = ratio * math.sqrt((num_se / num) ** 2 + (den_se / den) ** 2)
    return [ratio - 1.96 * se, ratio + 1.96 * se]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--split", choices=("test", "validation"), default="test")
    parser.add_argument("--config", type=Path, default=None, help="TOML config (default: demo)")
    args = parser.parse_args()

    overrides = {"data.source": "embedded", "eval.split": args.split}
    if args.split == "validation":
        overrides["data.validation"] = True
    base = load_config(args.config, overrides)
    dataset = load_dataset(base.data)
    runs = []
    for seed in args.seeds:
        config = load_config(args.config, {**overrides, "seed": seed})
        started = time.perf_counter()
        result = run_experiment(config, dataset)
        methods = {
            name: {k: outcome.summary[k] for k in (*METRICS, "users")}
            | {"seconds": round(outcome.seconds, 2)}
            for name, outcome in result.methods.items()
        }
        for name, outcome in result.methods.items():
            methods[name]["silo_mean_hr@10_se"] = silo_mean_standard_error(outcome.per_silo)
        fed, cen = methods["federated"], methods["centralized"]
        local, pop = methods["local_only"], methods["popularity"]
        runs.append(
            {
                "seed": seed,
                "seconds": round(time.perf_counter() - started, 1),
                "methods": methods,
                "per_silo_hr@10": {
                    silo: {m: o.per_silo[silo]["hr@10"] for m, o in result.methods.items()}
                    | {"users": result.methods["federated"].per_silo[silo]["users"]}
                    for silo in dataset.silo_names
                },
                "ratios": {
                    "federated_over_centralized_hr@10": fed["hr@10"] / cen["hr@10"],
                    "federated_over_popularity_hr@10": fed["hr@10"] / pop["hr@10"],
                    "federated_over_local_only_silo_mean_hr@10": fed["silo_mean_hr@10"]
                    / local["silo_mean_hr@10"],
                },
                "silo_mean_ratio_95ci": ratio_interval(
                    fed["silo_mean_hr@10"],
                    fed["silo_mean_hr@10_se"],
                    local["silo_mean_hr@10"],
                    local["silo_mean_hr@10_se"],
                ),
            }
        )
        low, high = runs[-1]["silo_mean_ratio_95ci"]
        print(
            f"seed {seed}: {runs[-1]['ratios']}; silo-mean ratio 95% CI [{low:.2f}, {high:.2f}]"
            f" ({runs[-1]['seconds']} s)",
            flush=True,
        )

    medians = {
        method: {k: statistics.median(r["methods"][method][k] for r in runs) for k in METRICS}
        for method in runs[0]["methods"]
    }
    ratio_medians = {k: statistics.median(r["ratios"][k] for r in runs) for k in runs[0]["ratios"]}
    document = {
        "benchmark": "spine_quality",
        "dataset": "online-retail (embedded)",
        "protocol": "full ranking",
        "split": args.split,
        "seeds": args.seeds,
        "config": base.to_dict(),
        "silos": dataset.report["silos"],
        "runs": runs,
        "median": medians,
        "median_ratios": ratio_medians,
        "targets": {
            "federated_over_centralized_hr@10": 0.95,
            "federated_over_popularity_hr@10": 1.0,
            "federated_over_local_only_silo_mean_hr@10": 1.3,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "spine_quality.json"
    path.write_text(json.dumps(document, indent=2) + "\n")

    console = Console()
    table = Table(title=f"Median over seeds {args.seeds} ({args.split} split, full ranking)")
    table.add_column("method")
    for metric in METRICS:
        table.add_column(metric, justify="right")
    for method, values in medians.items():
        table.add_row(method, *(f"{values[m]:.4f}" for m in METRICS))
    console.print(table)
    ratios = Table(title="Acceptance ratios (median)")
    ratios.add_column("ratio")
    ratios.add_column("median", justify="right")
    ratios.add_column("per seed", justify="right")
    ratios.add_column("target", justify="right")
    for key, value in ratio_medians.items():
        per_seed = ", ".join(f"{r['ratios'][key]:.3f}" for r in runs)
        ratios.add_row(key, f"{value:.3f}", per_seed, f"≥ {document['targets'][key]}")
    console.print(ratios)
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
