"""The Flower half of the FedShop-vs-Flower speed benchmark: the same FedAvg MF workload on Flower.

Flower's simulation engine (Message API: ``ServerApp``/``ClientApp``, ``flwr.serverapp.strategy.FedAvg``,
``ArrayRecord``/``MetricRecord``, ``Context.state``, ``flwr.simulation.run_simulation`` on the Ray backend)
runs one BPR-MF FedAvg workload on MovieLens-1M users; a plain sequential loop over ``client_step`` does
the same maths and must give the same item table, which shows that the Flower run did the real work.

    pip install -e ".[flower]"
    python benchmarks/flower_side.py [--data-dir DIR] [--rounds 5] [--clients 100] [--verbose]

``DIR`` holds ``movielens-1m/ratings_no_timestamp.csv`` (default: ``shared/data`` of the checkout, then
``/work/shared/data``). The module is importable (``vs_flower.py`` uses it): ``make_workload``,
``initial_parameters``, ``draw_negatives``, ``client_step``, ``run_reference`` and ``run_flower``.

The workload, exactly:

* items: every rated MovieID of MovieLens-1M, mapped in sorted order to ``0..n_items-1`` (3,706);
* clients: ``n_clients`` users picked by ``np.random.default_rng(seed).choice(sorted_user_ids, n_clients,
  replace=False)``, in that order; client ``c``'s positives are its rated items (sorted, unique, int64);
* model: shared ``item_embedding`` (n_items x dim, float32) and ``item_bias`` (n_items); a private user
  embedding (dim) per client that never leaves it (Flower: kept in ``context.state``);
* init: ``g = torch.Generator().manual_seed(seed)``; ``item_embedding = 0.1 * randn(n_items, dim, g)``, then
  ``users = 0.1 * randn(n_clients, dim, g)`` (row ``c`` is client ``c``'s); ``item_bias = zeros``;
* round ``r`` (0-based; Flower's ``server-round`` is ``r + 1``), client ``c``: negatives =
  ``np.random.default_rng([seed, r, c]).integers(0, n_items, size=len(positives))`` (uniform, may hit a
  positive); one plain SGD step with learning rate ``lr`` on the mean BPR loss
  ``softplus(-(s_pos - s_neg))``, ``s = u . v_i + b_i``, on all three tensors (``client_step``);
* FedAvg: new item tables = mean of the clients' returned tables weighted by their number of positives.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Flower sends usage telemetry to its server unless told not to; this machine has no network, and the
# sends would only add noise (and time) to the measurement. Must be set before flwr is imported.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# Ray: no usage stats prompt/reporting, no per-worker log de-duplication chatter.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

RATINGS_FILE = Path("movielens-1m") / "ratings_no_timestamp.csv"

# Backend settings for a 2-core machine: Ray is told it has 2 CPUs and each ClientApp actor takes one, so
# two actors run client updates in parallel (Flower sizes its actor pool as CPUs // num_cpus per client).
DEFAULT_BACKEND_CONFIG: dict[str, Any] = {
    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    "init_args": {
        "num_cpus": 2,
        "num_gpus": 0,
        "include_dashboard": False,
        "logging_level": logging.ERROR,
        "log_to_driver": False,
    },
}


@dataclass(frozen=True)
class Workload:
    n_items: int
    dim: int
    client_items: list[np.ndarray]  # each client's positive item indices (int64, unique, sorted)
    learning_rate: float
    seed: int


def make_workload(
    data_dir: Path, n_clients: int = 100, dim: int = 54, learning_rate: float = 0.05, seed: int = 0
) -> Workload:
    """MovieLens-1M users as clients; items are all rated movies (3,706)."""
    ratings = pd.read_csv(
        Path(data_dir) / RATINGS_FILE,
        usecols=["UserID", "MovieID"],
        dtype={"UserID": np.int64, "MovieID": np.int64},
    )
    movie_ids = np.unique(ratings["MovieID"].to_numpy())  # sorted
    item_index = np.searchsorted(movie_ids, ratings["MovieID"].to_numpy())
    user_ids = np.unique(ratings["UserID"].to_numpy())  # sorted
    rng = np.random.default_rng(seed)
    chosen = rng.choice(user_ids, size=n_clients, replace=False)
    users = ratings["UserID"].to_numpy()
    client_items = [np.unique(item_index[users == u]).astype(np.int64) for u in chosen]
    return Workload(
        n_items=len(movie_ids),
        dim=dim,
        client_items=client_items,
        learning_rate=learning_rate,
        seed=seed,
    )


def initial_parameters(workload: Workload) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(item_embedding, item_bias, user_embeddings[n_clients, dim]), all float32."""
    g = torch.Generator().manual_seed(workload.seed)
    item_embedding = 0.1 * torch.randn(workload.n_items, workload.dim, generator=g)
    user_embeddings = 0.1 * torch.randn(len(workload.client_items), workload.dim, generator=g)
    item_bias = torch.zeros(workload.n_items)
    return item_embedding, item_bias, user_embeddings


