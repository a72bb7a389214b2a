"""How fast does the shopping guide answer at catalogue scale, and how much does the index miss?

1. A real model: federated MF on the embedded Online Retail data with `fedshop demo`'s settings
   (dim 64, FedNova, 30 rounds; `--rounds` to change), the federated method only, written as a run
   folder in the serving format (or `--base-run RUN` to use a finished one).
2. Catalogues of 100,000 and 1,000,000 items (`fedshop.serve.synthetic.enlarge_run`): the real items
   first, the rest drawn from a multivariate normal with the mean and full covariance of the real
   items' rows [item_embedding, item_bias, every silo's silo_item_bias], seed 0; names "synthetic
   item N", prices drawn from the real prices. Customers, their vectors and histories unchanged.
3. The index in this process, per catalogue: exact scoring, HNSW and IVF-Flat (inner product) on
   build time, size, single-query latency and recall@10 against exact scoring, for 500 random real
   customers, both on the shared scores alone and as served (bought items excluded, the storefront's
   offsets re-ranked on k + margin candidates; margins 0..300 at 1M). Exact scoring's latency from
   10,000 to 1,000,000 items says where `exact_below` belongs.
4. The service as a real process (`python -m fedshop serve RUN --port P` on 127.0.0.1), its start-up
   with the index built and with it loaded from the cache, its memory (RSS), and `GET
   /recommend?customer=<random real customer>&k=10` driven open-loop at a fixed arrival rate
   (benchmarks/load_generator.py: latency from each request's due time, so queueing counts): p50/p99
   at 200 requests/s, and the highest rate whose p99 stays ≤ 50 ms (doubling, then bisection; every
   step `--step-seconds` long). The generator's own cost: its CPU per request, and the latency of
   `GET /health` (no work) at the same rate.

    python benchmarks/serving.py --out benchmarks/out [--base-run RUN] [--quick]

Writes OUT/serving.json and prints a table. Timings depend on what else the machine runs: the JSON
records `uptime` before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import faiss
import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load as load_safetensors

from fedshop.models.spec import get_model
from fedshop.serve.index import (
    CatalogueIndex,
    IndexSettings,
    item_vectors,
    query_vectors,
    recall_at_k,
)
from fedshop.serve.model import ExactRanker, Query
from fedshop.serve.synthetic import enlarge_run

# load_generator.py is a sibling script, not a package module.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_generator import run_load

console = Console(width=130)
TARGET_P99_MS = 50.0


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def rss_mb(pid: int | None = None) -> dict:
    """Resident memory now and at its peak (VmRSS, VmHWM) of a process, in MB."""
    status = Path(f"/proc/{pid or 'self'}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {key: round(int(fields[key].split()[0]) / 1024, 1) for key in ("VmRSS", "VmHWM")}


# ---- the run folders -----------------------------------------------------------------------------


def train_base_run(out: Path, rounds: int) -> Path:
    from fedshop.config import load_config
    from fedshop.data.datasets import load_dataset
    from fedshop.experiment import run_experiment
    from fedshop.report.run_folder import run_folder, write_run

    config = load_config(
        overrides={
            "data.source": "embedded",
            "methods": ["federated"],
            "federated.rounds": rounds,
            "eval.eval_every": rounds,
        }
    )
    dataset = load_dataset(config.data, seed=config.seed)
    started = time.perf_counter()
    with run_folder(out, overwrite=True) as folder:
        write_run(folder, run_experiment(config, dataset))
    console.print(f"trained the base run in {time.perf_counter() - started:.0f} s: {out}")
    return out


def served_state(run: Path) -> dict:
    """What the server holds for a run: the shared tables, each silo's user tables, offsets and
    customers (read from the files, as the service reads them)."""
    serving = json.loads((run / "serving.json").read_text())
    models = run / "models" / "federated"
    shared = load_safetensors((models / "shared.safetensors").read_bytes())
    silos = {}
    for silo in serving["silos"]:
        stem = models / f"silo-{silo['slug']}"
        tables = load_safetensors(stem.with_suffix(".safetensors").read_bytes())
        with np.load(f"{stem}.customers.npz", allow_pickle=False) as customers:
            silos[silo["slug"]] = {"tables": tables, **{k: customers[k] for k in customers.files}}
    return {"serving": serving, "shared": shared, "silos": silos}


def customer_queries(state: dict, n: int, seed: int) -> dict:
    """`n` random real customers: their query vectors, bought items and storefront offsets."""
    spec = get_model(state["serving"]["model"])
    rows = [(slug, r) for slug, s in state["silos"].items() for r in range(len(s["customer_ids"]))]
    pick = np.random.default_rng(seed).choice(len(rows), min(n, len(rows)), replace=False)
    queries, exclude, offsets, ids = [], [], [], []
    vectors = {
        slug: query_vectors(spec, state["shared"], s["tables"])
        for slug, s in state["silos"].items()
    }
    for i in pick:
        slug, r = rows[i]
        silo = state["silos"][slug]
        queries.append(vectors[slug][r])
        exclude.append(
            silo["history_items"][silo["history_indptr"][r] : silo["history_indptr"][r + 1]]
        )
        bias = silo["tables"].get("silo_item_bias")
        offsets.append(None if bias is None else bias.float().numpy().reshape(-1))
        ids.append(str(silo["customer_ids"][r]))
    has_offsets = offsets[0] is not None
    return {
        "queries": np.stack(queries),
        "exclude": exclude,
        "offsets": np.stack(offsets) if has_offsets else None,
        "customer_ids": ids,
    }


# ---- the index in this process ---------------------------------------------------------------------


def latency_ms(index: CatalogueIndex, c: dict, served: bool) -> dict:
    times = []
    for i in range(len(c["queries"])):
        exclude = [c["exclude"][i]] if served else None
        offsets = c["offsets"][i] if served and c["offsets"] is not None else None
        started = time.perf_counter()
        index.search(c["queries"][i : i + 1], 10, exclude, offsets)
        times.append(time.perf_counter() - started)
    times = np.array(times) * 1000
    return {
        "p50": round(float(np.median(times)), 3),
        "p99": round(float(np.percentile(times, 99)), 3),
    }


def spread(top: np.ndarray) -> dict:
    """Distinct items over all the queries' top lists, and the share of lists the commonest is in."""
    items, counts = np.unique(top[top >= 0], return_counts=True)
    return {
        "distinct_items": len(items),
        "commonest_item_share": round(float(counts.max() / len(top)), 3),
    }


