"""What real deployment costs per round, against the in-process simulator, on the embedded data.

The same config and seed run twice, one after the other: in the simulator (`run_cross_silo`) and as a
local federation (`fedshop deploy local`: one SuperLink and one SuperNode process per silo, TLS and
SuperNode authentication on, each silo reading only its own data file). Both evaluate the model after
every round. Reported: the median seconds per round of each, their ratio (`deploy_round_ratio`), the
deployment's start-up (`deployment_startup_seconds`: keys, processes, registration, submitting the
run, first contact, until round 1 starts), its fixed cost (start-up, final evaluation and
stopping) and whether the two final models agree; without protection
and under secure aggregation (four message steps per round in a deployment).

    python benchmarks/deployment.py --out benchmarks/out [--silos 4] [--rounds 5] [--protection none secagg]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

from fedshop.config import load_config
from fedshop.data.datasets import load_dataset
from fedshop.deploy.launch import deploy_local
from fedshop.fl.in_process import run_cross_silo

console = Console()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--silos", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--protection", nargs="+", default=["none", "secagg"], choices=["none", "secagg"]
    )
    args = parser.parse_args()
    results = {}
    for protection in args.protection:
        config = load_config(
            overrides={
                "data.source": "embedded", "data.max_silos": args.silos,
                "federated.rounds": args.rounds, "methods": ["federated"],
                "protection.kind": protection,
            }
        )  # fmt: skip
        results[protection] = compare(config)
    table = Table(title=f"Embedded data, {args.silos} silos, {args.rounds} rounds (medians)")
    for column in ("protection", "runtime", "s / round", "total s", "ratio", "HR@10"):
        table.add_column(column, justify="right")
    for protection, result in results.items():
        for runtime in ("simulator", "deployment"):
            ratio = f"{result['overhead_ratio']:.1f}×" if runtime == "deployment" else ""
            table.add_row(
                protection, runtime, f"{result[f'{runtime}_seconds_per_round']:.2f}",
                f"{result[f'{runtime}_total_seconds']:.1f}", ratio,
                f"{result['hr@10'][f'{runtime}_last_round']:.4f}",
            )  # fmt: skip
    console.print(table)
    for protection, result in results.items():
        console.print(
            f"{protection}: deployment / simulator per round {result['overhead_ratio']:.1f}× "
            f"(+{result['overhead_seconds_per_round']:.1f} s); fixed cost "
            f"{result['deployment_fixed_seconds']:.1f} s, of which start-up "
            f"{result['deployment_startup_seconds'] or float('nan'):.1f} s; largest parameter difference "
            f"{result['largest_parameter_difference']:.1e}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "deployment.json"
    path.write_text(
        json.dumps({"silos": args.silos, "rounds": args.rounds, **results}, indent=2) + "\n"
    )
    console.print(f"Wrote {path}")


def compare(config) -> dict:
    """The same config and seed in the simulator and as a local federation, one after the other."""
    kind = config.protection.kind
    dataset = load_dataset(config.data, seed=config.seed)
    with console.status(f"Simulator ({kind})…"):
        started = time.perf_counter()
        simulated = run_cross_silo(dataset, config)
        simulator_total = time.perf_counter() - started
    first_round: list[float] = []  # when the server's log says round 1 finished

    def on_line(line: str) -> None:
        if not first_round and " round 1: " in line:
            first_round.append(time.perf_counter())

    with console.status(f"Local deployment ({kind})…"), tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        deployed = deploy_local(config, dataset, Path(folder), on_line=on_line)
        deployment_total = time.perf_counter() - started
        shared = load_file(str(Path(folder) / "deployment" / "server" / "shared.safetensors"))
    largest_difference = max(
        float((shared[k] - v).abs().max()) for k, v in simulated.server.shared.items()
    )
    simulator_round = statistics.median(r.seconds for r in simulated.history)
    deployment_round = statistics.median(r.seconds for r in deployed.history)
    # The log is followed once a second: start-up to within a second.
    startup = first_round[0] - started - deployed.history[0].seconds if first_round else None
    return {
        "simulator_seconds_per_round": simulator_round,
        "deployment_seconds_per_round": deployment_round,
        "deploy_round_ratio": deployment_round / simulator_round,
        "overhead_ratio": deployment_round / simulator_round,
        "deployment_startup_seconds": startup,
        "overhead_seconds_per_round": deployment_round - simulator_round,
        "simulator_total_seconds": simulator_total,
        "deployment_total_seconds": deployment_total,
        # Processes, keys, registration, waiting for the silos, the final evaluation and stopping.
        "deployment_fixed_seconds": deployment_total - sum(r.seconds for r in deployed.history),
        "largest_parameter_difference": largest_difference,
        "protection_bytes_per_silo_per_round": deployed.protection.bytes_per_client_per_round,
        "plaintext_bytes_per_silo_per_round": deployed.protection.plaintext_bytes_per_client,
        "hr@10": {
            "simulator_last_round": simulated.history[-1].metrics["hr@10"],
            "deployment_last_round": deployed.history[-1].metrics["hr@10"],
        },
    }


if __name__ == "__main__":
    main()
