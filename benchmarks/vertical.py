"""Vertical federated learning on RentTheRunway (issue 19): does the partner's data help, what leaks
across the cut, and what does encryption cost?

Per seed, `fedshop.vertical.simulate.run_vertical` (the platform holds rentals and fit labels, a
partner one profile of body measurements per customer; 40% of customers at both) trains split
learning across the cut (joint), the platform alone on its own columns (label_holder_only) and one
model on the pooled columns (centralized), all on the aligned customers' rentals and scored on the
latest 20% of them by time (macro AUC over small / fit / large, and accuracy). Then the label-leakage
attacks on the gradients each feature holder receives (norm: "not fit"; cosine: "small", "large";
max over the recorded exchanges), the reconstruction attack on the activations the label holder
receives (R² per measurement), and a second joint run with the gradients clipped and noised (label
DP: ε at δ, its macro-AUC cost and time cost). Medians over seeds, with the issue's targets.

Then vertical logistic regression with Paillier-encrypted gradients against the same model in
plaintext (`fedshop.vertical.hetero_lr.time_per_epoch`, the rows of `hetero_lr.py`): seconds per
epoch both ways and `he_overhead_ratio`, next to FATE's published Hetero-Coordinated-LR figure.

The `Plan` and protection defaults were not tuned on the test rentals. On validation rentals (the
latest 20% of each seed's training rentals; 2026-12-02), seed 0, all three methods: item embedding 4,
weight decay 1e-3 / 1e-2, dropout 0.3, 58 rounds, 2 local epochs, batch 1024, top lr 1e-3, feature
holders' lr 3e-3 or 8 steps per exchange; the ones that raised joint without hurting the baselines
(feature holders' lr 1e-3 / 3e-3, 2 steps, 2 local epochs × 20 rounds) then on seeds 1 and 2 (joint):
none helped on more than one seed (joint moves by about ±0.01 macro AUC between seeds and settings),
so the defaults stay. Protection (seeds 0, 1): unprotected cut-gradient norms have median ≈ 0.08 and
90% quantile 0.2-0.37; clip 0.03, 0.08 or 0.2 with noise 4 (the same ε) and noise 2-3 (ε 28-49) all
held the attacks ≤ 0.6 (noise 2: up to 0.57), none with a macro-AUC gain over clip 0.5, noise 4 that
held on both seeds, so that stays too.

    python benchmarks/vertical.py --out benchmarks/out [--seeds 1 2 3] [--max-customers N]
        [--he 2048:2000 1024:10000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedshop.vertical.hetero_lr import (
    HeteroLRConfig,
    renttherunway_columns,
    renttherunway_rows,
    time_per_epoch,
)
from fedshop.vertical.simulate import VerticalSettings, run_vertical
from fedshop.vertical.split_learning import Plan

HE_TEST_ROWS = 10_000  # held-out rows of the hetero-LR cases, as benchmarks/hetero_lr.py

METHODS = ("joint", "label_holder_only", "centralized")
FATE_PUBLISHED = {
    "source": "https://github.com/FederatedAI/FATE/blob/master/doc/2.0/fate/performance.md",
    "algorithm": "Hetero-Coordinated-LR",
    "fate_version": "2.0.0",
    "seconds_per_epoch": 136.0,  # 2m16s
    "data": "guest 100,000 rows × 30 features, host 100,000 rows × 300 features",
    "machines": "2 × Intel Xeon Platinum 8255C (32 cores), 16 cores for each party",
    "note": "their hardware, data shape and parallelism, not ours: context, not a comparison",
}


def summary(result: dict) -> dict:
    """The numbers the issue asks for, out of one `run_vertical` result."""
    protection = result["protection"]
    unprotected = protection["unprotected"]["attacks"]
    protected = protection.get("protected", {})
    out = {
        "seed": result["seed"],
        **{
            m: {k: result[m][k] for k in ("macro_auc", "accuracy", "seconds")}
            for m in METHODS
            if m in result
        },
        "joint_vs_centralized": result.get("joint_vs_centralized"),
        "joint_minus_label_only": (
            result["joint"]["macro_auc"] - result["label_holder_only"]["macro_auc"]
            if "label_holder_only" in result
            else None
        ),
        "attack_unprotected": attack_maxima(unprotected),
        "reconstruction_r2": {
            holder: found["r2"]
            for holder, found in protection["unprotected"]["reconstruction"].items()
        },
        "gradient_norm_quantiles_unprotected": protection["gradient_norm_quantiles_unprotected"],
        "exchanges": result["exchanges"],
        "bytes": result["bytes"],
    }
    if protected:
        out["protected"] = {
            "clip": protected["clip"],
            "noise_multiplier": protected["noise_multiplier"],
            "releases_per_customer": protected["releases_per_customer"],
            "epsilon": protected["epsilon"],
            "delta": protected["delta"],
            "macro_auc": protected["joint"]["macro_auc"],
            "accuracy": protected["joint"]["accuracy"],
            "macro_auc_cost": protected["macro_auc_cost"],
            "seconds": protected["joint"]["seconds"],
            "time_cost_seconds": protected["joint"]["seconds"] - result["joint"]["seconds"],
            "attack": attack_maxima(protected["attacks"]),
        }
    features = protection.get("features_protected")
    if features:
        out["features_protected"] = {
            "clip": features["clip"],
            "noise_multiplier": features["noise_multiplier"],
            "releases_per_customer": features["releases_per_customer"],
            "epsilon": features["epsilon"],
            "delta": features["delta"],
            "macro_auc": features["joint"]["macro_auc"],
            "macro_auc_cost": features["macro_auc_cost"],
            "time_cost_seconds": features["joint"]["seconds"] - result["joint"]["seconds"],
            "reconstruction_r2": {
                holder: found["r2"] for holder, found in features["reconstruction"].items()
            },
        }
    return out


def attack_maxima(attacks: dict) -> dict:
    found = {k[len("max_") :]: v for k, v in attacks.items() if k.startswith("max_")}
    found["max_any"] = max(found.values()) if found else float("nan")
    return found


def median_of(runs: list[dict], *path: str) -> float:
    values = []
    for run in runs:
        value = run
        for key in path:
            value = value[key]
        values.append(value)
    return statistics.median(values)


def medians(runs: list[dict]) -> dict:
    out = {
        m: {k: median_of(runs, m, k) for k in ("macro_auc", "accuracy", "seconds")} for m in METHODS
    }
    out["joint_vs_centralized"] = out["joint"]["macro_auc"] / out["centralized"]["macro_auc"]
    out["joint_minus_label_only"] = (
        out["joint"]["macro_auc"] - out["label_holder_only"]["macro_auc"]
    )
    out["attack_unprotected"] = {
        k: median_of(runs, "attack_unprotected", k) for k in runs[0]["attack_unprotected"]
    }
    out["reconstruction_r2"] = {
        holder: {c: median_of(runs, "reconstruction_r2", holder, c) for c in columns}
        for holder, columns in runs[0]["reconstruction_r2"].items()
    }
    if "protected" in runs[0]:
        p = runs[0]["protected"]
        out["protected"] = {
            k: median_of(runs, "protected", k)
            for k in p
            if k not in ("attack", "clip", "noise_multiplier", "delta")
        }
        out["protected"].update(
            clip=p["clip"], noise_multiplier=p["noise_multiplier"], delta=p["delta"]
        )
        out["protected"]["attack"] = {
            k: median_of(runs, "protected", "attack", k) for k in p["attack"]
        }
    if "features_protected" in runs[0]:
        f = runs[0]["features_protected"]
        out["features_protected"] = {
            k: median_of(runs, "features_protected", k)
            for k in f
            if k not in ("reconstruction_r2", "noise_multiplier", "delta")
        }
        out["features_protected"].update(noise_multiplier=f["noise_multiplier"], delta=f["delta"])
        out["features_protected"]["reconstruction_r2"] = {
            holder: {
                c: median_of(runs, "features_protected", "reconstruction_r2", holder, c)
                for c in columns
            }
            for holder, columns in f["reconstruction_r2"].items()
        }
    out["exchanges"] = median_of(runs, "exchanges")
    out["bytes"] = {k: median_of(runs, "bytes", k) for k in runs[0]["bytes"]}
    return out


def he_cases(specs: list[str], data_dir: Path) -> list[dict]:
    X_guest, X_host, y = renttherunway_columns(renttherunway_rows(data_dir))
    test_rows = HE_TEST_ROWS
    test = (X_guest[:test_rows], [X_host[:test_rows]], y[:test_rows])
    cases = []
    for spec in specs:
        key_bits, rows = (int(x) for x in spec.split(":"))
        train = slice(test_rows, test_rows + rows)
        config = HeteroLRConfig(key_bits=key_bits, epochs=1, batch_size=128)
        result = time_per_epoch(X_guest[train], [X_host[train]], y[train], config, test=test)
        cases.append(result)
        print(
            f"hetero LR {key_bits}-bit, {rows:,} rows: "
            f"{result['encrypted_seconds_per_epoch']:.1f} s/epoch encrypted, "
            f"{1e3 * result['plaintext_seconds_per_epoch']:.2f} ms plaintext "
            f"(×{result['he_overhead_ratio']:,.0f})",
            flush=True,
        )
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--max-customers", type=int, default=0, help="0: all customers")
    parser.add_argument("--protect-clip", type=float, default=VerticalSettings.protect_clip)
    parser.add_argument("--protect-noise", type=float, default=VerticalSettings.protect_noise)
    parser.add_argument(
        "--he",
        nargs="*",
        default=["2048:2000", "1024:10000"],
        help="hetero-LR cases KEY_BITS:ROWS (e.g. 2048:2000 1024:10000); none to skip",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("FEDSHOP_DATA_DIR", "../shared/data"))
    )
    args = parser.parse_args()

    settings = VerticalSettings(
        data_dir=str(args.data_dir),
        max_customers=args.max_customers,
        protect_clip=args.protect_clip,
        protect_noise=args.protect_noise,
    )
    plan = Plan()
    runs, scenarios = [], []
    for seed in args.seeds:
        start = time.perf_counter()
        result = run_vertical(settings, plan, seed)
        runs.append(summary(result))
        scenarios.append(result["scenario"])
        r = runs[-1]
        print(
            f"seed {seed}: joint {r['joint']['macro_auc']:.4f}, label-only "
            f"{r['label_holder_only']['macro_auc']:.4f}, centralized "
            f"{r['centralized']['macro_auc']:.4f}; attack AUC {r['attack_unprotected']['max_any']:.3f}"
            f" → {r['protected']['attack']['max_any']:.3f} protected "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    median = medians(runs)
    he = he_cases(args.he, args.data_dir) if args.he else []
    document = {
        "benchmark": "vertical",
        "dataset": "renttherunway",
        "seeds": args.seeds,
        "settings": {**settings.__dict__, "fractions": list(settings.fractions)},
        "plan": replace(plan).to_dict(),
        "scenarios": scenarios,
        "runs": runs,
        "median": median,
        "targets": {
            "joint_vs_centralized": "≥ 0.98",
            "joint_minus_label_only": "> 0 (clearly)",
            "protected_attack_auc": "≤ 0.6",
        },
        "hetero_lr": {
            "cases": he,
            "machine": {
                "python": platform.python_version(),
                "cpu": platform.processor(),
                "cores_used": 1,
            },
            "fate_published": FATE_PUBLISHED,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "vertical.json"
    path.write_text(json.dumps(document, indent=2) + "\n")

    console = Console(width=150)
    table = Table(title=f"RentTheRunway fit, test = latest 20% (median over seeds {args.seeds})")
    table.add_column("method")
    table.add_column("macro AUC", justify="right")
    table.add_column("per seed", justify="right")
    table.add_column("accuracy", justify="right")
    for m in METHODS:
        per_seed = ", ".join(f"{r[m]['macro_auc']:.4f}" for r in runs)
        table.add_row(m, f"{median[m]['macro_auc']:.4f}", per_seed, f"{median[m]['accuracy']:.4f}")
    p = median.get("protected")
    if p:
        per_seed = ", ".join(f"{r['protected']['macro_auc']:.4f}" for r in runs)
        table.add_row("joint, protected", f"{p['macro_auc']:.4f}", per_seed, f"{p['accuracy']:.4f}")
    console.print(table)

    checks = Table(title="Issue 19 targets (median over seeds)")
    checks.add_column("quantity")
    checks.add_column("value", justify="right")
    checks.add_column("per seed", justify="right")
    checks.add_column("target", justify="right")
    checks.add_row(
        "joint / centralized macro AUC",
        f"{median['joint_vs_centralized']:.3f}",
        ", ".join(f"{r['joint_vs_centralized']:.3f}" for r in runs),
        "≥ 0.98",
    )
    checks.add_row(
        "joint − label-only macro AUC",
        f"{median['joint_minus_label_only']:+.4f}",
        ", ".join(f"{r['joint_minus_label_only']:+.4f}" for r in runs),
        "> 0",
    )
    for key in median["attack_unprotected"]:
        checks.add_row(
            f"attack AUC {key}, unprotected",
            f"{median['attack_unprotected'][key]:.3f}",
            ", ".join(f"{r['attack_unprotected'][key]:.3f}" for r in runs),
            "",
        )
    if p:
        for key in p["attack"]:
            checks.add_row(
                f"attack AUC {key}, protected",
                f"{p['attack'][key]:.3f}",
                ", ".join(f"{r['protected']['attack'][key]:.3f}" for r in runs),
                "≤ 0.6",
            )
        checks.add_row(
            f"protection: clip {p['clip']}, noise {p['noise_multiplier']}",
            f"ε {p['epsilon']:.1f}",
            f"δ {p['delta']:g}, {p['releases_per_customer']:.0f} releases",
            "",
        )
        checks.add_row("  macro-AUC cost", f"{p['macro_auc_cost']:+.4f}", "", "")
        checks.add_row(
            "  time cost (s, wall clock, one run each)", f"{p['time_cost_seconds']:+.1f}", "", ""
        )
    for holder, r2 in median["reconstruction_r2"].items():
        checks.add_row(
            f"reconstruction R² ({holder})",
            ", ".join(f"{c} {v:.2f}" for c, v in r2.items()),
            "",
            "",
        )
    f = median.get("features_protected")
    if f:
        checks.add_row(
            f"features protected: clip (median) {f['clip']:.2f}, noise {f['noise_multiplier']}",
            f"ε {f['epsilon']:.1f}",
            f"δ {f['delta']:g}, {f['releases_per_customer']:.0f} releases",
            "",
        )
        checks.add_row("  macro-AUC cost", f"{f['macro_auc_cost']:+.4f}", "", "")
        for holder, r2 in f["reconstruction_r2"].items():
            checks.add_row(
                f"  reconstruction R² ({holder}), protected",
                ", ".join(f"{c} {v:.2f}" for c, v in r2.items()),
                "",
                "",
            )
    b = median["bytes"]
    checks.add_row(
        "exchanges; MB to holders / to label holder",
        f"{median['exchanges']:.0f}",
        f"{b['to_feature_holders'] / 1e6:.1f} / {b['to_label_holder'] / 1e6:.1f}",
        "",
    )
    for case in he:
        checks.add_row(
            f"hetero LR {case['key_bits']}-bit, {case['rows']:,} rows: s/epoch",
            f"{case['encrypted_seconds_per_epoch']:.1f}",
            f"plain {1e3 * case['plaintext_seconds_per_epoch']:.2f} ms, "
            f"×{case['he_overhead_ratio']:,.0f}",
            "",
        )
    checks.add_row(
        "FATE 2.0 Hetero-Coordinated-LR (published)",
        "136 s/epoch",
        "100k × (30 + 300), 16 cores/party",
        "",
    )
    console.print(checks)
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
