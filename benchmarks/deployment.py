"""What real deployment costs per round, against the in-process simulator, on the embedded data.

The same config and seed run twice, one after the other: in the simulator (`run_cross_silo`) and as a
local federation (`fedshop deploy local`: one SuperLink and one SuperNode process per silo, TLS and
SuperNode authentication on, each silo reading only its own data file). Both evaluate the model after
every round.

What a round's seconds include differs between the two, so like is set against like:

- `deployment_seconds_per_round`: the median of the deployment's `RoundRecord.seconds`, from sending
  round r's training messages until the aggregate is applied. Round r's messages also carry the
  evaluation of round r-1's model (GridTransport), so rounds 2.. include one evaluation each; round
  1 evaluates nothing, and the last round's evaluation is in the final evaluation (fixed cost).
- `simulator_seconds_per_round`: the median over rounds 2.. of the simulator's wall time between
  successive `on_round` callbacks, which run after each round's evaluation: one round's training plus
  one evaluation, as a deployed round (round 1's span would include building the federation).
- `simulator_training_seconds_per_round`: the median of the simulator's `RoundRecord.seconds`
  (training only, evaluation excluded), as reported before.

`deploy_round_ratio` = deployed median / simulator median with evaluation. Also reported: the
deployment's start-up (`deployment_startup_seconds`: keys, processes, registration, submitting the
run, first contact, until round 1 starts), its fixed cost (start-up, final evaluation and
stopping) and whether the two final models agree; without protection
and under secure aggregation (four message steps per round in a deployment).

    python benchmarks/deployment.py --out benchmarks/out [--silos 4] [--rounds 5] [--protection none secagg]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
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
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="keep each deployment's folder (logs included) under this folder",
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
        results[protection] = compare(config, args.keep)
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
            f"{result['largest_parameter_difference']:.1e}; simulator training alone "
            f"{result['simulator_training_seconds_per_round']:.2f} s / round"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "deployment.json"
    path.write_text(
        json.dumps({"silos": args.silos, "rounds": args.rounds, **results}, indent=2) + "\n"
    )
    console.print(f"Wrote {path}")


def compare(config, keep: Path | None = None) -> dict:
    """The same config and seed in the simulator and as a local federation, one after the other."""
    kind = config.protection.kind
    dataset = load_dataset(config.data, seed=config.seed)
    callbacks: list[float] = []  # when each simulated round's callback ran (after its evaluation)
    with console.status(f"Simulator ({kind})…"):
        started = time.perf_counter()
        simulated = run_cross_silo(
            dataset, config, on_round=lambda _record: callbacks.append(time.perf_counter())
        )
        simulator_total = time.perf_counter() - started
    first_round: list[float] = []  # when the server's log says round 1 finished

    def on_line(line: str) -> None:
        if not first_round and " round 1: " in line:
            first_round.append(time.perf_counter())

    with console.status(f"Local deployment ({kind})…"), tempfile.TemporaryDirectory() as folder:
        if keep is not None:
            folder = str(keep / kind)
            shutil.rmtree(folder, ignore_errors=True)
        started = time.perf_counter()
        deployed = deploy_local(config, dataset, Path(folder), on_line=on_line)
        deployment_total = time.perf_counter() - started
        shared = load_file(str(Path(folder) / "deployment" / "server" / "shared.safetensors"))
    largest_difference = max(
        float((shared[k] - v).abs().max()) for k, v in simulated.server.shared.items()
    )
    simulator_training = statistics.median(r.seconds for r in simulated.history)
    # Training and one evaluation: rounds 2.. (round 1's span includes building the federation).
    spans = [b - a for a, b in itertools.pairwise(callbacks)]
    simulator_round = statistics.median(spans) if spans else simulator_training
    deployment_round = statistics.median(r.seconds for r in deployed.history)
    # The log is followed once a second: start-up to within a second.
    startup = first_round[0] - started - deployed.history[0].seconds if first_round else None
    return {
        "simulator_seconds_per_round": simulator_round,
        "simulator_seconds_per_round_includes": (
            "median over rounds 2.. of the wall time between successive on_round callbacks: "
            "one round's training and its evaluation"
        ),
        "simulator_training_seconds_per_round": simulator_training,
        "simulator_training_seconds_per_round_includes": (
            "median RoundRecord.seconds: training and aggregation, no evaluation"
        ),
        "deployment_seconds_per_round": deployment_round,
        "deployment_seconds_per_round_includes": (
            "median RoundRecord.seconds: sending round r's training messages (which also carry the "
            "evaluation of round r-1's model, rounds 2..) until the aggregate is applied"
        ),
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
