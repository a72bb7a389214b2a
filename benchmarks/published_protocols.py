"""FedShop on the papers' own test sets, next to the published tables.

Three parts, each runnable alone (`--parts`), merged into one `DIR/published_protocols.json`:

- `ml1m_ncf`: MovieLens-1M on the NCF protocol (`--protocol ncf`: the NCF paper's test pairs and
  their 99 published negatives, no resampling), cross-device (1 user = 1 client), federated and
  centralized MF, GMF and NeuMF with `configs/movielens-ncf.toml`, plus popularity; medians over
  `--seeds`. Keys `ml1m_ncf.hr@10.<method>` and `ml1m_ncf.ndcg@10.<method>`, method names like
  "federated mf-bpr".
- `amazon_toys`: SASRec on the S3Rec Amazon Toys file, leave-last-out, full ranking
  (`fedshop.sequential`); key `amazon_toys.hr@10.<method>`.
- `cold_items`: products never seen in training (`fedshop.cold_items`); key
  `cold_items.hr@10.<method>`.

    python benchmarks/published_protocols.py --out benchmarks/out [--parts ml1m_ncf ...]
        [--seeds 1 2 3] [--models mf-bpr gmf neumf]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fedshop.config import load_config
from fedshop.data.datasets import load_dataset
from fedshop.experiment import run_experiment

ROOT = Path(__file__).resolve().parents[1]
NCF_CONFIG = ROOT / "configs" / "movielens-ncf.toml"
PARTS = ("ml1m_ncf", "amazon_toys", "cold_items")

# (HR@10, NDCG@10) on the NCF MovieLens-1M test set, as published.
PUBLISHED_ML1M = {
    "federated mf-bpr": ("FedMF, PFedRec (Zhang et al., IJCAI 2023) Table 2", 0.6772, 0.4090),
    "federated neumf": ("FedNCF, PFedRec Table 2", 0.6054, 0.3417),
    "federated (best published)": ("PFedRec, PFedRec Table 2", 0.7326, 0.4436),
    "centralized mf-bpr": ("MF, PFedRec Table 2", 0.6845, 0.4137),
    "centralized neumf": ("NeuMF with pre-training, NCF (He et al., WWW 2017)", 0.730, 0.447),
}
TARGET_ML1M_FEDERATED_HR = 0.74


def ml1m_ncf(seeds: list[int], models: list[str], console: Console) -> dict:
    runs = []
    for seed in seeds:
        dataset = None
        for model in models:
            methods = ["federated", "centralized"] + (["popularity"] if model == models[0] else [])
            config = load_config(
                NCF_CONFIG, overrides={"seed": seed, "model.name": model, "methods": methods}
            )
            if dataset is None:
                dataset = load_dataset(config.data, seed=seed, protocol="ncf")
            started = time.perf_counter()
            result = run_experiment(config, dataset)
            console.print(f"ml1m_ncf seed {seed} {model}: {time.perf_counter() - started:.0f} s")
            for method, outcome in result.methods.items():
                name = method if method == "popularity" else f"{method} {model}"
                runs.append(
                    {
                        "seed": seed,
                        "method": name,
                        "hr@10": outcome.summary["hr@10"],
                        "ndcg@10": outcome.summary["ndcg@10"],
                        "users": outcome.summary["users"],
                        "seconds": outcome.seconds,
                    }
                )
    methods = sorted({run["method"] for run in runs})
    medians = {
        metric: {
            method: statistics.median(r[metric] for r in runs if r["method"] == method)
            for method in methods
        }
        for metric in ("hr@10", "ndcg@10")
    }
    return {
        "protocol": "NCF (He et al., WWW 2017): ml-1m.test.rating / ml-1m.test.negative",
        "config": str(NCF_CONFIG.relative_to(ROOT)),
        "seeds": seeds,
        **medians,
        "runs": runs,
        "published": {
            name: {"source": source, "hr@10": hr, "ndcg@10": ndcg}
            for name, (source, hr, ndcg) in PUBLISHED_ML1M.items()
        },
        "target_federated_hr@10": TARGET_ML1M_FEDERATED_HR,
    }


# Full-ranking SASRec on the same S3-Rec files: the ICSRec authors' "Overall Performances" table
# (github.com/QinHsiu/ICSRec, README.md / performance.md). It has @5 and @20 columns, no @10.
PUBLISHED_TOYS_SASREC = {"hr@5": 0.0429, "hr@20": 0.0957, "ndcg@5": 0.0245, "ndcg@20": 0.0397}


def amazon_toys(seeds: list[int], console: Console) -> dict:
    """Federated (cross-device) and centralized SASRec and popularity on Amazon Toys,
    leave-last-out, full ranking (the sasrec defaults of `fedshop train --model sasrec`)."""
    from fedshop.sequential import run_amazon

    runs = []
    for seed in seeds:
        started = time.perf_counter()
        outcome = run_amazon("amazon-toys", seed=seed)
        console.print(f"amazon_toys seed {seed}: {time.perf_counter() - started:.0f} s")
        runs.append({"seed": seed, **{k: v for k, v in outcome.items() if "curve" not in k}})
    names = ("federated sasrec", "centralized sasrec", "popularity")
    section = {
        "dataset": "amazon-toys (S3-Rec Toys_and_Games.txt)",
        "protocol": "leave-last-out, full ranking, the shopper's earlier items excluded",
        "seeds": seeds,
        **{
            metric: {name: statistics.median(run[name][metric] for run in runs) for name in names}
            for metric in ("hr@10", "ndcg@10", "recall@20")
        },
        "runs": runs,
        "published": {
            "sasrec (ICSRec table)": {"source": "QinHsiu/ICSRec", **PUBLISHED_TOYS_SASREC}
        },
    }
    section["federated_over_centralized_hr@10"] = (
        section["hr@10"]["federated sasrec"] / section["hr@10"]["centralized sasrec"]
    )
    return section


# Where new products are measured: (dataset, mode, config file or None for the defaults).
COLD_ITEM_SETTINGS = {
    "amazon_toys": ("amazon-toys", "cross-silo", ROOT / "configs" / "cold-items-amazon-toys.toml"),
    "online_retail": ("online-retail", "cross-silo", None),
}
COLD_ITEM_TARGET = 2.0  # cold-item HR@10 at least twice the feature-popularity baseline's


def cold_items(seeds: list[int], console: Console) -> dict:
    """10 % of the products held out of training entirely, ranked among the held-out products
    (and, under "among_all", in the whole catalogue). Amazon Toys is the headline (key
    `cold_items.hr@10.<method>`); Online Retail follows under `cold_items.online_retail`."""
    from fedshop.experiment import run_cold_items as run

    out: dict = {}
    for name, (dataset, mode, config) in COLD_ITEM_SETTINGS.items():
        runs = []
        for seed in seeds:
            started = time.perf_counter()
            methods = run(dataset, seed, mode, 0.1, config_path=config and str(config))
            console.print(f"cold_items {name} seed {seed}: {time.perf_counter() - started:.0f} s")
            runs.append({"seed": seed, "methods": methods})
        names = list(runs[0]["methods"])
        section = {
            "dataset": dataset,
            "mode": mode,
            "config": str(config.relative_to(ROOT)) if config else "defaults",
            "seeds": seeds,
            "hr@10": {m: statistics.median(r["methods"][m]["hr@10"] for r in runs) for m in names},
            "ndcg@10": {
                m: statistics.median(r["methods"][m]["ndcg@10"] for r in runs) for m in names
            },
            "among_all_hr@10": {
                m: statistics.median(r["methods"][m]["among_all"]["hr@10"] for r in runs)
                for m in names
            },
            "runs": runs,
        }
        baseline = section["hr@10"].get("feature popularity") or float("nan")
        section["federated_over_feature_popularity"] = section["hr@10"]["federated"] / baseline
        section["target_ratio"] = COLD_ITEM_TARGET
        if name == "amazon_toys":
            out.update(section)
        else:
            out[name] = section
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--models", nargs="+", default=["mf-bpr", "gmf", "neumf"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=160)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "published_protocols.json"
    document = json.loads(path.read_text()) if path.exists() else {}
    for part in args.parts:
        started = time.perf_counter()
        if part == "ml1m_ncf":
            document[part] = ml1m_ncf(args.seeds, args.models, console)
        elif part == "amazon_toys":
            document[part] = amazon_toys(args.seeds, console)
        else:
            document[part] = cold_items(args.seeds, console)
        document[part]["wall_seconds"] = time.perf_counter() - started
        document[part]["command"] = (
            f"python benchmarks/published_protocols.py --out DIR --parts {part} "
            f"--seeds {' '.join(map(str, args.seeds))}"
            + (f" --models {' '.join(args.models)}" if part == "ml1m_ncf" else "")
        )
        path.write_text(json.dumps(document, indent=2) + "\n")
    print_tables(document, console)


def print_tables(document: dict, console: Console) -> None:
    for part in PARTS:
        if part not in document:
            continue
        section = document[part]
        table = Table(title=f"{part} (medians over seeds {section.get('seeds')})")
        for header in ("method", "HR@10", "NDCG@10", "published HR@10", "published NDCG@10"):
            table.add_column(header, justify="left" if header == "method" else "right")
        published = section.get("published", {})
        for method, value in section["hr@10"].items():
            ndcg = section.get("ndcg@10", {}).get(method)
            source = published.get(method, {})
            table.add_row(
                method,
                f"{value:.4f}",
                "" if ndcg is None else f"{ndcg:.4f}",
                f"{source['hr@10']:.4f}" if source else "",
                f"{source['ndcg@10']:.4f}" if source.get("ndcg@10") is not None else "",
            )
        for method, source in published.items():
            if method not in section["hr@10"] and "hr@10" in source:
                table.add_row(
                    f"{method} [dim](published only)[/]",
                    "",
                    "",
                    f"{source['hr@10']:.4f}",
                    f"{source['ndcg@10']:.4f}" if source.get("ndcg@10") is not None else "",
                )
        console.print(table)


if __name__ == "__main__":
    main()
