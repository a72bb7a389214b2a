"""A malicious storefront against the server's defences, on the embedded Online Retail data.

One storefront, drawn by the seed, attacks (`[attack]`, `fl/poisoning.py`): `sign-flip` sends its
honest update reversed and scaled, `scale` sends it scaled, `fake-purchases` trains on fake customers
who buy its target items (data poisoning). For each attack and each defence (`[federated] robust`:
none, norm-bound, median, trimmed-mean, krum), the federated model's HR@10 on the honest
storefronts' customers (the attacker's own customers left out), full ranking, and the exposure
ER@10 of the attacker's target items among those customers (`eval/exposure.py`; the same targets in
every row, the clean one included).

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

import torch

from fedshop.config import load_config
from fedshop.data.datasets import load_dataset
from fedshop.eval.exposure import Exposure, exposure
from fedshop.experiment import ExperimentResult, run_experiment
from fedshop.fl.poisoning import attack_targets, attacker_silos
from fedshop.models.spec import get_model, score_all
from fedshop.report.run_folder import federated_silo_stem

ATTACKS = ("none", "sign-flip", "scale", "fake-purchases")
DEFENCES = ("none", "norm-bound", "median", "trimmed-mean", "krum")


def honest_hr10(per_silo: dict, attackers: set[str]) -> float:
    """HR@10 over the honest storefronts' evaluated customers (each customer counts once)."""
    hits = sum(
        m["hr@10"] * m["users"] for s, m in per_silo.items() if s not in attackers and m["users"]
    )
    users = sum(m["users"] for s, m in per_silo.items() if s not in attackers)
    return hits / users


def honest_exposure(result: ExperimentResult, targets, attackers: set[str]) -> float:
    """ER@10 of `targets` among the honest storefronts' customers, each scored with its own
    storefront's vectors from the run's weights."""
    spec = get_model(result.config.model.name)
    shared = result.weights["federated/shared"]
    total = Exposure(0, 0)
    for index, name in enumerate(result.dataset.silo_names):
        if name in attackers:
            continue
        tables = result.weights[federated_silo_stem(name)]
        total += exposure(
            lambda rows, t=tables: score_all(spec, shared, t, torch.from_numpy(rows)),
            result.dataset.silo(index).train,
            targets,
        )
    return total.rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--scale", type=float, default=100.0)
    parser.add_argument("--bound", type=float, default=1.0, help="norm-bound's L2 bound")
    parser.add_argument(
        "--fake-fraction", type=float, default=2.0, help="fake customers per real one"
    )
    parser.add_argument("--targets", type=int, default=5, help="items the storefront promotes")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated")
    parser.add_argument("--defences", default=",".join(DEFENCES), help="comma-separated")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    base = {"seed": args.seed, "methods": ["federated"], "federated.rounds": args.rounds}
    dataset = load_dataset(load_config(overrides=base).data, seed=args.seed)
    attack = load_config(overrides={"attack.targets": args.targets}).attack
    attacking = attacker_silos(attack, dataset.n_silos, args.seed)
    attacker = {dataset.silo_names[i] for i in attacking}
    targets = attack_targets(dataset.silo(attacking[0]).train, attack.targets, args.seed)
    rows = []
    for attack in args.attacks.split(","):
        for defence in args.defences.split(","):
            config = load_config(
                overrides={
                    **base,
                    "attack.kind": attack,
                    "attack.scale": args.scale,
                    "attack.fake_fraction": args.fake_fraction,
                    "attack.targets": args.targets,
                    "federated.robust": defence,
                    "federated.robust_bound": args.bound,
                }
            )
            started = time.perf_counter()
            run = run_experiment(config, dataset)
            result = run.methods["federated"]
            rows.append(
                {
                    "attack": attack,
                    "defence": defence,
                    "hr10_honest": honest_hr10(result.per_silo, attacker),
                    "er10_targets": honest_exposure(run, targets, attacker),
                    "hr10_all": result.summary["hr@10"],
                    "seconds": time.perf_counter() - started,
                }
            )
            print(
                f"{attack:<16}{defence:<14}HR@10 honest {rows[-1]['hr10_honest']:.4f}  "
                f"ER@10 targets {rows[-1]['er10_targets']:.4f}",
                flush=True,
            )
    clean = next(
        (r["hr10_honest"] for r in rows if r["attack"] == "none" and r["defence"] == "none"), None
    )
    document = {
        "dataset": "online-retail (embedded), one silo per country",
        "seed": args.seed,
        "rounds": args.rounds,
        "attacker": sorted(attacker),
        "scale": args.scale,
        "fake_fraction": args.fake_fraction,
        "targets": targets.tolist(),
        "norm_bound": args.bound,
        "malicious_storefront": rows,
        "hr10_clean": clean,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    path = args.out / "robustness.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"attacker: {', '.join(sorted(attacker))}; clean HR@10 (honest) {clean}; wrote {path}")


if __name__ == "__main__":
    main()
