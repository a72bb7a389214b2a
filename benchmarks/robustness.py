"""Malicious parties against the server's defences (issue 21): a storefront, and fake shoppers.

Part 1, a malicious storefront on the embedded Online Retail data. One storefront, drawn by the
seed, attacks (`[attack]`, `fl/poisoning.py`): `sign-flip` sends its honest update reversed and
scaled, `scale` sends it scaled, `fake-purchases` trains on fake customers who buy its target items
(data poisoning). For each attack and each defence (`[federated] robust`: none, norm-bound, median,
trimmed-mean, krum), the federated model's HR@10 on the honest storefronts' customers (the
attacker's own customers left out), full ranking, and the exposure ER@10 of the attacker's target
items among those customers (the same targets in every row, the clean one included).

Part 2, fake shoppers promoting target items, cross-device (`configs/movielens-cross-device.toml`:
MF-BPR, FedAdam, every shopper a client each round; `fl/fake_shoppers.py`). For no attack and each
attack (fedrecattack, a-hum) at each share of fake shoppers, and each cross-device defence (none,
norm-bound, row-bound, similarity): ER@10 of the target items over the genuine shoppers and HR@10,
both full-catalogue ranking after the shoppers' final refit. The best defence is the one with the
lowest ER@10 at 5 % fake shoppers, worst case over the attacks.

    python benchmarks/robustness.py --out DIR [--part all|storefront|shoppers]
        [--seed 1] [--rounds 10] [--scale 100] [--storefront-attacks none sign-flip …]
        [--storefront-defences none median …] [--storefront-fake-fraction 2]
        [--storefront-targets 5]                                              (part 1)
        [--shoppers-dataset movielens-1m] [--shoppers-rounds 30] [--shoppers-per-round 0]
        [--fractions 0.01 0.05 0.1]
        [--attacks fedrecattack a-hum [fedrecattack@0.5 …: with camouflage 0.5]]
        [--defences none norm-bound row-bound similarity]
        [--device-bound B]                                                    (part 2)
        [--resummarise]                    (the headline keys again from the stored rows)
        → DIR/robustness.json (a part run alone keeps the other part's results already there)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from fedshop.config import load_config
from fedshop.data.datasets import load_dataset
from fedshop.data.interactions import for_protocol
from fedshop.eval.exposure import exposure
from fedshop.eval.metrics import summarise
from fedshop.experiment import ExperimentResult, run_experiment
from fedshop.fl.cross_device import run_cross_device
from fedshop.fl.fake_shoppers import choose_targets
from fedshop.fl.poisoning import attack_targets, attacker_silos
from fedshop.models.spec import get_model, score_all
from fedshop.report.run_folder import federated_silo_stem

ATTACKS = ("none", "sign-flip", "scale", "fake-purchases")
DEFENCES = ("none", "norm-bound", "median", "trimmed-mean", "krum")
SHOPPER_ATTACKS = ("fedrecattack", "a-hum")
SHOPPER_DEFENCES = ("none", "norm-bound", "row-bound", "similarity")
DEVICE_CONFIG = "configs/movielens-cross-device.toml"


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
    exposed = shoppers = 0
    for index, name in enumerate(result.dataset.silo_names):
        if name in attackers:
            continue
        tables = result.weights[federated_silo_stem(name)]
        er = exposure(
            lambda rows, t=tables: score_all(spec, shared, t, torch.from_numpy(rows)),
            result.dataset.silo(index).train,
            targets,
        )
        exposed, shoppers = exposed + er.exposed, shoppers + er.shoppers
    return exposed / shoppers


def storefront_part(args: argparse.Namespace) -> dict:
    """Part 1: a malicious storefront on Online Retail."""
    base = {"seed": args.seed, "methods": ["federated"], "federated.rounds": args.rounds}
    dataset = load_dataset(load_config(overrides=base).data, seed=args.seed)
    attack = load_config(overrides={"attack.targets": args.storefront_targets}).attack
    attacking = attacker_silos(attack, dataset.n_silos, args.seed)
    attacker = {dataset.silo_names[i] for i in attacking}
    targets = attack_targets(dataset.silo(attacking[0]).train, attack.targets, args.seed)
    rows = []
    for kind in args.storefront_attacks:
        for defence in args.storefront_defences:
            config = load_config(
                overrides={
                    **base,
                    "attack.kind": kind,
                    "attack.scale": args.scale,
                    "attack.fake_fraction": args.storefront_fake_fraction,
                    "attack.targets": args.storefront_targets,
                    "federated.robust": defence,
                    "federated.robust_bound": args.bound,
                }
            )
            started = time.perf_counter()
            run = run_experiment(config, dataset)
            result = run.methods["federated"]
            rows.append(
                {
                    "attack": kind,
                    "defence": defence,
                    "hr10_honest": honest_hr10(result.per_silo, attacker),
                    "er10_targets": honest_exposure(run, targets, attacker),
                    "hr10_all": result.summary["hr@10"],
                    "seconds": time.perf_counter() - started,
                }
            )
            print(
                f"{kind:<16}{defence:<14}HR@10 honest {rows[-1]['hr10_honest']:.4f}  "
                f"ER@10 targets {rows[-1]['er10_targets']:.4f}",
                flush=True,
            )
    clean = next(
        (r["hr10_honest"] for r in rows if r["attack"] == "none" and r["defence"] == "none"), None
    )
    print(f"attacker: {', '.join(sorted(attacker))}; clean HR@10 (honest) {clean}")
    return {
        "dataset": "online-retail (embedded), one silo per country",
        "seed": args.seed,
        "rounds": args.rounds,
        "attacker": sorted(attacker),
        "scale": args.scale,
        "fake_fraction": args.storefront_fake_fraction,
        "targets": targets.tolist(),
        "norm_bound": args.bound,
        "malicious_storefront": rows,
        "hr10_clean": clean,
    }


def shopper_run(dataset, overrides: dict) -> dict:
    """One cross-device run: HR@10 and the targets' ER@10 over the genuine shoppers."""
    config = load_config(DEVICE_CONFIG, overrides)
    started = time.perf_counter()
    run = run_cross_device(dataset, config)
    targets = choose_targets(dataset.train, config.attack.targets, config.seed)
    er = exposure(lambda rows: run.scores(torch.from_numpy(rows)), dataset.train, targets)
    norms = run.screened.median_norms if run.screened is not None else []
    return {
        "er10": er.ratio,
        "exposed": er.exposed,
        "shoppers": er.shoppers,
        "hr10": float(summarise(run.final)["hr@10"]),
        "fakes": run.fakes.count if run.fakes is not None else 0,
        "kept_last_round": len(run.history[-1].clients) if run.history else None,
        "seconds": time.perf_counter() - started,
        # The median norm of the genuine updates per round (known where the round was screened).
        "median_update_norm": norms,
    }