def index_kinds(names: str) -> dict[str, IndexSettings]:
    """`ivf`, `hnsw`: the defaults (L2-reduced items); `…-inner-product`: faiss's IP metric."""
    kinds = {}
    for name in names.split(","):
        kind, _, metric = name.partition("-")
        kinds[name] = IndexSettings(kind=kind, metric=metric or "l2-reduction")
    return kinds


def compare_indexes(vectors: np.ndarray, c: dict, kinds: dict[str, IndexSettings]) -> dict:
    exact = CatalogueIndex.build(vectors, IndexSettings(kind="exact"))
    plain_truth = exact.search(c["queries"], 10).items
    served_truth = exact.search(c["queries"], 10, c["exclude"], c["offsets"]).items
    deep_truth = exact.search(c["queries"], 100, c["exclude"], c["offsets"]).items
    out = {
        "exact": {"latency_ms_served": latency_ms(exact, c, True), "recall_at_10": 1.0},
        # How hard the task is: a few items in everyone's top 10 are easy to find.
        "exact_top10": {"plain": spread(plain_truth), "served": spread(served_truth)},
    }
    for name, settings in kinds.items():
        gc.collect()
        before = rss_mb()["VmRSS"]
        index = CatalogueIndex.build(vectors, settings)
        grown = rss_mb()["VmRSS"] - before
        out[name] = {
            "settings": {k: v for k, v in vars(settings).items()},
            "build_seconds": round(index.build_seconds, 2),
            "index_mb": round(faiss.serialize_index(index.faiss_index).nbytes / 1e6, 1),
            "rss_growth_mb": round(grown, 1),
            "recall_at_10": round(recall_at_k(index, c["queries"], 10, plain_truth), 4),
            "recall_at_10_served": round(
                recall_at_k(index, c["queries"], 10, served_truth, c["exclude"], c["offsets"]), 4
            ),
            "recall_at_100_served": round(
                recall_at_k(index, c["queries"], 100, deep_truth, c["exclude"], c["offsets"]), 4
            ),
            "latency_ms": latency_ms(index, c, False),
            "latency_ms_served": latency_ms(index, c, True),
        }
        console.print(f"  {name}: {out[name]}")
        if name == IndexSettings().approximate and c["offsets"] is not None:
            # What the storefront's offsets cost: candidates beyond k re-ranked with them.
            out[name]["margins"] = sweep(
                index, settings, "margin", (0, 20, 100, 300), c, served_truth
            )
            knob = "ivf_nprobe" if index.kind == "ivf" else "hnsw_ef_search"
            values = (8, 16, 32, 48, 64, 128) if index.kind == "ivf" else (32, 64, 128, 256, 512)
            out[name]["search_settings"] = sweep(index, settings, knob, values, c, served_truth)
            index.settings = settings
        del index
    return out


