"""A malicious storefront against the server's defences, on the embedded Online Retail data.

One storefront, drawn by the seed, poisons its updates (`[attack]`, `fl/poisoning.py`): `sign-flip`
sends its honest update reversed and scaled, `scale` sends it scaled. For each attack and each
defence (`[federated] robust`: none, norm-bound, median, trimmed-mean, krum), the federated model's
HR@10 on the honest storefronts' customers (the attacker's own customers left out), full ranking.

Part of issue 21: the fake-shopper attacks on ML-1M (FedRecAttack, A-hum) and their ER@10 are not
here yet.

    python benchmarks/robustness.py --out DIR [--seed 1] [--rounds 10] [--scale 100]
        → DIR/robustness.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from fedshop.config import load_config
from fedshop.data.datasets import load_dataset
from fedshop.experiment import run_experiment
from fedshop.fl.poisoning import attacker_silos

ATTACKS = ("none", "sign-flip", "scale")
DEFENCES = ("none", "norm-bound", "median", "trimmed-mean", "krum")


def honest_hr10(per_silo: dict, attackers: set[str]) -> float:
    """HR@10 over the honest storefronts' evaluated customers (each customer counts once)."""
    hits = sum(
        m["hr@10"] * m["users"] for s, m in per_silo.items() if s not in attackers and m["users"]
    )
    users = sum(m["users"] for s, m in per_silo.items() if s not in attackers)
    return hits / users


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--scale", type=float, default=100.0)
    parser.add_argument("--bound", type=float, default=1.0, help="norm-bound's L2 bound")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    base = {"seed": args.seed, "methods": ["federated"], "federated.rounds": args.rounds}
    dataset = load_dataset(load_config(overrides=base).data, seed=args.seed)
    attacker = {
        dataset.silo_names[i]
        for i in attacker_silos(load_config().attack, dataset.n_silos, args.seed)
    }
    rows = []
    for attack in ATTACKS:
        for defence in DEFENCES:
            config = load_config(
                overrides={
                    **base,
                    "attack.kind": attack,
                    "attack.scale": args.scale,
                    "federated.robust": defence,
                    "federated.robust_bound": args.bound,
                }
            )
            started = time.perf_counter()
            result = run_experiment(config, dataset).methods["federated"]
            rows.append(
                {
                    "attack": attack,
                    "defence": defence,
                    "hr10_honest": honest_hr10(result.per_silo, attacker),
                    "hr10_all": result.summary["hr@10"],
                    "seconds": time.perf_counter() - started,
                }
            )
            print(
                f"{attack:<10}{defence:<14}HR@10 honest {rows[-1]['hr10_honest']:.4f}", flush=True
            )
    clean = next(r["hr10_honest"] for r in rows if r["attack"] == "none" and r["defence"] == "none")
    document = {
        "dataset": "online-retail (embedded), one silo per country",
        "seed": args.seed,
        "rounds": args.rounds,
        "attacker": sorted(attacker),
        "scale": args.scale,
        "norm_bound": args.bound,
        "malicious_storefront": rows,
        "hr10_clean": clean,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    path = args.out / "robustness.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(
        f"attacker: {', '.join(sorted(attacker))}; clean HR@10 (honest) {clean:.4f}; wrote {path}"
    )


if __name__ == "__main__":
    main()
