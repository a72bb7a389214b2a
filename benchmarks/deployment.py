"""What real deployment costs per round, against the in-process simulator, on the embedded data.

The same config and seed run twice, one after the other: in the simulator (`run_cross_silo`) and as a
local federation (`fedshop deploy local`: one SuperLink and one SuperNode process per silo, TLS and
SuperNode authentication on, each silo reading only its own data file). Both evaluate the model after
every round. Reported: the median seconds per round of each, their ratio, the deployment's start-up
(processes, registration, first contact) and whether the two final models agree.

    python benchmarks/deployment.py --out benchmarks/out [--silos 4] [--rounds 5]
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
from fedshop.data.registry import load_dataset
from fedshop.deploy.run import deploy_local
from fedshop.fl.simulator import run_cross_silo

console = Console()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--silos", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    config = load_config(
        overrides={
            "data.source": "embedded", "data.max_silos": args.silos,
            "federated.rounds": args.rounds, "methods": ["federated"],
        }
    )  # fmt: skip
    dataset = load_dataset(config.data, seed=config.seed)

    with console.status("Simulator…"):
        started = time.perf_counter()
        simulated = run_cross_silo(dataset, config)
        simulator_total = time.perf_counter() - started
    with console.status("Local deployment…"), tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        deployed = deploy_local(config, dataset, Path(folder))
        deployment_total = time.perf_counter() - started
        shared = load_file(str(Path(folder) / "deployment" / "server" / "shared.safetensors"))
    largest_difference = max(
        float((shared[k] - v).abs().max()) for k, v in simulated.server.shared.items()
    )
    simulator_round = statistics.median(r.seconds for r in simulated.history)
    deployment_round = statistics.median(r.seconds for r in deployed.history)
    result = {
        "silos": args.silos,
        "rounds": args.rounds,
        "simulator_seconds_per_round": simulator_round,
        "deployment_seconds_per_round": deployment_round,
        "overhead_ratio": deployment_round / simulator_round,
        "overhead_seconds_per_round": deployment_round - simulator_round,
        "simulator_total_seconds": simulator_total,
        "deployment_total_seconds": deployment_total,
        # Processes, keys, registration, waiting for the silos, the final evaluation and stopping.
        "deployment_fixed_seconds": deployment_total - sum(r.seconds for r in deployed.history),
        "largest_parameter_difference": largest_difference,
        "hr@10": {
            "simulator_last_round": simulated.history[-1].metrics["hr@10"],
            "deployment_last_round": deployed.history[-1].metrics["hr@10"],
        },
    }
    table = Table(title=f"Embedded data, {args.silos} silos, {args.rounds} rounds (medians)")
    for column in ("runtime", "s / round", "total s"):
        table.add_column(column, justify="right")
    table.add_row("simulator", f"{simulator_round:.2f}", f"{simulator_total:.1f}")
    table.add_row("deployment", f"{deployment_round:.2f}", f"{deployment_total:.1f}")
    console.print(table)
    console.print(
        f"Deployment / simulator per round: {result['overhead_ratio']:.1f}× "
        f"(+{result['overhead_seconds_per_round']:.1f} s); fixed cost "
        f"{result['deployment_fixed_seconds']:.1f} s; largest parameter difference "
        f"{largest_difference:.1e}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "deployment.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"Wrote {path}")


if __name__ == "__main__":
    main()