def sweep(index, settings, knob: str, values, c: dict, served_truth) -> dict:
    """Served recall@10 and latency of one built index as one search-time setting varies."""
    out = {}
    for value in values:
        index.settings = IndexSettings(**{**vars(settings), knob: value})
        recall = recall_at_k(index, c["queries"], 10, served_truth, c["exclude"], c["offsets"])
        out[value] = {
            "recall_at_10_served": round(recall, 4),
            "latency_ms_served": latency_ms(index, c, True),
        }
        console.print(f"    {knob} {value}: {out[value]}")
    return out


def exact_latency_by_size(dim: int, sizes: list[int], seed: int = 0) -> dict:
    """The served exact path (`ExactRanker`: one matrix-vector product, offsets, top-k; one torch
    thread, as `fedshop serve` runs it) for one query: 10 of n items, 100 bought items excluded."""
    spec = get_model("mf-bpr")
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for n in sizes:
        shared = {
            "item_embedding": 0.2 * torch.randn(n, dim, generator=generator),
            "item_bias": torch.randn(n, generator=generator),
        }
        ranker = ExactRanker(spec, shared)
        times = []
        for _ in range(200):
            query = Query(
                {"user_embedding": torch.randn(1, dim, generator=generator)},
                torch.randn(n, generator=generator),
            )
            bought = torch.randint(0, n, (100,), generator=generator).numpy()
            started = time.perf_counter()
            ranker.top_k(query, 10, bought)
            times.append(time.perf_counter() - started)
        times = np.array(times) * 1000
        out[n] = {
            "p50": round(float(np.median(times)), 3),
            "p99": round(float(np.percentile(times, 99)), 3),
            "matrix_mb": round(n * (dim + 1) * 4 / 1e6, 1),
        }
        console.print(f"  exact at {n:,} items: {out[n]}")
        del shared, ranker
    return out


