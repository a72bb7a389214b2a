"""Quality on MovieLens-1M, one shopper = one client, next to published numbers.

Runs `configs/movielens-cross-device.toml` (cross-device FedAvg, sampled-100 protocol) for MF and
NeuMF, with the centralized model of the same family and popularity on the same split, and evaluates
every trained model under both protocols: sampled-100 (the NCF / federated-recsys protocol, where the
published numbers live) and full ranking (FedShop's default, much harder).

Published (sampled protocol, temporal leave-one-out):
  PFedRec (Zhang et al., IJCAI 2023), Table 2: centralized MF 68.45 / 41.37, FedMF 67.72 / 40.90,
  FedNCF 60.54 / 34.17 (HR@10 / NDCG@10, %); NCF (He et al., WWW 2017): NeuMF 0.730 / 0.447.

    python benchmarks/movielens_quality.py --out benchmarks/out [--seeds 1 2 3] [--models mf-bpr neumf]
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
from fedshop.data.interactions import RecDataset
from fedshop.eval.metrics import evaluate, summarise
from fedshop.experiment import ExperimentResult, run_experiment
from fedshop.models.spec import get_model, score_all

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "movielens-cross-device.toml"
PUBLISHED = {
    ("federated", "mf-bpr"): ("FedMF (PFedRec T2)", 0.6772, 0.4090),
    ("centralized", "mf-bpr"): ("MF (PFedRec T2)", 0.6845, 0.4137),
    ("federated", "neumf"): ("FedNCF (PFedRec T2)", 0.6054, 0.3417),
    ("centralized", "neumf"): ("NeuMF (NCF paper)", 0.730, 0.447),
}


def model_tables(result: ExperimentResult, method: str):
    """(shared, private, user_silo) of a trained method, from the run's weights."""
    if method == "federated":
        return result.weights["federated/shared"], result.weights["federated/devices"], None
    weights = dict(result.weights["centralized"])
    user_silo = weights.pop("user_silo")
    spec = get_model(result.config.model.name)
    private = {k: weights.pop(k) for k in list(weights) if k in spec.user_tables}
    private.update({k: weights.pop(k) for k in list(weights) if k == "silo_item_bias"})
    return weights, private, user_silo


def evaluate_full(result: ExperimentResult, dataset: RecDataset, method: str) -> dict:
    """Full-ranking metrics of a trained method (the run itself used the sampled protocol)."""
    spec = get_model(result.config.model.name)
    shared, private, user_silo = model_tables(result, method)
    per_silo = {}
    for silo in dataset.silos():
        users = torch.from_numpy(silo.users)
        per_silo[silo.name] = evaluate(
            lambda rows, users=users: score_all(spec, shared, private, users[rows], user_silo),
            silo.train,
            silo.heldout(result.config.eval.split),
        )
    return summarise(per_silo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--models", nargs="+", default=["mf-bpr", "neumf"])
    parser.add_argument("--rounds", type=int, default=None, help="override the config's rounds")
    args = parser.parse_args()

    console = Console(width=160)
    runs = []
    for seed in args.seeds:
        dataset = None
        for model in args.models:
            config = load_config(
                CONFIG,
                overrides={"seed": seed, "model.name": model, "federated.rounds": args.rounds},
            )
            if dataset is None:
                dataset = load_dataset(config.data, seed=seed)
            methods = ["federated", "centralized"] + (
                ["popularity"] if model == args.models[0] else []
            )
            config = load_config(
                CONFIG,
                overrides={
                    "seed": seed, "model.name": model, "federated.rounds": args.rounds,
                    "methods": methods,
                },
            )  # fmt: skip
            started = time.perf_counter()
            result = run_experiment(config, dataset)
            console.print(f"seed {seed} {model}: {time.perf_counter() - started:.0f}s")
            for method, outcome in result.methods.items():
                full = (
                    evaluate_full(result, dataset, method)
                    if method != "popularity"
                    else _popularity_full(dataset, config.eval.split)
                )
                runs.append(
                    {
                        "seed": seed,
                        "model": model if method != "popularity" else "-",
                        "method": method,
                        "sampled_hr@10": outcome.summary["hr@10"],
                        "sampled_ndcg@10": outcome.summary["ndcg@10"],
                        "full_hr@10": full["hr@10"],
                        "full_ndcg@10": full["ndcg@10"],
                        "users": outcome.summary["users"],
                        "seconds": outcome.seconds,
                    }
                )
    split_rule = dataset.report["split_rule"]
    rows = _medians(runs)
    document = {
        "dataset": "movielens-1m",
        "config": str(CONFIG.relative_to(ROOT)),
        "split_rule": split_rule,
        "seeds": args.seeds,
        "runs": runs,
        "medians": rows,
        "published": {
            f"{method}/{model}": {"source": src, "hr@10": hr, "ndcg@10": ndcg}
            for (method, model), (src, hr, ndcg) in PUBLISHED.items()
        },
        "target_fedmf_hr@10": 0.68,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "movielens_quality.json").write_text(json.dumps(document, indent=2) + "\n")

    table = Table(title=f"MovieLens-1M, 1 user = 1 client (medians over seeds {args.seeds})")
    table.caption = split_rule
    for column in ("method", "model", "sampled HR@10", "sampled NDCG@10", "full HR@10",
                   "full NDCG@10", "published HR@10", "published NDCG@10", "source"):  # fmt: skip
        left = column in ("method", "model", "source")
        table.add_column(column, justify="left" if left else "right", no_wrap=True)
    for row in rows:
        published = PUBLISHED.get((row["method"], row["model"]), ("", None, None))
        table.add_row(
            row["method"], row["model"],
            f"{row['sampled_hr@10']:.4f}", f"{row['sampled_ndcg@10']:.4f}",
            f"{row['full_hr@10']:.4f}", f"{row['full_ndcg@10']:.4f}",
            *(f"{v:.4f}" if v is not None else "" for v in published[1:]), published[0],
        )  # fmt: skip
    console.print(table)


def _popularity_full(dataset: RecDataset, split: str) -> dict:
    import numpy as np

    counts = torch.from_numpy(np.asarray(dataset.train.sum(axis=0), dtype=np.float32).ravel())
    per_silo = {
        silo.name: evaluate(
            lambda rows: counts.expand(len(rows), -1), silo.train, silo.heldout(split)
        )
        for silo in dataset.silos()
    }
    return summarise(per_silo)


def _medians(runs: list[dict]) -> list[dict]:
    keys = sorted({(r["method"], r["model"]) for r in runs}, key=lambda k: (k[1], k[0]))
    out = []
    for method, model in keys:
        group = [r for r in runs if r["method"] == method and r["model"] == model]
        row = {"method": method, "model": model, "runs": len(group)}
        for metric in ("sampled_hr@10", "sampled_ndcg@10", "full_hr@10", "full_ndcg@10", "seconds"):
            row[metric] = statistics.median(r[metric] for r in group)
        out.append(row)
    return out


if __name__ == "__main__":
    main()
