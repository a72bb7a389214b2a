"""Speed against Flower: the same FedAvg workload on Flower's simulation engine and on FedShop's
vectorised cross-device simulator, side by side in one run.

Workload (benchmarks/flower_side.py): 100 MovieLens-1M users as clients, an MF model of 3,706 items ×
54 dims + item biases (≈ 204k shared floats), each client's private user vector kept on the client,
one local SGD step (step size 5) on the mean BPR loss over the client's items with one uniform
negative each, 5
rounds of FedAvg weighted by the clients' item counts. Both sides draw the same negatives from the
same seeds and start from the same parameters, so they must also end with the same model: the script
checks that (a speed-up is worthless if the work differs).

Reported: median per-round time after the first (warm-up) round, client updates per second, and
`speedup` = ours / Flower in client updates per second. Needs `pip install -e ".[flower]"`.

    python benchmarks/vs_flower.py --out benchmarks/out
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from fedshop.fl.local_round import LocalTraining, RoundInput
from fedshop.fl.vectorised import vectorised_round
from fedshop.models.mf import MF

# flower_side.py is a sibling script, not a package module.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import flower_side


def run_fedshop(workload: flower_side.Workload, rounds: int) -> dict:
    """The workload on FedShop's vectorised round; negatives drawn exactly as the Flower clients do."""
    item_embedding, item_bias, users = flower_side.initial_parameters(workload)
    shared = {"item_embedding": item_embedding, "item_bias": item_bias}
    user_tables = {"user_embedding": users.clone()}
    clients = torch.arange(len(workload.client_items))
    positives = [torch.from_numpy(items) for items in workload.client_items]
    training = LocalTraining(epochs=1, learning_rate=workload.learning_rate, l2=0.0, negatives=1)
    round_seconds = []
    for round_index in range(rounds):
        started = time.perf_counter()
        negatives = [
            torch.from_numpy(
                flower_side.draw_negatives(
                    workload.seed, round_index, client, workload.n_items, len(items)
                )
            ).view(1, -1, 1)
            for client, items in enumerate(workload.client_items)
        ]
        batch = RoundInput(clients=clients, positives=positives, negatives=negatives)
        update, new_users = vectorised_round(MF, shared, user_tables, batch, training)
        user_tables["user_embedding"][clients] = new_users["user_embedding"]
        shared = {k: shared[k] + update[k] for k in shared}  # FedAvg, server learning rate 1
        round_seconds.append(time.perf_counter() - started)
    return {
        "round_seconds": round_seconds,
        "final_item_embedding": shared["item_embedding"].numpy(),
        "final_user_embeddings": user_tables["user_embedding"].numpy(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()
    data_dir = args.data_dir or Path(
        os.environ.get("FEDSHOP_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    # The step size does not change the cost of a round, but a large one moves the model enough for
    # the check that both engines computed the same model to be sharp (at 0.05 it moves by ~1e-5).
    workload = flower_side.make_workload(data_dir, n_clients=args.clients, learning_rate=5.0)
    initial_items = flower_side.initial_parameters(workload)[0].numpy()
    shared_floats = workload.n_items * (workload.dim + 1)

    ours = run_fedshop(workload, args.rounds)
    flower = flower_side.run_flower(workload, rounds=args.rounds)
    reference = flower_side.run_reference(workload, rounds=args.rounds)

    def steady(seconds: list[float]) -> float:
        return statistics.median(seconds[1:] if len(seconds) > 1 else seconds)

    n = len(workload.client_items)
    ours_round, flower_round = steady(ours["round_seconds"]), steady(flower["round_seconds"])
    ours_rate, flower_rate = n / ours_round, n / flower_round
    movement = float(np.abs(reference["final_item_embedding"] - initial_items).max())
    same_as_flower = float(
        np.abs(ours["final_item_embedding"] - flower["final_item_embedding"]).max()
    )
    same_as_reference = float(
        np.abs(ours["final_item_embedding"] - reference["final_item_embedding"]).max()
    )
    result = {
        "workload": {
            "clients": n,
            "rounds": args.rounds,
            "shared_floats": shared_floats,
            "local_steps": 1,
            "dataset": "movielens-1m (ratings_no_timestamp.csv)",
        },
        "flwr_version": flower.get("flwr_version"),
        "flower_backend": flower.get("backend_config"),
        "flower_round_seconds": flower["round_seconds"],
        "flower_startup_seconds": flower.get("startup_seconds"),
        "fedshop_round_seconds": ours["round_seconds"],
        "flower_median_round_seconds_after_warmup": flower_round,
        "fedshop_median_round_seconds_after_warmup": ours_round,
        "flower_client_updates_per_second": flower_rate,
        "fedshop_client_updates_per_second": ours_rate,
        "speedup": ours_rate / flower_rate,
        "max_abs_difference_final_items_vs_flower": same_as_flower,
        "max_abs_difference_final_items_vs_reference": same_as_reference,
        "max_abs_movement_of_item_embedding": movement,
        "target_speedup": 50,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vs_flower.json").write_text(json.dumps(result, indent=2) + "\n")

    table = Table(title=f"FedAvg, {n} clients × {shared_floats:,} shared floats, 1 local step")
    for column in ("engine", "first round s", "median round s (after warm-up)", "client updates/s"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    table.add_row(
        f"Flower {flower.get('flwr_version', '')} simulation",
        f"{flower['round_seconds'][0]:.3f}", f"{flower_round:.3f}", f"{flower_rate:,.0f}",
    )  # fmt: skip
    table.add_row(
        "FedShop vectorised",
        f"{ours['round_seconds'][0]:.3f}", f"{ours_round:.4f}", f"{ours_rate:,.0f}",
    )  # fmt: skip
    console = Console()
    console.print(table)
    console.print(
        f"speedup {ours_rate / flower_rate:,.0f}× (target ≥ 50×); final item embeddings differ "
        f"from Flower's by at most {same_as_flower:.1e}, from the sequential reference by "
        f"{same_as_reference:.1e}, while training moved them by up to {movement:.1e}"
    )
    if same_as_flower > 1e-3 * movement or same_as_reference > 1e-3 * movement:
        sys.exit("error: FedShop and Flower ended with different models; the timing is not valid")


if __name__ == "__main__":
    main()