# ---- the service as a process ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m fedshop serve RUN --port P` as a child process."""

    def __init__(self, run: Path, extra: list[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "fedshop", "serve", str(run), "--port", str(self.port)]
        self.log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        started = time.perf_counter()
        self.process = subprocess.Popen(
            command + extra, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}; see {log}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    self.health = json.loads(response.read())
                    break
            except OSError:
                time.sleep(0.2)
            if time.perf_counter() - started > 3600:
                raise RuntimeError("the server did not answer within an hour")
        self.startup_seconds = time.perf_counter() - started
        self.index_line = next(
            (
                line.strip()
                for line in log.read_text(errors="replace").splitlines()[::-1]
                if line.startswith("Catalogue index:")
            ),
            "exact (no index line)",
        )

    def rss(self) -> dict:
        return rss_mb(self.process.pid)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def settle(url: str) -> None:
    """Wait until the server answers /health promptly again (its queue from an overload drained)."""
    for _ in range(100):
        started = time.perf_counter()
        with contextlib.suppress(OSError):
            urllib.request.urlopen(url + "/health", timeout=5).read()
        if time.perf_counter() - started < 0.02:
            return
        time.sleep(0.5)


def shown(ms: float | None) -> str:
    return "∞ (failures)" if ms is None else f"{ms:.2f}"


def drive(url: str, path_of, rate: float, seconds: float) -> dict:
    settle(url)
    result = run_load(url, rate, seconds, path_of=path_of)
    summary = result.summary()
    console.print(
        f"    {rate:7.1f} rps: p50 {shown(summary['p50_ms'])} ms  p99 {shown(summary['p99_ms'])} ms  "
        f"ok {summary['ok']}/{summary['requests']}  lag p99 {summary['send_lag_p99_ms']:.1f} ms"
    )
    return summary


def max_rate(url: str, path_of, seconds: float, start: float, limit_ms: float) -> dict:
    """The highest arrival rate whose p99 ≤ limit_ms with every request answered: doubling from
    `start` until it fails, then bisection to within 5%."""
    steps = []

    def passes(rate: float) -> bool:
        summary = drive(url, path_of, rate, seconds)
        steps.append(summary)
        p99 = summary["p99_ms"]
        return summary["ok"] == summary["requests"] and p99 is not None and p99 <= limit_ms

    good, bad, rate = 0.0, None, start
    while bad is None and rate <= 20_000:
        if passes(rate):
            good, rate = rate, rate * 2
        else:
            bad = rate
    while bad is not None and bad - good > 0.05 * max(good, 1.0):
        middle = round((good + bad) / 2, 1)
        if passes(middle):
            good = middle
        else:
            bad = middle
    return {"max_rps": good, "first_failing_rps": bad, "steps": steps}


def generator_alone(seconds: float) -> dict:
    """The generator against a responder that does no work (load_generator.py --fixed-responder,
    its own process): its latency floor and CPU per request at 200 and 2,000 requests/s."""
    port = free_port()
    script = Path(__file__).resolve().parent / "load_generator.py"
    responder = subprocess.Popen([sys.executable, str(script), "--fixed-responder", str(port)])
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.1)
        console.print("generator alone, against a responder that does no work:")
        return {f"{rate}rps": drive(url, lambda i: "/", rate, seconds) for rate in (200, 2000)}
    finally:
        responder.terminate()
        responder.wait()


def serve_and_load(run: Path, out: Path, c: dict, args, label: str) -> dict:
    cache = run / "index"
    if cache.exists():
        for file in cache.glob("*.faiss"):
            file.unlink()
    log = out / f"server-{label}.log"
    console.print(f"[bold]{label}[/]: starting the service (index built)…")
    cold = Server(run, args.serve_args, log)
    cold_rss = cold.rss()
    cold.stop()
    console.print(f"  start-up {cold.startup_seconds:.1f} s; again with the cached index…")
    server = Server(run, args.serve_args, log)
    result = {
        "health": server.health,
        "index_built": cold.index_line,
        "index_cached": server.index_line,
        "startup_seconds_index_built": round(cold.startup_seconds, 2),
        "startup_seconds_index_cached": round(server.startup_seconds, 2),
        "index_cache_files": sorted(p.name for p in cache.glob("*.faiss"))
        if cache.exists()
        else [],
        "rss_mb_after_start": server.rss(),
        "rss_mb_after_start_index_built": cold_rss,
    }
    try:
        customers = c["customer_ids"]
        rng = np.random.default_rng(7)
        order = rng.integers(0, len(customers), 1_000_000)

        def recommend(i: int) -> str:
            return f"/recommend?customer={customers[order[i]]}&k=10"

        drive(server.url, recommend, 20, 2)  # warm-up
        console.print("  generator floor: GET /health at 200 rps")
        result["health_200rps"] = drive(server.url, lambda i: "/health", 200, args.step_seconds)
        console.print("  GET /recommend at 200 rps")
        result["recommend_200rps"] = drive(server.url, recommend, 200, args.step_seconds)
        console.print(f"  highest rate with p99 ≤ {TARGET_P99_MS:.0f} ms")
        result["max_rate"] = max_rate(
            server.url, recommend, args.step_seconds, args.start_rate, TARGET_P99_MS
        )
        result["rss_mb_after_load"] = server.rss()
    finally:
        server.stop()
    return result


