"""What compressing the updates and FedBuff buy: bytes and simulated time to a quality target.

Two settings, each from its config: MovieLens-1M cross-device (`configs/communication-movielens.toml`,
sampled-100 protocol) and Online Retail cross-silo on the embedded data
(`configs/communication-retail.toml`, full ranking). In each, every method is a separate run with the
same seed and the same log-normal client speeds (the simulated clock has stragglers):

    uncompressed       codec none, synchronous rounds: the reference
    float16            every update entry as float16
    int8-row           8-bit stochastic rounding with a scale per row (unbiased: no error feedback)
    topk-0.1/-0.02     the largest 10 % / 2 % of the entries, error feedback
    low-rank           item-table updates projected onto a shared random basis of rank dim/8 (CoLR)
    low-rank+int8-row  the projection, then int8-row on what is left (also at rank 16)
    fedbuff            codec none, FedBuff: `concurrency` clients at once, the server steps on the
                       first `buffer_size` updates to arrive; as many client updates in all as the
                       synchronous run (rounds × clients / buffer_size server steps)

Target = 0.97 × the uncompressed run's final HR@10. Reported per method: final HR@10, its ratio to
the uncompressed one, and the uplink bytes (what the clients sent), total bytes (sent + received) and
simulated seconds until the first evaluation at or above the target. Downlink is the uncompressed
model in every method, so total bytes shrink far less than uplink bytes.

    python benchmarks/communication.py --out benchmarks/out [--quick] [--deployment-json PATH]
"""

from __future__ import annotations

import argparse
import json
import time
import tomllib
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.console import Console
from rich.table import Table

from fedshop.config import load_config
from fedshop.data.datasets import load_dataset
from fedshop.fl.cross_device import run_cross_device
from fedshop.fl.in_process import run_cross_silo

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "movielens-cross-device": ROOT / "configs" / "communication-movielens.toml",
    "retail-cross-silo": ROOT / "configs" / "communication-retail.toml",
}
# Per setting: the methods run, FedBuff's buffer as a share of its concurrency (= clients per
# round), and --quick's overrides (a smoke run, not for numbers). ML-1M leaves float16 and int8-row
# alone to the retail setting: each shopper's message is encoded one by one, several minutes per
# method there; low-rank alone projects the round's sum, which is cheap.
BENCHMARK: dict[str, dict[str, Any]] = {
    "movielens-cross-device": {
        "methods": [
            "uncompressed", "low-rank", "low-rank+int8-row", "low-rank-16+int8-row", "topk-0.1",
            "fedbuff",
        ],
        "fedbuff_buffer_fraction": 0.2,
        "quick": {
            "federated.rounds": 2, "federated.clients_per_round": 100, "eval.eval_every": 1,
        },
    },
    "retail-cross-silo": {
        "methods": [
            "uncompressed", "float16", "int8-row", "topk-0.1", "topk-0.02", "low-rank",
            "low-rank+int8-row", "low-rank-16+int8-row", "fedbuff",
        ],
        "fedbuff_buffer_fraction": 0.5,
        "quick": {"federated.rounds": 2, "model.dim": 16, "federated.personalise_epochs": 1},
    },
}  # fmt: skip
TARGET_FRACTION = 0.97
REFERENCE = "uncompressed"
# Each method's [communication] overrides; "low_rank" = -1 stands for dim / 8.
METHODS: dict[str, dict[str, Any]] = {
    "uncompressed": {"codec": "none"},
    "float16": {"codec": "float16"},
    "int8-row": {"codec": "int8-row"},
    "topk-0.1": {"codec": "topk", "topk_fraction": 0.1, "error_feedback": True},
    "topk-0.02": {"codec": "topk", "topk_fraction": 0.02, "error_feedback": True},
    "low-rank": {"codec": "none", "low_rank": -1},
    "low-rank+int8-row": {"codec": "int8-row", "low_rank": -1},
    "low-rank-16+int8-row": {"codec": "int8-row", "low_rank": 16},
    "fedbuff": {"codec": "none", "schedule": "fedbuff"},
}
# Not compressed: never candidates for the best bytes reduction.
UNCOMPRESSED = {"uncompressed", "fedbuff"}