def shoppers_part(args: argparse.Namespace) -> dict:
    """Part 2: fake shoppers promoting unpopular target items, cross-device."""
    base = {
        "seed": args.seed,
        "methods": ["federated"],
        "data.dataset": args.shoppers_dataset,
        "federated.rounds": args.shoppers_rounds,
        "eval.protocol": "full",
        "eval.eval_every": args.shoppers_rounds,
        "federated.clients_per_round": args.shoppers_per_round,
    }
    config = load_config(DEVICE_CONFIG, base)
    dataset = for_protocol(load_dataset(config.data, seed=args.seed), "full", "test", args.seed)
    targets = choose_targets(dataset.train, config.attack.targets, args.seed).tolist()
    genuine = int((dataset.train.getnnz(axis=1) > 0).sum())
    cells = [("none", 0.0)] + [(a, f) for a in args.attacks for f in args.fractions]
    rows = []
    # norm-bound's bound: given, or the median genuine update norm over the rounds of the first
    # screened run (norm-bound runs last in each cell so that one exists).
    bound = args.device_bound
    defences = sorted(args.defences, key=lambda d: d == "norm-bound")
    for attack, fraction in cells:
        for defence in defences:
            overrides = {**base, "federated.robust": defence}
            kind, _, camouflage = attack.partition("@")  # "fedrecattack@0.5": with camouflage
            if defence == "norm-bound":
                if bound is None:
                    measured = [n for r in rows for n in r["median_update_norm"]]
                    bound = float(np.median(measured)) if measured else 1.0
                overrides["federated.robust_bound"] = bound
            if attack != "none":
                overrides |= {"attack.kind": kind, "attack.fake_fraction": fraction}
                overrides["attack.camouflage"] = float(camouflage or 0.0)
            row = {"attack": attack, "fraction": fraction, "defence": defence}
            row |= shopper_run(dataset, overrides)
            rows.append(row)
            with (args.out / f"robustness-{args.shoppers_dataset}.rows.jsonl").open("a") as log:
                log.write(json.dumps(row) + "\n")  # each row as it comes, for long grids
            print(
                f"{attack:<13}{fraction:>5.0%} {defence:<11} ER@10 {row['er10']:.4f}  "
                f"HR@10 {row['hr10']:.4f}  fakes {row['fakes']}  {row['seconds']:.0f} s",
                flush=True,
            )
    return {
        "dataset": args.shoppers_dataset,
        "config": DEVICE_CONFIG,
        "seed": args.seed,
        "rounds": args.shoppers_rounds,
        "clients_per_round": args.shoppers_per_round or "all",
        "genuine_shoppers": genuine,
        "targets": targets,
        "norm_bound": bound,
        "rows": rows,
        # The published attacks; with camouflage (an attacker who knows of the similarity
        # defence) reported apart.
        **headline(rows, [a for a in args.attacks if "@" not in a]),
        "adaptive": headline(rows, args.attacks),
    }