# ---- the whole benchmark ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--base-run", type=Path, help="a finished run folder (serving format)")
    parser.add_argument("--rounds", type=int, default=30, help="training rounds of the base run")
    parser.add_argument("--sizes", default="100000,1000000", help="catalogue sizes")
    parser.add_argument("--step-seconds", type=float, default=10.0)
    parser.add_argument("--start-rate", type=float, default=100.0)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--serve-args", default="", help="extra arguments of fedshop serve (e.g. '--index hnsw')"
    )
    parser.add_argument(
        "--kinds",
        default="ivf,hnsw,ivf-inner-product,hnsw-inner-product",
        help="indexes to compare in-process (kind, or kind-inner-product for faiss's IP metric)",
    )
    parser.add_argument("--skip-index-comparison", action="store_true")
    parser.add_argument("--quick", action="store_true", help="20,000 items, 3 s steps: a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as `fedshop serve` runs: one core per request
    args.serve_args = args.serve_args.split()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        sizes, args.step_seconds, args.rounds = [20_000], 3.0, min(args.rounds, 2)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"uptime_before": uptime(), "cpus": os.cpu_count(), "faiss": faiss.__version__}

    report["generator_alone"] = generator_alone(args.step_seconds)
    base = args.base_run or train_base_run(out / "runs" / "base", args.rounds)
    report["base_run"] = str(base)
    report["model"] = json.loads((base / "serving.json").read_text())["model"]
    report["catalogues"] = {}
    for n in sizes:
        run = out / "runs" / f"items-{n}"
        started = time.perf_counter()
        enlarge_run(base, run, n, seed=args.seed)
        console.print(f"[bold]{n:,} items[/]: written in {time.perf_counter() - started:.0f} s")
        state = served_state(run)
        c = customer_queries(state, args.queries, args.seed)
        entry: dict = {
            "run": str(run),
            "synthetic": json.loads((run / "synthetic.json").read_text()),
        }
        if not args.skip_index_comparison:
            spec = get_model(state["serving"]["model"])
            vectors = item_vectors(spec, state["shared"])
            entry["indexes"] = compare_indexes(vectors, c, index_kinds(args.kinds))
            del vectors
        del state
        gc.collect()
        entry["service"] = serve_and_load(run, out, c, args, f"{n}-items")
        report["catalogues"][n] = entry
    if not args.skip_index_comparison:
        sizes_exact = [10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000]
        report["exact_latency_by_size"] = exact_latency_by_size(64, sizes_exact)
    report["uptime_after"] = uptime()
    report.update(headline(report, sizes))
    (out / "serving.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_table(report)
    console.print(f"wrote {out / 'serving.json'}")


def headline(report: dict, sizes: list[int]) -> dict:
    """The keys the issue asks for, from the catalogues measured."""
    keys = {}
    names = {100_000: "100k", 1_000_000: "1m"}
    for n in sizes:
        service = report["catalogues"][n]["service"]
        name = names.get(n, str(n))
        at_200 = service["recommend_200rps"]
        keys[f"p50_ms_200rps_{name}"] = at_200["p50_ms"]
        keys[f"p99_ms_200rps_{name}"] = at_200["p99_ms"]
        keys[f"max_rps_p99_50ms_{name}"] = service["max_rate"]["max_rps"]
        keys[f"server_rss_mb_{name}"] = service["rss_mb_after_load"]["VmHWM"]
        keys[f"startup_seconds_index_built_{name}"] = service["startup_seconds_index_built"]
        keys[f"startup_seconds_index_cached_{name}"] = service["startup_seconds_index_cached"]
        keys[f"health_p99_ms_200rps_{name}"] = service["health_200rps"]["p99_ms"]
        keys[f"generator_cpu_ms_per_request_{name}"] = at_200["generator_cpu_ms_per_request"]
    keys["generator_alone_p99_ms_200rps"] = report["generator_alone"]["200rps"]["p99_ms"]
    first = names.get(sizes[0], str(sizes[0]))
    keys["p50_ms"], keys["p99_ms"] = keys[f"p50_ms_200rps_{first}"], keys[f"p99_ms_200rps_{first}"]
    keys["max_rps_p99_50ms"] = keys[f"max_rps_p99_50ms_{first}"]
    largest = report["catalogues"][sizes[-1]]
    if "indexes" in largest:
        served = largest["service"]["index_built"].removeprefix("Catalogue index: ").split()[0]
        kind = served if served in largest["indexes"] else IndexSettings().approximate
        chosen = largest["indexes"][kind]
        keys["ann_index_kind"] = kind
        keys["ann_recall_at_10"] = chosen["recall_at_10"]
        keys["ann_recall_at_10_served"] = chosen["recall_at_10_served"]
        keys["ann_recall_at_100_served"] = chosen["recall_at_100_served"]
        keys["ann_recall_catalogue_items"] = sizes[-1]
        keys["index_build_seconds"] = chosen["build_seconds"]
    return keys


def print_table(report: dict) -> None:
    table = Table(title="GET /recommend, open loop, 127.0.0.1")
    for column in ("items", "p50 @200 rps", "p99 @200 rps", "max rps (p99≤50ms)", "RSS peak",
                   "start (built)", "start (cached)", "/health p99 @200"):  # fmt: skip
        table.add_column(column, justify="right")
    for n, entry in report["catalogues"].items():
        s = entry["service"]
        table.add_row(
            f"{int(n):,}",
            f"{shown(s['recommend_200rps']['p50_ms'])} ms",
            f"{shown(s['recommend_200rps']['p99_ms'])} ms",
            f"{s['max_rate']['max_rps']:.0f}",
            f"{s['rss_mb_after_load']['VmHWM']:.0f} MB",
            f"{s['startup_seconds_index_built']:.1f} s",
            f"{s['startup_seconds_index_cached']:.1f} s",
            f"{shown(s['health_200rps']['p99_ms'])} ms",
        )
    console.print(table)
    indexes = Table(title="the index in-process: 10 of n for real customers")
    columns = (
        "items",
        "kind",
        "build",
        "size",
        "recall@10",
        "served @10",
        "served @100",
        "p50",
        "p99",
    )
    for column in columns:
        indexes.add_column(column, justify="right")
    for n, entry in report["catalogues"].items():
        for kind, row in entry.get("indexes", {}).items():
            if "recall_at_10" not in row:
                continue
            indexes.add_row(
                f"{int(n):,}",
                kind,
                f"{row.get('build_seconds', 0):.1f} s",
                f"{row.get('index_mb', 0):.0f} MB",
                f"{row['recall_at_10']:.4f}",
                f"{row.get('recall_at_10_served', 1.0):.4f}",
                f"{row.get('recall_at_100_served', 1.0):.4f}",
                f"{row['latency_ms_served']['p50']:.2f} ms",
                f"{row['latency_ms_served']['p99']:.2f} ms",
            )
    console.print(indexes)
    for n, entry in report["catalogues"].items():
        if "indexes" in entry:
            console.print(
                f"{int(n):,} items, exact top 10s of the customers: {entry['indexes']['exact_top10']}"
            )
    console.print(f"machine: {report['uptime_before']} … {report['uptime_after']}")


if __name__ == "__main__":
    main()
