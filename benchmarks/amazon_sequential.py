"""Sequential recommendation on the S3-Rec Amazon files: federated SASRec (1 shopper = 1 client)
vs centralized SASRec vs popularity, full ranking, leave-last-out (validation item held out).

    export FEDSHOP_DATA_DIR=../shared/data OMP_NUM_THREADS=1
    python benchmarks/amazon_sequential.py --out results/            # Toys, seed 42, test split
    python benchmarks/amazon_sequential.py --split validation --methods centralized --loss bce \\
        --epochs 24 --out results/                                     # choosing the loss

Writes OUT/amazon_sequential-<dataset>-<split>-seed<seed>[-<tag>].json and prints a table with the
published SASRec figures (ICSRec's table) beside ours.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fedshop.sequential import PUBLISHED, run_amazon


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="amazon-toys")
    parser.add_argument("--seeds", default="42", help="comma-separated")
    parser.add_argument("--split", default="test", choices=("test", "validation"))
    parser.add_argument("--methods", default="federated,centralized,popularity")
    parser.add_argument("--mode", default="cross-device")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--clients-per-round", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="centralized epochs")
    parser.add_argument("--loss", default=None, choices=("ce", "bce"))
    parser.add_argument("--dropout", type=float, default=None)
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {
        k: v for k, v in {"loss": args.loss, "dropout": args.dropout}.items() if v is not None
    }
    for seed in [int(s) for s in args.seeds.split(",")]:
        started = time.perf_counter()
        result = run_amazon(
            args.dataset, seed, split=args.split, mode=args.mode, rounds=args.rounds,
            clients_per_round=args.clients_per_round, epochs=args.epochs,
            methods=tuple(args.methods.split(",")), log=print, **settings,
        )  # fmt: skip
        result["wall_seconds"] = time.perf_counter() - started
        result["published"] = PUBLISHED.get(args.dataset)
        tag = f"-{args.tag}" if args.tag else ""
        path = args.out / f"amazon_sequential-{args.dataset}-{args.split}-seed{seed}{tag}.json"
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"\n{args.dataset}, {args.split} split, seed {seed} ({result['wall_seconds']:.0f} s)")
        print(f"{'method':<22}{'HR@10':>8}{'NDCG@10':>9}")
        for method in ("federated sasrec", "centralized sasrec", "popularity"):
            if method in result:
                m = result[method]
                print(f"{method:<22}{m['hr@10']:>8.4f}{m['ndcg@10']:>9.4f}")
        print(f"written {path}")


if __name__ == "__main__":
    main()