def draw_negatives(
    seed: int, round_idx: int, client: int, n_items: int, n_positives: int
) -> np.ndarray:
    """One uniform negative per positive; ``round_idx`` is 0-based."""
    return np.random.default_rng([seed, round_idx, client]).integers(0, n_items, size=n_positives)


def client_step(
    item_embedding: torch.Tensor,
    item_bias: torch.Tensor,
    user_embedding: torch.Tensor,
    positives: np.ndarray | torch.Tensor,
    negatives: np.ndarray | torch.Tensor,
    lr: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One local SGD step on the mean BPR loss; returns new (item_embedding, item_bias, user_embedding).

    The inputs are not modified; the outputs are new tensors without autograd history.
    """
    V = item_embedding.detach().clone().requires_grad_(True)
    b = item_bias.detach().clone().requires_grad_(True)
    u = user_embedding.detach().clone().requires_grad_(True)
    pos = torch.as_tensor(positives, dtype=torch.long)
    neg = torch.as_tensor(negatives, dtype=torch.long)
    s_pos = V[pos] @ u + b[pos]
    s_neg = V[neg] @ u + b[neg]
    loss = F.softplus(-(s_pos - s_neg)).mean()
    gV, gb, gu = torch.autograd.grad(loss, (V, b, u))
    with torch.no_grad():
        return V - lr * gV, b - lr * gb, u - lr * gu


def run_reference(workload: Workload, rounds: int = 5) -> dict[str, np.ndarray]:
    """Plain sequential FedAvg over ``client_step``: the maths the Flower run must reproduce."""
    item_embedding, item_bias, users = initial_parameters(workload)
    users = [users[c].clone() for c in range(len(workload.client_items))]
    weights = np.array([len(p) for p in workload.client_items], dtype=np.float64)
    weights /= weights.sum()
    for r in range(rounds):
        acc_v = np.zeros(item_embedding.shape, dtype=np.float64)
        acc_b = np.zeros(item_bias.shape, dtype=np.float64)
        for c, positives in enumerate(workload.client_items):
            negatives = draw_negatives(workload.seed, r, c, workload.n_items, len(positives))
            v, b, users[c] = client_step(
                item_embedding, item_bias, users[c], positives, negatives, workload.learning_rate
            )
            acc_v += weights[c] * v.numpy()
            acc_b += weights[c] * b.numpy()
        item_embedding = torch.from_numpy(acc_v.astype(np.float32))
        item_bias = torch.from_numpy(acc_b.astype(np.float32))
    return {
        "final_item_embedding": item_embedding.numpy(),
        "final_item_bias": item_bias.numpy(),
        "final_user_embeddings": torch.stack(users).numpy(),
    }


# ---------------------------------------------------------------------------------------------------
# Flower side
# ---------------------------------------------------------------------------------------------------

# Per-process cache of client data files. The ClientApp reaches the Ray actors pickled (cloudpickle)
# with every message, so it carries only the path of an .npz the driver wrote; each actor process reads
# the file once (as a Flower client would load its partition) and keeps it here.
_CLIENT_DATA: dict[str, dict[str, np.ndarray]] = {}


def _client_data(path: str) -> dict[str, np.ndarray]:
    data = _CLIENT_DATA.get(path)
    if data is None:
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
        _CLIENT_DATA[path] = data
    return data


def _write_client_data(workload: Workload, path: Path) -> None:
    _, _, users = initial_parameters(workload)
    items = workload.client_items
    offsets = np.cumsum([0] + [len(p) for p in items]).astype(np.int64)
    np.savez(
        path,
        items=np.concatenate(items).astype(np.int64),
        offsets=offsets,
        # Each client's starting user embedding, drawn where the reference draws it so both sides start
        # alike; after the first round it lives only in that client's context.state.
        init_users=users.numpy(),
        n_items=np.int64(workload.n_items),
        seed=np.int64(workload.seed),
        lr=np.float64(workload.learning_rate),
    )


def _make_client_app(data_path: str):
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        t_start = time.time()  # wall clock, comparable with the driver's (same machine)
        data = _client_data(data_path)
        c = int(context.node_config["partition-id"])
        positives = data["items"][data["offsets"][c] : data["offsets"][c + 1]]
        server_round = int(msg.content["config"]["server-round"])  # 1-based
        arrays = msg.content["arrays"]
        item_embedding = torch.from_numpy(arrays["item_embedding"].numpy())
        item_bias = torch.from_numpy(arrays["item_bias"].numpy())
        if "user" in context.state:
            user = torch.from_numpy(context.state["user"]["u"].numpy())
            rounds_seen = int(context.state["seen"]["rounds"])
        else:
            user = torch.from_numpy(data["init_users"][c].copy())
            rounds_seen = 0
        negatives = draw_negatives(
            int(data["seed"]), server_round - 1, c, int(data["n_items"]), len(positives)
        )
        v, b, u = client_step(
            item_embedding, item_bias, user, positives, negatives, float(data["lr"])
        )
        context.state["user"] = ArrayRecord({"u": u})
        context.state["seen"] = MetricRecord({"rounds": rounds_seen + 1})
        content = RecordDict(
            {
                "arrays": ArrayRecord({"item_embedding": v, "item_bias": b}),
                # num-examples is FedAvg's weight; rounds-seen counts the rounds kept in context.state
                # (equals server-round exactly when the state persisted).
                "metrics": MetricRecord(
                    {
                        "num-examples": len(positives),
                        "rounds-seen": rounds_seen + 1,
                        "client": c,
                        "t-start": t_start,
                    }
                ),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


def _make_server_app(workload: Workload, rounds: int, out: dict[str, Any]):
    from flwr.app import ArrayRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    n = len(workload.client_items)

    class TimedFedAvg(FedAvg):
        """FedAvg that stamps each round: configure_train (send) to the end of aggregate_train."""

        def configure_train(self, server_round, arrays, config, grid):
            out["round_start"].append(time.perf_counter())
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            ok = [m for m in replies if not m.has_error()]
            out["replies"].append(len(ok))
            out["state_ok"].append(
                all(int(m.content["metrics"]["rounds-seen"]) == server_round for m in ok)
            )
            out["clients_seen"].append(sorted(int(m.content["metrics"]["client"]) for m in ok))
            out["first_client_start"].append(
                min(float(m.content["metrics"]["t-start"]) for m in ok)
            )
            result = super().aggregate_train(server_round, replies)
            out["round_end"].append(time.perf_counter())
            return result

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        item_embedding, item_bias, _ = initial_parameters(workload)
        strategy = TimedFedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,  # no federated evaluation
            min_train_nodes=n,
            min_evaluate_nodes=0,
            min_available_nodes=n,
        )
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord({"item_embedding": item_embedding, "item_bias": item_bias}),
            num_rounds=rounds,
        )
        out["final_item_embedding"] = result.arrays["item_embedding"].numpy()
        out["final_item_bias"] = result.arrays["item_bias"].numpy()

    return app


def _importable_self():
    """This module under an importable name, so that Ray's workers can unpickle what refers to it.

    The caller may have run this file as __main__ or loaded it by path under any name; the apps are built
    from ``flower_side`` imported from this folder (which Flower passes to Ray's workers on PYTHONPATH).
    """
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("flower_side")


def _quiet_logs(verbose: bool) -> None:
    """Process-wide: Flower's INFO lines (one per round and a results dump) and its WARNING that
    run_simulation is deprecated in favour of `flwr run` go, as do Ray's log and its FutureWarning."""
    level = logging.INFO if verbose else logging.ERROR
    logging.getLogger("flwr").setLevel(level)
    logging.getLogger("ray").setLevel(level)
    if not verbose:
        warnings.filterwarnings("ignore", module="ray")


def run_flower(
    workload: Workload,
    rounds: int = 5,
    backend_config: dict[str, Any] | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run the workload on Flower's simulation engine (one SuperNode per client, all train each round).

    Wall-clock seconds, measured in the driver process:

    * ``round_seconds[r]``: server side, from the strategy's ``configure_train`` (messages out) to the end of
      its ``aggregate_train`` (100 ClientApp runs, replies in, FedAvg). Flower starts the ServerApp thread and
      the Ray backend concurrently, so round 1 also waits for Ray to come up; it is
      ``first_round_seconds``.
    * ``startup_seconds``: from the call until the first ClientApp begins its train function (Ray start,
      actor pool, actors unpickling the app and importing flwr/torch); the round-1 part after it is
      ``first_round_after_startup_seconds``.
    * ``teardown_seconds``: after the last aggregation until ``run_simulation`` returns (Ray shutdown);
      ``total_seconds``: the whole call.
    """
    import flwr
    from flwr.simulation import run_simulation

    mod = _importable_self()
    backend_config = dict(DEFAULT_BACKEND_CONFIG if backend_config is None else backend_config)
    out: dict[str, Any] = {
        "round_start": [],
        "round_end": [],
        "replies": [],
        "state_ok": [],
        "clients_seen": [],
        "first_client_start": [],
    }
    n = len(workload.client_items)
    _quiet_logs(verbose)
    with tempfile.TemporaryDirectory(prefix="flower_side_") as tmp:
        data_path = Path(tmp) / "clients.npz"
        t0 = time.perf_counter()
        t0_wall = time.time()
        mod._write_client_data(workload, data_path)
        client_app = mod._make_client_app(str(data_path))
        server_app = mod._make_server_app(workload, rounds, out)
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=n,
            backend_name="ray",
            # run_simulation rewrites its backend_config in place; hand it a copy.
            backend_config={
                k: dict(v) if isinstance(v, dict) else v for k, v in backend_config.items()
            },
            verbose_logging=verbose,
        )
        t_end = time.perf_counter()
    _quiet_logs(verbose)  # run_simulation resets the flwr console handler
    if "final_item_embedding" not in out or len(out["round_end"]) != rounds:
        raise RuntimeError(f"Flower simulation did not complete {rounds} rounds: {out['replies']}")
    if out["replies"] != [n] * rounds:
        raise RuntimeError(f"expected {n} replies per round, got {out['replies']}")
    round_seconds = [e - s for s, e in zip(out["round_start"], out["round_end"], strict=True)]
    startup = out["first_client_start"][0] - t0_wall
    return {
        "round_seconds": round_seconds,
        "first_round_seconds": round_seconds[0],
        "later_round_mean_seconds": float(np.mean(round_seconds[1:])) if rounds > 1 else None,
        "startup_seconds": startup,
        "first_round_after_startup_seconds": out["round_end"][0] - t0 - startup,
        "teardown_seconds": t_end - out["round_end"][-1],
        "total_seconds": t_end - t0,
        "flwr_version": flwr.__version__,
        "backend": "ray",
        "backend_config": backend_config,
        "num_supernodes": n,
        "rounds": rounds,
        # every client replied in every round with its own context.state carried over
        "state_persisted": all(out["state_ok"]),
        "all_clients_every_round": all(s == list(range(n)) for s in out["clients_seen"]),
        "final_item_embedding": out["final_item_embedding"],
        "final_item_bias": out["final_item_bias"],
    }


def _default_data_dir() -> Path:
    for candidate in (
        Path(__file__).resolve().parents[1] / "shared" / "data",
        Path("/work/shared/data"),
    ):
        if (candidate / RATINGS_FILE).exists():
            return candidate
    return Path("shared/data")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=0.05,
        help="the benchmark's is 0.05; a larger one makes the "
        "updates, and so the check, larger (they are ~1e-5 at 0.05)",
    )
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's INFO logs")
    args = parser.parse_args(argv)

    mod = _importable_self()  # the same functions Ray's workers will import
    workload = mod.make_workload(
        args.data_dir or _default_data_dir(),
        n_clients=args.clients,
        learning_rate=args.learning_rate,
    )
    print(
        f"workload: {len(workload.client_items)} clients, {workload.n_items} items, dim {workload.dim}, "
        f"{sum(len(p) for p in workload.client_items)} positives, lr {workload.learning_rate}"
    )
    t = time.perf_counter()
    ref = mod.run_reference(workload, args.rounds)
    print(f"sequential reference: {time.perf_counter() - t:.2f} s for {args.rounds} rounds")

    res = mod.run_flower(workload, args.rounds, verbose=args.verbose)
    print(
        f"flwr {res['flwr_version']}, backend ray, client_resources {res['backend_config']['client_resources']}"
    )
    print(f"startup (to first ClientApp call)  {res['startup_seconds']:6.2f} s")
    for r, s in enumerate(res["round_seconds"], 1):
        extra = (
            f"  ({res['first_round_after_startup_seconds']:.2f} s after startup)" if r == 1 else ""
        )
        print(f"round {r:2d}                           {s:6.2f} s{extra}")
    if res["later_round_mean_seconds"] is not None:
        print(
            f"mean of rounds 2..{args.rounds}                 {res['later_round_mean_seconds']:6.2f} s"
        )
    print(f"teardown                           {res['teardown_seconds']:6.2f} s")
    print(f"total run_flower                   {res['total_seconds']:6.2f} s")

    init_v = mod.initial_parameters(workload)[0].numpy()
    diff_v = float(np.abs(res["final_item_embedding"] - ref["final_item_embedding"]).max())
    diff_b = float(np.abs(res["final_item_bias"] - ref["final_item_bias"]).max())
    moved_v = float(np.abs(ref["final_item_embedding"] - init_v).max())
    moved_b = float(np.abs(ref["final_item_bias"]).max())
    print(
        f"state kept in context.state: {res['state_persisted']}; "
        f"all {len(workload.client_items)} clients every round: {res['all_clients_every_round']}"
    )
    print(
        f"max |flower - reference|: item_embedding {diff_v:.2e} (training moved it by up to {moved_v:.2e}), "
        f"item_bias {diff_b:.2e} (moved up to {moved_b:.2e})"
    )
    ok = (
        diff_v <= 1e-5
        and diff_b <= 1e-5
        and res["state_persisted"]
        and res["all_clients_every_round"]
    )
    print("MATCH (within 1e-5)" if ok else "MISMATCH")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
