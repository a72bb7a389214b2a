"""Speed at scale: MovieLens-1M with every one of its 6,040 shoppers a client in every round.

One cross-device round (each client one local epoch = one full-batch SGD step over its own items with
one negative per positive, vectorised) is timed against one centralized epoch over the same training
pairs (minibatch Adam, batch 1024, the centralized baseline's trainer), interleaved in one process so
both see the same machine load. The ratio round / epoch is the number that matters: 1.0 would mean
simulating the federation costs no more than training without it.

Peak memory is measured in two fresh subprocesses (one per side) as the peak resident set size while
the round or epoch runs, above the size just before it, so the two numbers do not contaminate each
other and the data loading does not count.

    python benchmarks/cross_device_scale.py --out benchmarks/out [--device cuda]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fedshop.config import DataConfig, ModelConfig, TrainConfig
from fedshop.data.datasets import load_dataset
from fedshop.fl.cross_device import eligible_clients
from fedshop.fl.local_round import LocalTraining, draw_round
from fedshop.fl.vectorised import vectorised_round
from fedshop.models.spec import get_model
from fedshop.models.train import train_bpr

DIM = 64


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


class PeakSampler:
    """Samples this process's resident set size every few milliseconds while a block runs: the
    kernel's own peak (ru_maxrss) would include the data loading that came before."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.002)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def setup(device: str):
    dataset = load_dataset(DataConfig(dataset="movielens-1m"), seed=0)
    spec = get_model("mf-bpr")
    model = ModelConfig(dim=DIM, silo_item_bias=False)
    shared = spec.init_shared(dataset.n_items, model, torch.Generator().manual_seed(0))
    users = spec.init_users(dataset.n_users, model, torch.Generator().manual_seed(1))
    shared = {k: v.to(device) for k, v in shared.items()}
    users = {k: v.to(device) for k, v in users.items()}
    return dataset, spec, shared, users


def one_round(dataset, spec, shared, users, round_number: int) -> float:
    clients = eligible_clients(dataset.train)
    training = LocalTraining(epochs=1, learning_rate=0.5, l2=0.01, negatives=1)
    started = time.perf_counter()
    batch = draw_round(dataset.train, clients, 1, 1, torch.Generator().manual_seed(round_number))
    update, new_users = vectorised_round(spec, shared, users, batch, training)
    if shared["item_embedding"].is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    assert set(update) == set(shared) and new_users["user_embedding"].shape[0] == len(clients)
    return seconds


def one_epoch(dataset, spec, shared, users, epoch: int) -> float:
    cpu = {k: v.cpu() for k, v in shared.items()}
    private = {k: v.cpu() for k, v in users.items()}
    started = time.perf_counter()
    train_bpr(
        cpu, private, dataset.train, 1, TrainConfig(), torch.Generator().manual_seed(epoch),
        spec=spec,
    )  # fmt: skip
    return time.perf_counter() - started


def memory_part(part: str, device: str) -> None:
    """Run in a subprocess: print the peak RSS growth of one round or one epoch, in MB."""
    dataset, spec, shared, users = setup(device)
    gc.collect()
    baseline = rss_mb()
    with PeakSampler() as sampler:
        if part == "round":
            one_round(dataset, spec, shared, users, 0)
        else:
            one_epoch(dataset, spec, shared, users, 0)
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    print(json.dumps({"peak_rss_growth_mb": sampler.peak - baseline, "gpu_peak_mb": gpu}))


def measure_memory(part: str, device: str) -> dict:
    output = subprocess.run(
        [sys.executable, __file__, "--memory-part", part, "--device", device],
        check=True, capture_output=True, text=True, env=os.environ.copy(),
    ).stdout  # fmt: skip
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda (the epoch always runs on CPU)"
    )
    parser.add_argument("--memory-part", choices=("round", "epoch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_part:
        memory_part(args.memory_part, args.device)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no CUDA device")

    dataset, spec, shared, users = setup(args.device)
    clients = len(eligible_clients(dataset.train))
    one_round(dataset, spec, shared, users, 99)  # warm-up (allocator, first-call overheads)
    rounds, epochs = [], []
    for repeat in range(args.repeats):
        rounds.append(one_round(dataset, spec, shared, users, repeat))
        epochs.append(one_epoch(dataset, spec, shared, users, repeat))
    round_s, epoch_s = statistics.median(rounds), statistics.median(epochs)
    memory = {part: measure_memory(part, args.device) for part in ("round", "epoch")}
    result = {
        "dataset": "movielens-1m",
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "clients_per_round": clients,
        "training_pairs": int(dataset.train.nnz),
        "model": f"mf-bpr dim {DIM}",
        "round_seconds": rounds,
        "epoch_seconds": epochs,
        "median_round_seconds": round_s,
        "median_centralized_epoch_seconds": epoch_s,
        "round_over_epoch": round_s / epoch_s,
        "client_updates_per_second": clients / round_s,
        "peak_rss_growth_mb": {k: v["peak_rss_growth_mb"] for k, v in memory.items()},
        "gpu_peak_mb": memory["round"]["gpu_peak_mb"],
        "target_round_over_epoch": 1.5,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cross_device_scale.json").write_text(json.dumps(result, indent=2) + "\n")

    table = Table(title=f"ML-1M, {clients:,} clients per round ({args.device})")
    for column in ("", "median s", "all runs (s)", "peak RSS growth"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row(
        "cross-device round (vectorised)", f"{round_s:.2f}",
        " ".join(f"{t:.2f}" for t in rounds), f"{memory['round']['peak_rss_growth_mb']:.0f} MB",
    )  # fmt: skip
    table.add_row(
        "centralized epoch", f"{epoch_s:.2f}",
        " ".join(f"{t:.2f}" for t in epochs), f"{memory['epoch']['peak_rss_growth_mb']:.0f} MB",
    )  # fmt: skip
    console = Console()
    console.print(table)
    console.print(
        f"round / epoch = {round_s / epoch_s:.2f} (target ≤ 1.5); "
        f"{clients / round_s:,.0f} client updates per second"
    )


if __name__ == "__main__":
    main()
