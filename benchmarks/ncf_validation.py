"""Choose the NCF-protocol settings on a validation split carved from training only.

Under `--protocol ncf` with `data.validation = true`, one rating per user is taken out of the NCF
training set (at random: the shared copy of MovieLens-1M has no timestamps) and ranked against 99
negatives of our own drawing. The published test files are read only to remove the test pair from
training; no test item or published negative is scored here.

Each candidate is a named set of dotted overrides on `configs/movielens-ncf.toml`; the table gives
validation HR@10 / NDCG@10 per candidate and seed, and the JSON keeps every number.

    python benchmarks/ncf_validation.py --out benchmarks/out [--seeds 1] [--only NAME ...]
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
CONFIG = ROOT / "configs" / "movielens-ncf.toml"

# name → overrides of configs/movielens-ncf.toml ("mf-64 neg1 r30" is that file as shipped).
CANDIDATES: dict[str, dict] = {
    "mf-64 neg1 r30": {"model.dim": 64, "train.negatives": 1, "federated.rounds": 30},
    "mf-64 neg4 r30": {"model.dim": 64, "train.negatives": 4, "federated.rounds": 30},
    "mf-128 neg1 r30": {"model.dim": 128, "federated.rounds": 30},
    "mf-64 neg1 r60": {"model.dim": 64, "federated.rounds": 60},
    "mf-64 neg1 r30 personalise20": {"federated.personalise_epochs": 20},
    "mf-64 neg1 r30 local4": {"federated.local_epochs": 4},
}


def run_candidate(name: str, overrides: dict, seed: int, methods: list[str]) -> dict:
    config = load_config(
        CONFIG,
        overrides={
            **overrides,
            "seed": seed,
            "methods": methods,
            "data.validation": True,
            "eval.split": "validation",
        },
    )
    dataset = load_dataset(config.data, seed=seed, protocol=config.eval.protocol)
    started = time.perf_counter()
    result = run_experiment(config, dataset)
    seconds = time.perf_counter() - started
    out = {"seconds": seconds, "overrides": overrides, "seed": seed}
    for method, outcome in result.methods.items():
        out[method] = {k: outcome.summary[k] for k in ("hr@10", "ndcg@10")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--only", nargs="+", default=None, help="candidate names to run")
    parser.add_argument("--methods", nargs="+", default=["federated"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "ncf_validation.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    console = Console()
    names = args.only or list(CANDIDATES)
    for name in names:
        if name not in CANDIDATES:
            raise SystemExit(f"unknown candidate {name!r}; known: {', '.join(CANDIDATES)}")
        for seed in args.seeds:
            outcome = run_candidate(name, CANDIDATES[name], seed, args.methods)
            record.setdefault(name, {})[str(seed)] = outcome
            path.write_text(json.dumps(record, indent=2) + "\n")
            console.print(f"{name} seed {seed}: {json.dumps(outcome)}", highlight=False)
    table = Table(title="NCF protocol, validation split (median over seeds)")
    for header in ("candidate", "method", "HR@10", "NDCG@10", "seeds", "seconds"):
        table.add_column(header)
    for name, by_seed in record.items():
        runs = list(by_seed.values())
        for method in args.methods:
            values = [run[method] for run in runs if method in run]
            if not values:
                continue
            table.add_row(
                name,
                method,
                f"{statistics.median(v['hr@10'] for v in values):.4f}",
                f"{statistics.median(v['ndcg@10'] for v in values):.4f}",
                str(len(values)),
                f"{statistics.median(run['seconds'] for run in runs):.0f}",
            )
    console.print(table)


if __name__ == "__main__":
    main()
