"""Demand, returns and fraud (issue 22): each task's headline metric for every method, medians over
seeds, and the issue's targets checked.

Per seed and task one run of configs/<task>.toml (federated, centralized, local-only networks);
demand also the per-series baselines (seasonal naive, best of statsforecast), which do not depend on
the seed and run once. Fraud needs the published table in <data dir>/ecommerce_fraud/ (FedShop does
not ship it); without it the fraud block says why it is missing. `--fraud-partial DIR` runs fraud on
a partial copy instead (the checksum and completeness checks off), labelled as such in the JSON.
`--validation` scores demand on the validation window (the last training weeks held out in place of
the test weeks), where its settings were chosen.

    python benchmarks/retail_tasks.py --out DIR [--seeds 1 2 3] [--tasks demand returns fraud]
        → DIR/retail_tasks.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from fedshop.config import load_config
from fedshop.errors import DataError
from fedshop.retail_experiment import run_retail_experiment
from fedshop.retail_tasks import RetailTable, demand_baselines, load_retail, score_run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NETWORKS = ("federated", "centralized", "local_only")
# Per task: (metric, whether higher is better) for each key of the JSON.
KEYS = {
    "demand": {"wape": False, "silo_mean_wape": False, "inventory_cost": False},
    "returns": {"auc_pr": True, "silo_mean_auc_pr": True},
    "fraud": {"auc_pr": True, "silo_mean_auc_pr": True, "silo_mean_recall@fpr": True},
}


def table_for(task: str, config, args) -> tuple[RetailTable, dict]:
    """The task's table, and what the JSON should say about where it came from."""
    if task == "fraud" and args.fraud_partial:
        from fedshop.data.fraud import FraudSettings, build_fraud_dataset

        settings = FraudSettings(seed=config.seed % 5, verify=False, require_complete=False)
        dataset = build_fraud_dataset(settings, data_dir=args.fraud_partial)
        return RetailTable(dataset), {"partial_copy": True, "rows": dataset.report.get("rows")}
    table = load_retail(config)
    if task == "demand" and args.validation:
        from fedshop.data.demand import build_table, validation_view
        from fedshop.retail_tasks import demand_settings

        weekly = validation_view(table.weekly, demand_settings(config))
        table = RetailTable(build_table(weekly, demand_settings(config)), weekly)
        return table, {"validation_window": True}
    return table, {}


def run_task(task: str, args) -> dict:
    per_seed, baselines, source = [], None, {}
    for seed in args.seeds:
        config = load_config(CONFIGS / f"{task}.toml", overrides={"seed": seed})
        if task == "returns":  # the quality view is not what this benchmark measures
            config = load_config(
                CONFIGS / f"{task}.toml", overrides={"seed": seed, "retail.quality_epsilon": 0.0}
            )
        try:
            table, source = table_for(task, config, args)
        except DataError as reason:
            return {"available": False, "reason": str(reason)}
        if task == "demand" and baselines is None:
            baselines = demand_baselines(config, table.weekly)
        started = time.perf_counter()
        result = run_retail_experiment(config, table.dataset)
        scores = score_run(result, table, baselines)
        seconds = time.perf_counter() - started
        per_seed.append(
            {
                "seed": seed,
                "seconds": round(seconds, 1),
                **{m: scored["summary"] for m, scored in scores.methods.items()},
                "per_silo": {m: scored["per_silo"] for m, scored in scores.methods.items()},
            }
        )
        print(f"{task} seed {seed}: {seconds:.0f} s", flush=True)
    methods = [m for m in per_seed[0] if m not in ("seed", "seconds", "per_silo")]
    block: dict = {"available": True, **source, "seeds": args.seeds, "runs": per_seed}
    for key in KEYS[task]:
        block[key] = {
            m: statistics.median(run[m][key] for run in per_seed)
            for m in methods
            if key in per_seed[0][m]
        }
    block["targets"] = targets(task, block)
    return block


def ratio(federated: float, centralized: float, higher_better: bool) -> float:
    """Federated as a share of centralized on a metric, 1 = as good, in either direction."""
    return federated / centralized if higher_better else centralized / federated


def targets(task: str, block: dict) -> dict:
    headline, higher = next(iter(KEYS[task].items()))
    silo_key = next(k for k in KEYS[task] if k.startswith("silo_mean"))
    fed, central = block[headline]["federated"], block[headline]["centralized"]
    silo = block[silo_key]
    better = (lambda a, b: a > b) if higher else (lambda a, b: a < b)
    out = {
        "federated_over_centralized": ratio(fed, central, higher),
        "reaches_0.95_of_centralized": ratio(fed, central, higher) >= 0.95,
        "beats_local_only_silo_mean": better(silo["federated"], silo["local_only"]),
    }
    if task == "demand":
        out["beats_best_statistical_wape"] = fed < block["wape"].get(
            "best_statistical", float("inf")
        )
        cost = block["inventory_cost"]
        out["inventory_cheaper_than_seasonal_naive"] = cost["federated"] < cost["seasonal_naive"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--tasks", nargs="+", default=list(KEYS), choices=list(KEYS))
    parser.add_argument("--fraud-partial", help="a folder with a partial copy of the fraud table")
    parser.add_argument("--validation", action="store_true", help="demand on its validation window")
    args = parser.parse_args()
    started = time.perf_counter()
    document = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        **{task: run_task(task, args) for task in args.tasks},
    }
    document["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "retail_tasks.json").write_text(
        json.dumps(document, indent=2, default=float) + "\n"
    )
    print(
        f"\n{'task.metric':<28}"
        + "".join(f"{m:>18}" for m in (*NETWORKS, "seasonal_naive", "best_statistical"))
    )
    for task in args.tasks:
        block = document[task]
        if not block["available"]:
            print(f"{task:<28} unavailable: {block['reason'][:80]}")
            continue
        for key in KEYS[task]:
            values = block[key]
            print(
                f"{task + '.' + key:<28}"
                + "".join(
                    f"{values[m]:>18.4f}" if m in values else f"{'–':>18}"
                    for m in (*NETWORKS, "seasonal_naive", "best_statistical")
                )
            )
        print(f"{'':<28}targets: {block['targets']}")
    print(f"\nwritten {args.out / 'retail_tasks.json'} ({document['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