def headline(rows: list[dict], attacks) -> dict:
    """The issue's keys: clean ER@10, the worst attack at 5 % without and with the best defence."""

    def cell(attack, fraction, defence):
        return next(
            (
                r
                for r in rows
                if (r["attack"], r["fraction"], r["defence"]) == (attack, fraction, defence)
            ),
            None,
        )

    clean = cell("none", 0.0, "none")
    worst = {}
    for defence in {r["defence"] for r in rows}:
        found = [cell(a, 0.05, defence) for a in attacks]
        if found and all(found):
            worst[defence] = max(r["er10"] for r in found)
    defended = {d: v for d, v in worst.items() if d != "none" and cell("none", 0.0, d)}
    # Ties (e.g. several defences at ER@10 0) go to the one with the better HR@10 without attack.
    best = min(defended, key=lambda d: (defended[d], -cell("none", 0.0, d)["hr10"]), default=None)
    out = {
        "er10_clean": clean["er10"] if clean else None,
        "hr10_clean": clean["hr10"] if clean else None,
        "er10_attack_5pct": worst.get("none"),
        "er10_attack_5pct_by_attack": {
            a: cell(a, 0.05, "none")["er10"] for a in attacks if cell(a, 0.05, "none")
        },
        "best_defence": best,
        "er10_defended_5pct": defended.get(best),
        "hr10_defended_clean_ratio": (
            cell("none", 0.0, best)["hr10"] / clean["hr10"] if best and clean else None
        ),
    }
    if best and clean:
        out["targets_met"] = {
            "er10_defended_within_2x_clean": out["er10_defended_5pct"] <= 2 * clean["er10"],
            "hr10_ratio_at_least_0.97": out["hr10_defended_clean_ratio"] >= 0.97,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--part", choices=("all", "storefront", "shoppers"), default="all")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--scale", type=float, default=100.0)
    parser.add_argument("--bound", type=float, default=1.0, help="norm-bound's L2 bound")
    parser.add_argument("--storefront-attacks", nargs="+", default=list(ATTACKS))
    parser.add_argument("--storefront-defences", nargs="+", default=list(DEFENCES))
    parser.add_argument(
        "--storefront-fake-fraction", type=float, default=2.0,
        help="fake-purchases: fake customers per real customer of the attacking storefront",
    )  # fmt: skip
    parser.add_argument(
        "--storefront-targets", type=int, default=5, help="items the storefront promotes"
    )
    parser.add_argument("--shoppers-dataset", default="movielens-1m")
    parser.add_argument("--shoppers-rounds", type=int, default=30)
    parser.add_argument(
        "--shoppers-per-round", type=int, default=0, help="clients sampled per round (0: all)"
    )
    parser.add_argument(
        "--resummarise",
        action="store_true",
        help="recompute the headline keys of DIR/robustness.json from its rows (no training)",
    )
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.05, 0.1])
    parser.add_argument("--attacks", nargs="+", default=list(SHOPPER_ATTACKS))
    parser.add_argument("--defences", nargs="+", default=list(SHOPPER_DEFENCES))
    parser.add_argument(
        "--device-bound",
        type=float,
        default=None,
        help="cross-device norm-bound's L2 bound (default: the measured median genuine norm)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "robustness.json"
    keep = args.part != "all" or args.resummarise
    document = json.loads(path.read_text()) if path.exists() and keep else {}
    if args.resummarise:  # the headline keys again from the stored rows, nothing trained
        for part in document.get("fake_shoppers", {}).values():
            published = sorted({r["attack"] for r in part["rows"]} - {"none"})
            part.update(headline(part["rows"], [a for a in published if "@" not in a]))
            part["adaptive"] = headline(part["rows"], published)
        args.part = "none"
    if args.part in ("all", "storefront"):
        document.update(storefront_part(args))
    if args.part in ("all", "shoppers"):
        document.setdefault("fake_shoppers", {})[args.shoppers_dataset] = shoppers_part(args)
    if "fake_shoppers" in document:
        # The keys at the top level: from ML-1M when it was run, else the dataset run.
        parts = document["fake_shoppers"]
        head = parts.get("movielens-1m", parts.get(args.shoppers_dataset, {}))
        for key in (
            "er10_clean",
            "er10_attack_5pct",
            "er10_defended_5pct",
            "hr10_defended_clean_ratio",
            "best_defence",
        ):
            document[key] = head.get(key)
    document["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