console = Console(width=170)


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A TOML table as dotted overrides for `load_config`."""
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def read_setting(name: str, path: Path, quick: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the run's dotted settings, the benchmark's own) of a setting."""
    settings = flatten(tomllib.loads(path.read_text(encoding="utf-8")))
    bench = BENCHMARK[name]
    if quick:
        settings.update(bench.get("quick", {}))
    return settings, bench


def method_overrides(
    name: str, settings: dict[str, Any], bench: dict[str, Any], clients: int
) -> dict[str, Any]:
    """The dotted overrides of one method's run; `clients` = clients (silos) per round."""
    over = dict(settings)
    for key, value in METHODS[name].items():
        if key == "low_rank" and value == -1:
            value = max(1, int(settings.get("model.dim", 64)) // 8)
        over[f"communication.{key}"] = value
    if name == "fedbuff":
        # As many client updates in all as the synchronous runs, evaluated after as many updates.
        buffer = max(1, round(clients * bench["fedbuff_buffer_fraction"]))
        steps_per_round = clients / buffer
        over["communication.concurrency"] = clients
        over["communication.buffer_size"] = buffer
        over["federated.rounds"] = round(settings["federated.rounds"] * steps_per_round)
        over["eval.eval_every"] = round(settings.get("eval.eval_every", 1) * steps_per_round)
    return over


def curve(history) -> list[dict[str, Any]]:
    """Per evaluated round: cumulative uplink and total bytes, the simulated clock, HR@10."""
    points, uplink, total = [], 0, 0
    for record in history:
        traffic = record.traffic or {}
        uplink += int(traffic.get("sent", 0))
        total += int(traffic.get("sent", 0)) + int(traffic.get("received", 0))
        if record.metrics and "hr@10" in record.metrics:
            points.append(
                {
                    "round": record.round,
                    "uplink_bytes": uplink,
                    "total_bytes": total,
                    "clock_seconds": record.clock,
                    "hr@10": float(record.metrics["hr@10"]),
                }
            )
    return points


def to_target(points: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first evaluation at or above the target, or None."""
    return next((p for p in points if p["hr@10"] >= target), None)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def run_setting(name: str, path: Path, quick: bool, out: Path) -> dict[str, Any]:
    settings, bench = read_setting(name, path, quick)
    base = load_config(overrides=settings)
    dataset = load_dataset(base.data, seed=base.seed)
    cross_device = base.federated.mode == "cross-device"
    if cross_device:
        run_fn = run_cross_device
        clients = base.federated.clients_per_round or len(dataset.user_ids)
    else:
        run_fn = run_cross_silo
        clients = base.federated.silos_per_round or len(dataset.silos())
    runs = {}
    for method in bench["methods"]:
        config = load_config(overrides=method_overrides(method, settings, bench, clients))
        with console.status(f"{name}: {method}…"):
            started = time.perf_counter()
            try:
                run = run_fn(dataset, config)
            except (ValueError, RuntimeError) as exc:
                # Recorded, not hidden: a codec the simulator cannot run in this setting.
                console.print(f"[red]{name}: {method} failed: {exc}[/red]")
                runs[method] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            seconds = time.perf_counter() - started
        points = curve(run.history)
        runs[method] = {
            "communication": {
                k: getattr(config.communication, k)
                for k in ("codec", "topk_fraction", "error_feedback", "low_rank", "schedule")
            }
            | (
                {
                    "buffer_size": config.communication.buffer_size,
                    "concurrency": config.communication.concurrency,
                }
                if method == "fedbuff"
                else {}
            ),
            "server_steps": config.federated.rounds,
            "wall_seconds": seconds,
            "curve": points,
        }
        console.print(
            f"{name}: {method} done in {seconds:.0f} s, final HR@10 {points[-1]['hr@10']:.4f}"
        )
    reference = runs[REFERENCE]
    target = TARGET_FRACTION * reference["curve"][-1]["hr@10"]
    ref_hit = to_target(reference["curve"], target)
    # FedBuff's clock is compared with the synchronous uncompressed run's.
    for result in runs.values():
        if "error" in result:
            continue
        final = result["curve"][-1]
        hit = to_target(result["curve"], target)
        result.update(
            {
                "final_hr@10": final["hr@10"],
                "hr_ratio": ratio(final["hr@10"], reference["curve"][-1]["hr@10"]),
                "uplink_bytes_total": final["uplink_bytes"],
                "total_bytes_total": final["total_bytes"],
                "clock_total": final["clock_seconds"],
                "round_to_target": hit and hit["round"],
                "uplink_bytes_to_target": hit and hit["uplink_bytes"],
                "total_bytes_to_target": hit and hit["total_bytes"],
                "clock_to_target": hit and hit["clock_seconds"],
                "uplink_reduction": ratio(
                    ref_hit and ref_hit["uplink_bytes"], hit and hit["uplink_bytes"]
                ),
                "total_bytes_reduction": ratio(
                    ref_hit and ref_hit["total_bytes"], hit and hit["total_bytes"]
                ),
            }
        )
    best = best_compressed(runs)
    block = {
        "config": str(path.relative_to(ROOT)),
        "mode": base.federated.mode,
        "dataset": base.data.dataset,
        "protocol": base.eval.protocol,
        "clients_per_round": clients,
        "rounds": base.federated.rounds,
        "eval_every": base.eval.eval_every,
        "target_hr@10": target,
        "target_definition": f"{TARGET_FRACTION} x the uncompressed synchronous run's final HR@10",
        "straggler_distribution": straggler_sentence(base.communication),
        "fedbuff_time_speedup": (
            ratio(ref_hit and ref_hit["clock_seconds"], runs["fedbuff"]["clock_to_target"])
            if "clock_to_target" in runs.get("fedbuff", {})
            else None
        ),
        "best_compressed_method": best,
        "methods": runs,
    }
    plot(name, block, out)
    return block


def best_compressed(runs: dict[str, Any]) -> str | None:
    """The compressed method with the largest uplink reduction to target, among hr_ratio ≥ 0.97."""
    candidates = [
        m
        for m, r in runs.items()
        if m not in UNCOMPRESSED
        and "error" not in r
        and r["uplink_reduction"] is not None
        and r["hr_ratio"] >= TARGET_FRACTION
    ]
    return max(candidates, key=lambda m: runs[m]["uplink_reduction"], default=None)


def straggler_sentence(com) -> str:
    return (
        f"client_speeds = {com.client_speeds}: each client's compute speed and link speeds drawn "
        f"once per run, log-normal with sigma = {com.speed_sigma} around the medians "
        f"{com.seconds_per_example} s per example and epoch, {com.uplink_mbps} Mbit/s up, "
        f"{com.downlink_mbps} Mbit/s down; dropout {com.dropout}"
    )


def plot(name: str, block: dict[str, Any], out: Path) -> None:
    for x_key, label, suffix in (
        ("uplink_bytes", "cumulative uplink bytes (all clients, log scale)", "bytes"),
        ("clock_seconds", "simulated seconds (log-normal client speeds)", "clock"),
    ):
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for method, result in block["methods"].items():
            if "error" in result:
                continue
            xs = [p[x_key] for p in result["curve"]]
            ys = [p["hr@10"] for p in result["curve"]]
            axes.plot(xs, ys, marker="o", markersize=3, label=method)
        axes.axhline(block["target_hr@10"], color="grey", linestyle="--", label="target")
        if x_key == "uplink_bytes":
            axes.set_xscale("log")
        axes.set_xlabel(label)
        axes.set_ylabel(f"HR@10 ({block['protocol']})")
        axes.set_title(f"{name}: HR@10 vs {'uplink bytes' if suffix == 'bytes' else 'time'}")
        axes.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(out / f"communication-{name}-hr-vs-{suffix}.png", dpi=120)
        plt.close(figure)


def fmt_bytes(value: float | None) -> str:
    return "—" if value is None else f"{value / 1e6:,.1f} MB"


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run, not for numbers")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--deployment-json", type=Path, default=None)
    parser.add_argument(
        "--combine", type=Path, nargs="+", default=None,
        help="summarise earlier communication.json files instead of running",
    )  # fmt: skip
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    if args.combine:
        # Settings run separately (e.g. in parallel, each with --settings): one summary of them all.
        blocks = {}
        for path in args.combine:
            blocks.update(json.loads(path.read_text())["settings"])
        for name, block in blocks.items():
            plot(name, block, args.out)
    else:
        blocks = {
            name: run_setting(name, SETTINGS[name], args.quick, args.out) for name in args.settings
        }

    for name, block in blocks.items():
        table = Table(title=f"{name}: target HR@10 {block['target_hr@10']:.4f}")
        for column in (
            "method", "final HR@10", "ratio", "uplink to target", "total to target",
            "clock to target", "uplink ×", "total ×", "uplink all rounds",
        ):  # fmt: skip
            table.add_column(column, justify="right")
        for method, r in block["methods"].items():
            if "error" in r:
                table.add_row(method, "failed (see JSON)")
                continue
            table.add_row(
                method, f"{r['final_hr@10']:.4f}", f"{r['hr_ratio']:.3f}",
                fmt_bytes(r["uplink_bytes_to_target"]), fmt_bytes(r["total_bytes_to_target"]),
                fmt(r["clock_to_target"], ",.0f") + (" s" if r["clock_to_target"] else ""),
                fmt(r["uplink_reduction"], ".2f"), fmt(r["total_bytes_reduction"], ".2f"),
                fmt_bytes(r["uplink_bytes_total"]),
            )  # fmt: skip
        console.print(table)

    best = [(b["methods"][b["best_compressed_method"]]["uplink_reduction"], name)
            for name, b in blocks.items() if b["best_compressed_method"]]  # fmt: skip
    best_setting = max(best)[1] if best else None
    best_block = blocks[best_setting] if best_setting else None
    best_method = best_block["best_compressed_method"] if best_block else None
    best_run = best_block["methods"][best_method] if best_block else {}
    speedups = {name: b["fedbuff_time_speedup"] for name, b in blocks.items()}
    deploy_round_ratio = None
    if args.deployment_json is not None and args.deployment_json.is_file():
        # benchmarks/deployment.py's JSON: one block per protection; the plain one is the ratio.
        deployment = json.loads(args.deployment_json.read_text())
        deploy_round_ratio = deployment.get("none", {}).get("deploy_round_ratio")
    summary = {
        "quick": args.quick,
        "target_definition": f"{TARGET_FRACTION} x the uncompressed synchronous run's final HR@10",
        "bytes_reduction_best": best_run.get("uplink_reduction"),
        "bytes_reduction_best_method": best_method,
        "bytes_reduction_best_setting": best_setting,
        "hr_ratio_best": best_run.get("hr_ratio"),
        "total_bytes_reduction_best": best_run.get("total_bytes_reduction"),
        "fedbuff_time_speedup": speedups.get("movielens-cross-device"),
        "fedbuff_time_speedup_by_setting": speedups,
        "straggler_distribution": next(iter(blocks.values()))["straggler_distribution"],
        "deploy_round_ratio": deploy_round_ratio,
        "wall_seconds": time.perf_counter() - started,
        # The runs themselves (with --combine: those of the combined files, which may have overlapped).
        "run_wall_seconds": sum(
            r.get("wall_seconds", 0.0) for b in blocks.values() for r in b["methods"].values()
        ),
        "settings": blocks,
    }
    console.print(
        f"Best uplink reduction to target: {fmt(summary['bytes_reduction_best'], '.2f')}× "
        f"({best_method}, {best_setting}; HR ratio {fmt(summary['hr_ratio_best'], '.3f')}); "
        f"total bytes {fmt(summary['total_bytes_reduction_best'], '.2f')}×. FedBuff time to target: "
        + ", ".join(f"{k} {fmt(v, '.2f')}×" for k, v in speedups.items())
    )
    path = args.out / "communication.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    console.print(f"Wrote {path} in {summary['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
