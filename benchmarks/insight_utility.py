"""What the cross-border insight can show at each ε, and how often its intervals hold (simulated).

The real Online Retail counts (each customer bounded to `max_items` items, as `fedshop insight`
does) are released again and again with fresh Gaussian noise at the σ each ε calls for (PLD,
δ = 1/(10·n)); each simulated release goes through `over_indexing` as the command's does. Per
storefront: items listed per release, how many of them have their whole 90% interval above 1,
how often a listed item's interval holds the true (noise-free) lift, and how often the listed item
truly over-indexes. The noise here is a seeded numpy generator: a simulation, not a release.

    python benchmarks/insight_utility.py --out benchmarks/out [--epsilons 1 2 4 8] [--releases 100]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from fedshop.config import DataConfig
from fedshop.data.datasets import load_dataset
from fedshop.privacy import insight as maths


def true_counts(dataset, max_items: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    item_ids = [str(i) for i in dataset.item_ids]
    customers, counts = [], []
    for index in range(dataset.n_silos):
        silo = dataset.silo(index)
        histories = maths.Histories(
            np.asarray(dataset.user_ids[silo.users]).astype(str),
            silo.train.indptr.astype(np.int64),
            silo.train.indices.astype(np.int64),
        )
        customers.append(float(histories.n_customers))
        counts.append(maths.item_customer_counts(histories, item_ids, max_items, seed))
    return np.array(customers), np.stack(counts)


def simulate(
    customers: np.ndarray, counts: np.ndarray, sigma: float, releases: int, top: int, seed: int
) -> list[dict]:
    truth = maths.lifts(customers, counts)
    scale = np.full(len(customers), sigma)
    rng = np.random.default_rng(seed)
    tally = np.zeros((len(customers), 4))  # listed, interval above 1, covered, truly over 1
    for release in range(releases):
        noisy_customers = customers + sigma * rng.standard_normal(customers.shape)
        noisy_counts = counts + sigma * rng.standard_normal(counts.shape)
        shown = maths.over_indexing(noisy_customers, noisy_counts, scale, top, seed=release)
        for entry in (e for entries in shown for e in entries):
            true_lift = truth[entry.silo, entry.item]
            low, high = entry.interval
            tally[entry.silo] += (1, low > 1, low <= true_lift <= high, true_lift > 1)
    return [
        {
            "listed_per_release": listed / releases,
            "above_one_per_release": above / releases,
            "coverage": covered / listed if listed else None,
            "truly_over_one": real / listed if listed else None,
        }
        for listed, above, covered, real in tally
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--releases", type=int, default=100)
    parser.add_argument("--max-items", type=int, default=maths.DEFAULT_MAX_ITEMS)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    dataset = load_dataset(DataConfig())
    customers, counts = true_counts(dataset, args.max_items, seed=0)
    delta = 1 / (10 * customers.sum())
    results = []
    for epsilon in args.epsilons:
        z = maths.noise_multiplier_for(epsilon, delta, "pld")
        sigma = z * maths.sensitivity(args.max_items)
        per_silo = simulate(customers, counts, sigma, args.releases, args.top, args.seed)
        results.append(
            {
                "epsilon": epsilon,
                "sigma": sigma,
                "storefronts": dict(zip(dataset.silo_names, per_silo, strict=True)),
            }
        )
    args.out.mkdir(parents=True, exist_ok=True)
    document = {
        "dataset": dataset.name,
        "delta": delta,
        "max_items": args.max_items,
        "releases": args.releases,
        "results": results,
    }
    (args.out / "insight_utility.json").write_text(json.dumps(document, indent=2) + "\n")

    table = Table(title="Items listed per release (whole interval above 1), interval coverage")
    table.add_column("storefront")
    for result in results:
        table.add_column(f"ε = {result['epsilon']:g}\nσ = {result['sigma']:.3g}", justify="right")
    for name in dataset.silo_names:
        cells = []
        for result in results:
            row = result["storefronts"][name]
            cover = "–" if row["coverage"] is None else f"{row['coverage']:.2f}"
            cells.append(
                f"{row['listed_per_release']:.1f} ({row['above_one_per_release']:.1f}) {cover}"
            )
        table.add_row(name, *cells)
    Console().print(table)


if __name__ == "__main__":
    main()
