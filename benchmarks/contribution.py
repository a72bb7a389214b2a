"""Each storefront's contribution on the embedded Online Retail data (issue 21, item 3).

1. The default configuration (seed 1, 10 rounds, federated only, `[contribution]` at its defaults:
   GTG-Shapley and leave-one-out from the rounds, NDCG@10 on the test split): clean, with one
   free-riding storefront (`[attack] kind = "free-ride"`: noise of an honest update's norm, its
   real weight) and with one sign-flipping storefront (`sign-flip`, ×`--scale`). The attacker is drawn by the seed. Per
   silo: Shapley, leave-one-out, evaluated customers.
2. GTG-Shapley against exact Shapley from the same rounds, where exact enumeration is cheap: the
   smallest countries merged into five silos (`[data] max_silos = 5`), every subset of every round
   evaluated once; GTG (the default settings, and more permutations) run on those evaluations.
3. The time contribution adds to a round of the default configuration: two federations driven
   side by side, round for round (its first `--timing-rounds` rounds, whose gains are the largest,
   so few are skipped), one with `[contribution] method = "none"`; the median wall time of a round
   (training, contribution, server step, the round's evaluation) of each.

    python benchmarks/contribution.py --out DIR [--seed 1] [--rounds 10] [--scale 10]
        [--timing-rounds 6] [--gtg-trials 20] [--skip attacks exact timing] → DIR/contribution.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from fedshop.config import load_config
from fedshop.data.datasets import load_dataset
from fedshop.experiment import run_experiment
from fedshop.fl.client import LocalTask
from fedshop.fl.contribution import CachedUtility, exact_shapley, value_round
from fedshop.fl.in_process import (
    SiloTransport,
    build_federation,
    contribution_meter,
    run_cross_silo,
)
from fedshop.fl.poisoning import attacker_silos
from fedshop.fl.rounds import RoundDriver
from fedshop.report.run_folder import metrics_document
from fedshop.seeding import derive_seed

ATTACKS = ("none", "free-ride", "sign-flip")


def attack_runs(args, dataset) -> tuple[list[dict], str]:
    base = {"seed": args.seed, "methods": ["federated"], "federated.rounds": args.rounds}
    attacker = dataset.silo_names[
        attacker_silos(load_config().attack, dataset.n_silos, args.seed)[0]
    ]
    runs = []
    for attack in ATTACKS:
        config = load_config(overrides={**base, "attack.kind": attack, "attack.scale": args.scale})
        started = time.perf_counter()
        result = run_experiment(config, dataset)
        seconds = time.perf_counter() - started
        metrics = metrics_document(result)
        block = metrics["contribution"]
        runs.append(
            {
                "attack": attack,
                "hr10": metrics["federated"]["hr@10"],
                "ndcg10": metrics["federated"]["ndcg@10"],
                "seconds": seconds,
                "contribution": {k: v for k, v in block.items() if k != "per_round"},
                "customers": {s: m["federated"]["users"] for s, m in metrics["per_silo"].items()},
            }
        )
        print(
            f"{attack:<10} NDCG@10 {runs[-1]['ndcg10']:.4f}  contribution {block['seconds']:.1f} s"
            f" of {seconds:.1f} s, {block['evaluations']} evaluations",
            flush=True,
        )
    return runs, attacker


def print_table(runs: list[dict], attacker: str) -> None:
    silos = list(runs[0]["customers"])
    header = "| silo | customers | " + " | ".join(
        f"Shapley {r['attack']} | LOO {r['attack']}" for r in runs
    )
    print(header + " |")
    print("|---" * (2 + 2 * len(runs)) + "|")
    for silo in silos:
        mark = " (attacker)" if silo == attacker else ""
        cells = []
        for r in runs:
            v = r["contribution"]["per_silo"][silo]
            cells += [f"{v['shapley']:+.5f}", f"{v['leave_one_out']:+.5f}"]
        print(f"| {silo}{mark} | {runs[0]['customers'][silo]} | " + " | ".join(cells) + " |")


def gtg_against_exact(args) -> dict:
    """Exact Shapley of every round of a 5-silo run, and GTG-Shapley on the same evaluations."""
    overrides = {
        "seed": args.seed,
        "methods": ["federated"],
        "federated.rounds": args.rounds,
        "data.max_silos": 5,
        "contribution.method": "exact",
        "contribution.round_tolerance": 0.0,
    }
    config = load_config(overrides=overrides)
    dataset = load_dataset(config.data, seed=args.seed)
    started = time.perf_counter()
    run = run_cross_silo(dataset, config)
    seconds = time.perf_counter() - started
    names = dataset.silo_names
    exact = {name: 0.0 for name in names}
    settings = {
        "default": load_config().contribution,
        "5 permutations": load_config(overrides={"contribution.permutations": 5}).contribution,
        "20 permutations": load_config(overrides={"contribution.permutations": 20}).contribution,
        "20 permutations, no truncation": load_config(
            overrides={"contribution.permutations": 20, "contribution.tolerance": 0.0}
        ).contribution,
    }
    for record in run.contribution_rounds:
        for i, v in exact_shapley(record.participants, record.utilities.__getitem__).items():
            exact[names[i]] += v
    scale = max(abs(v) for v in exact.values())
    order = sorted(names, key=exact.get)
    comparison = {}
    for label, chosen in settings.items():
        trials = []
        for trial in range(args.gtg_trials):  # GTG's own randomness: its permutations
            values, evaluations = {name: 0.0 for name in names}, 0
            for record in run.contribution_rounds:
                utility = CachedUtility(record.utilities.__getitem__)
                rng = np.random.default_rng(derive_seed(args.seed, "gtg", trial, record.round))
                valued = value_round(record.round, record.participants, utility, chosen, rng)
                evaluations += valued.evaluations
                for i, v in valued.shapley.items():
                    values[names[i]] += v
            error = max(abs(values[n] - exact[n]) for n in names)
            trials.append(
                {
                    "values": values,
                    "evaluations": evaluations,
                    "max_abs_error": error,
                    "same_order": sorted(names, key=values.get) == order,
                }
            )
        errors = [t["max_abs_error"] for t in trials]
        comparison[label] = {
            "trials": trials,
            "evaluations_median": statistics.median(t["evaluations"] for t in trials),
            "max_abs_error_median": statistics.median(errors),
            "max_abs_error_worst": max(errors),
            "relative_error_median": statistics.median(errors) / scale,
            "same_order_share": sum(t["same_order"] for t in trials) / len(trials),
        }
    print(f"\nGTG-Shapley against exact Shapley ({len(names)} silos, {args.rounds} rounds, "
          f"{run.contribution['evaluations']} exact evaluations, {seconds:.1f} s; GTG "
          f"{args.gtg_trials} times on the same evaluations, first trial shown):")  # fmt: skip
    print("| silo | exact | " + " | ".join(f"GTG {label}" for label in settings) + " |")
    print("|---" * (2 + len(settings)) + "|")
    for name in names:
        cells = [f"{comparison[label]['trials'][0]['values'][name]:+.5f}" for label in settings]
        print(f"| {name} | {exact[name]:+.5f} | " + " | ".join(cells) + " |")
    for label, c in comparison.items():
        print(
            f"GTG {label}: median {c['evaluations_median']:.0f} of {2 ** len(names) * args.rounds} "
            f"evaluations; largest error per trial: median {c['max_abs_error_median']:.5f} "
            f"({100 * c['relative_error_median']:.0f} % of the largest value), worst "
            f"{c['max_abs_error_worst']:.5f}; exact order in {100 * c['same_order_share']:.0f} % "
            "of trials"
        )
    return {
        "silos": names,
        "rounds": args.rounds,
        "exact": exact,
        "exact_evaluations": run.contribution["evaluations"],
        "seconds": seconds,
        "gtg": comparison,
    }


def side_by_side(args) -> dict:
    """Median round time of a default federation with and without contribution, round for round."""
    drivers, stamps, meters = {}, {}, {}
    dataset = None
    for method in ("none", "gtg"):
        config = load_config(overrides={"seed": args.seed, "contribution.method": method})
        if dataset is None:
            dataset = load_dataset(config.data, seed=args.seed)
        run = build_federation(dataset, config)
        meter = contribution_meter(config, run) if method == "gtg" else None
        transport = SiloTransport(
            run.clients, LocalTask.of_run(config), config.eval.split,
            config.federated.personalise_epochs, contribution=meter,
        )  # fmt: skip
        drivers[method], stamps[method], meters[method] = (
            RoundDriver(config, run.server, transport), [], meter,
        )  # fmt: skip
    for _ in range(args.timing_rounds):
        for method, driver in drivers.items():
            started = time.perf_counter()
            driver.run_round()
            stamps[method].append(time.perf_counter() - started)
    median = {m: statistics.median(s) for m, s in stamps.items()}
    spent = [r.seconds for r in meters["gtg"].rounds]
    overhead = median["gtg"] / median["none"] - 1
    print(
        f"\nround time, default configuration, {args.timing_rounds} rounds side by side: median "
        f"{median['none']:.2f} s without contribution, {median['gtg']:.2f} s with "
        f"(+{100 * overhead:.0f} %; contribution itself: median {statistics.median(spent):.2f} s "
        f"a round, {sum(r.evaluations for r in meters['gtg'].rounds)} evaluations)"
    )
    return {
        "rounds": args.timing_rounds,
        "seconds_per_round": stamps,
        "median_seconds": median,
        "overhead": overhead,
        "contribution_seconds_per_round": spent,
        "evaluations_per_round": [r.evaluations for r in meters["gtg"].rounds],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--scale", type=float, default=10.0, help="the sign-flipper's factor")
    parser.add_argument("--timing-rounds", type=int, default=6)
    parser.add_argument("--gtg-trials", type=int, default=20, help="GTG runs on the exact rounds")
    parser.add_argument("--skip", nargs="*", default=[], choices=["attacks", "exact", "timing"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    document = {
        "dataset": "online-retail (embedded), one silo per country",
        "seed": args.seed,
        "rounds": args.rounds,
        "scale": args.scale,
        "settings": load_config().contribution.__dict__,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    if "attacks" not in args.skip:
        dataset = load_dataset(load_config(overrides={"seed": args.seed}).data, seed=args.seed)
        runs, attacker = attack_runs(args, dataset)
        print_table(runs, attacker)
        document.update(attacker=attacker, runs=runs)
    if "exact" not in args.skip:
        document["gtg_against_exact"] = gtg_against_exact(args)
    if "timing" not in args.skip:
        document["overhead"] = side_by_side(args)
    path = args.out / "contribution.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
