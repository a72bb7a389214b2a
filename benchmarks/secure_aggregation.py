"""What protecting updates costs, and what it buys.

1. SecAgg(+) vs a plain sum, for 20, 50, 100 and 200 clients × 1 M parameters (and 100 clients with
   10 % dropping out after the key-sharing step). Each party's work is timed on its own: in a plain
   round a client serialises its float32 update and the server adds the vectors up; in a SecAgg round
   a client also agrees keys, shares seeds and masks, and the server also rebuilds seeds and removes
   masks. "Latency" is what a deployment waits for, with clients working in parallel: the slowest
   client plus the server. The ratio secagg / plain of latencies is the headline; the ratio of all
   parties' work added up is given beside it.
2. SecAgg on the embedded data: a real cross-silo training round of the Online Retail demo with and
   without secure aggregation (the product's own workload; here local training dominates).
3. CKKS (TenSEAL): 10 silos × 1 M parameters, encrypt + aggregate + decrypt, ciphertext bytes.
4. Paillier (phe, 2048-bit keys): time per value, extrapolated to 1 M parameters.
5. The item-inference attack (`attacks/item_inference.py`) on shoppers of the embedded data, each a
   cross-device client: the server ranks item rows of what it received by size and guesses the
   shopper's purchases; accuracy on plain updates, on SecAgg's masked inputs, and on the round's sum.

    python benchmarks/secure_aggregation.py --out benchmarks/out [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from fedshop.attacks.item_inference import chance_accuracy, item_inference_accuracy
from fedshop.config import load_config
from fedshop.data.datasets import load_dataset
from fedshop.fl.cross_device import eligible_clients
from fedshop.fl.in_process import run_cross_silo
from fedshop.fl.local_round import LocalTraining, draw_round, reference_round
from fedshop.messages import AggregationPipeline, sum_messages
from fedshop.models.spec import get_model
from fedshop.secure.protected_sum import flatten, layout_of, unflatten
from fedshop.secure.secagg import SecAggSum
from fedshop.seeding import torch_generator

console = Console()


def plain_round(vectors: list[np.ndarray]) -> dict:
    """The unprotected baseline: clients send float32 bytes, the server adds them up."""
    client_seconds, payloads = [], []
    for vector in vectors:
        started = time.perf_counter()
        payloads.append(vector.astype(np.float32).tobytes())
        client_seconds.append(time.perf_counter() - started)
    started = time.perf_counter()
    total = np.zeros(len(vectors[0]), dtype=np.float64)
    for payload in payloads:
        total += np.frombuffer(payload, dtype=np.float32)
    server = time.perf_counter() - started
    return {
        "latency": max(client_seconds) + server,
        "total": sum(client_seconds) + server,
        "bytes": len(payloads[0]),
    }


def secagg_round(vectors: list[np.ndarray], **options) -> dict:
    result = SecAggSum(**options).sum(vectors, bound=1.0)
    cost = result.cost
    error = float(np.abs(result.total - np.sum([vectors[i] for i in result.contributors], 0)).max())
    return {
        "latency": cost.latency_seconds,
        "total": cost.total_seconds,
        "bytes": cost.mean_bytes_per_client,
        "client_max": max(cost.client_seconds),
        "server": cost.server_seconds,
        "neighbours": cost.details["neighbours"],
        "max_error": error,
    }


def scaling(clients: list[int], length: int, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    cases = [(n, 64, 0.0) for n in clients]
    if 100 in clients:
        cases += [(100, 32, 0.0), (100, 64, 0.1)]
    for n, bits, drop in cases:
        vectors = [rng.uniform(-1, 1, length) for _ in range(n)]
        dropped = set(range(0, n, int(1 / drop))) if drop else set()
        plain, secure = [], []
        for _ in range(repeats):  # interleaved, so both see the same machine load
            plain.append(plain_round(vectors))
            secure.append(secagg_round(vectors, ring_bits=bits, drop_after_shares=dropped))

        def med(runs, key):
            return statistics.median(r[key] for r in runs)

        rows.append(
            {
                "clients": n,
                "parameters": length,
                "ring_bits": bits,
                "dropped": len(dropped),
                "neighbours": secure[0]["neighbours"],
                "plain_latency_s": med(plain, "latency"),
                "secagg_latency_s": med(secure, "latency"),
                "secagg_client_max_s": med(secure, "client_max"),
                "secagg_server_s": med(secure, "server"),
                "latency_ratio": med(secure, "latency") / med(plain, "latency"),
                "total_work_ratio": med(secure, "total") / med(plain, "total"),
                "plain_bytes_per_client": plain[0]["bytes"],
                "secagg_bytes_per_client": med(secure, "bytes"),
                "max_abs_error": max(r["max_error"] for r in secure),
            }
        )
        del vectors
    return rows


def embedded_round(rounds: int) -> dict:
    """Real cross-silo training on the embedded data, plain and with SecAgg, rounds interleaved."""
    out = {}
    for kind in ("none", "secagg"):
        config = load_config(
            overrides={
                "methods": ["federated"],
                "federated.rounds": rounds,
                "federated.personalise_epochs": 0,
                "eval.eval_every": 1000,
                "protection.kind": kind,
            }
        )
        dataset = load_dataset(config.data, seed=config.seed)
        run = run_cross_silo(dataset, config)
        out[kind] = {
            "round_seconds": statistics.median(r.seconds for r in run.history),
            "protocol_seconds": statistics.median(
                r.protection["seconds"] for r in run.history if r.protection
            )
            if kind == "secagg"
            else 0.0,
            "silos": dataset.n_silos,
        }
    out["ratio"] = out["secagg"]["round_seconds"] / out["none"]["round_seconds"]
    return out


def ckks(silos: int, length: int) -> dict:
    from fedshop.secure.ckks import CkksSum

    rng = np.random.default_rng(1)
    vectors = [rng.uniform(-1, 1, length) for _ in range(silos)]
    protection = CkksSum()
    result = protection.sum(vectors, bound=1.0)
    cost = result.cost
    return {
        "silos": silos,
        "parameters": length,
        "seconds_total": cost.total_seconds,
        "latency_seconds": cost.latency_seconds,
        "max_abs_error": float(np.abs(result.total - np.sum(vectors, 0)).max()),
        "bytes_per_client": cost.mean_bytes_per_client,
        "expansion_vs_float32": cost.mean_bytes_per_client / (4 * length),
        "details": {k: v for k, v in cost.details.items() if not isinstance(v, list)},
    }


def paillier(values: int) -> dict:
    from fedshop.secure.paillier import PaillierSum

    rng = np.random.default_rng(2)
    vectors = [rng.uniform(-1, 1, values) for _ in range(2)]
    protection = PaillierSum(key_bits=2048)
    result = protection.sum(vectors, bound=1.0)
    per_value = statistics.median(result.cost.client_seconds) / values
    return {
        "values": values,
        "key_bits": 2048,
        "client_seconds_per_value": per_value,
        "extrapolated_hours_per_client_1M": per_value * 1e6 / 3600,
        "bytes_per_value": result.cost.mean_bytes_per_client / values,
        "max_abs_error": float(np.abs(result.total - np.sum(vectors, 0)).max()),
    }


def item_inference(shoppers: int, seed: int = 0) -> dict:
    """Plain update vs SecAgg masked input vs the round's sum, as seen by the server."""
    config = load_config(overrides={"federated.mode": "cross-device", "seed": seed})
    dataset = load_dataset(config.data, seed=seed)
    spec = get_model(config.model.name)
    shared = spec.init_shared(
        dataset.n_items, config.model, torch_generator(seed, "shared", "init")
    )
    users = spec.init_users(dataset.n_users, config.model, torch_generator(seed, "users"))
    pool = eligible_clients(dataset.train)
    sizes = np.diff(dataset.train.indptr)[pool.numpy()]
    pool = pool[torch.from_numpy(sizes >= 5)]
    chosen = torch.sort(pool[torch.randperm(len(pool), generator=torch_generator(seed, "x"))])[0]
    chosen = chosen[:shoppers]
    fed = config.federated
    training = LocalTraining(
        fed.local_epochs, fed.client_learning_rate, config.train.l2, config.train.negatives
    )
    batch = draw_round(
        dataset.train, chosen, training.epochs, training.negatives, torch_generator(seed, "round")
    )
    captured = []

    def capture(messages):
        captured.extend(messages)
        return sum_messages(messages)

    reference_round(spec, shared, users, batch, training, AggregationPipeline(summation=capture))
    purchased = [p.numpy() for p in batch.positives]
    normaliser = sum(m.weight for m in captured)
    vectors = [flatten(m, normaliser) for m in captured]
    bound = float(max(np.abs(v).max() for v in vectors)) * 1.01
    secagg = SecAggSum(keep_server_view=True)
    result = secagg.sum(vectors, bound)

    def rows(vector: np.ndarray) -> np.ndarray:
        tensors, _ = unflatten(vector, layout_of(captured[0]), normaliser)
        return np.concatenate(
            [tensors[n].reshape(dataset.n_items, -1).numpy() for n in spec.item_tables], axis=1
        )

    plain_views = [rows(v) for v in vectors]
    masked_views = [rows(secagg.server_view[i]) for i in range(len(vectors))]
    aggregate = rows(result.total)
    return {
        "shoppers": len(vectors),
        "mean_items_per_shopper": float(np.mean([len(np.unique(p)) for p in purchased])),
        "catalogue": dataset.n_items,
        "none": item_inference_accuracy(plain_views, purchased),
        "secagg": item_inference_accuracy(masked_views, purchased),
        "secagg_sum": item_inference_accuracy([aggregate] * len(purchased), purchased),
        "chance": chance_accuracy(purchased, dataset.n_items),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    length = 100_000 if args.quick else 1_000_000
    clients = [20, 50, 100] if args.quick else [20, 50, 100, 200]
    repeats = 1 if args.quick else 3

    with console.status("SecAgg vs plain sums…"):
        secagg_rows = scaling(clients, length, repeats)
    table = Table(title=f"SecAgg(+) vs plain sum, {length:,} parameters (median of {repeats})")
    for column in ("clients", "ring", "dropped", "k", "plain s", "secagg s", "slowest client s",
                   "server s", "latency ×", "all work ×", "MB sent / client"):  # fmt: skip
        table.add_column(column, justify="right")
    for r in secagg_rows:
        table.add_row(
            str(r["clients"]), str(r["ring_bits"]), str(r["dropped"]), str(r["neighbours"]),
            f"{r['plain_latency_s']:.3f}", f"{r['secagg_latency_s']:.3f}",
            f"{r['secagg_client_max_s']:.3f}", f"{r['secagg_server_s']:.3f}",
            f"{r['latency_ratio']:.1f}", f"{r['total_work_ratio']:.1f}",
            f"{r['secagg_bytes_per_client'] / 1e6:.2f} ({r['plain_bytes_per_client'] / 1e6:.1f})",
        )  # fmt: skip
    console.print(table)

    with console.status("A real training round on the embedded data, plain and SecAgg…"):
        embedded = embedded_round(rounds=2 if args.quick else 3)
    console.print(
        f"Embedded data, {embedded['none']['silos']} silos: round {embedded['none']['round_seconds']:.2f} s "
        f"plain, {embedded['secagg']['round_seconds']:.2f} s with SecAgg "
        f"(protocol {embedded['secagg']['protocol_seconds']:.2f} s): {embedded['ratio']:.2f}×"
    )

    with console.status("CKKS…"):
        ckks_result = ckks(10, length)
    console.print(
        f"CKKS, 10 silos × {length:,}: {ckks_result['seconds_total']:.2f} s encrypt + aggregate + "
        f"decrypt ({ckks_result['latency_seconds']:.2f} s latency), "
        f"{ckks_result['bytes_per_client'] / 1e6:.1f} MB per silo "
        f"({ckks_result['expansion_vs_float32']:.1f}× float32), max error {ckks_result['max_abs_error']:.1e}"
    )
    with console.status("Paillier…"):
        paillier_result = paillier(50 if args.quick else 200)
    console.print(
        f"Paillier 2048-bit: {paillier_result['client_seconds_per_value'] * 1e3:.1f} ms per value "
        f"per client, {paillier_result['extrapolated_hours_per_client_1M']:.1f} h for 1 M"
    )
    with console.status("Item-inference attack…"):
        attack = item_inference(100 if args.quick else 200)
    console.print(
        f"Item inference on {attack['shoppers']} shoppers ({attack['mean_items_per_shopper']:.1f} "
        f"items each, catalogue {attack['catalogue']:,}): plain update {attack['none']:.3f}, "
        f"SecAgg masked input {attack['secagg']:.3f}, round sum {attack['secagg_sum']:.3f}, "
        f"chance {attack['chance']:.4f}"
    )

    headline = next(
        (
            r
            for r in secagg_rows
            if r["clients"] == 100 and r["ring_bits"] == 64 and not r["dropped"]
        ),
        None,
    )
    document = {
        "secagg_overhead_ratio_100x1M": headline["latency_ratio"] if headline else None,
        "secagg_total_work_ratio_100x1M": headline["total_work_ratio"] if headline else None,
        "ckks_seconds_10x1M": ckks_result["seconds_total"],
        "item_inference_accuracy": {
            k: attack[k] for k in ("none", "secagg", "secagg_sum", "chance")
        },
        "secagg": secagg_rows,
        "secagg_embedded_round": embedded,
        "ckks": ckks_result,
        "paillier": paillier_result,
        "item_inference": attack,
        "quick": args.quick,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "secure_aggregation.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    console.print(f"Wrote {path}")


if __name__ == "__main__":
    main()
