"""Cross-device federation: every shopper is a client, simulated many clients at a time.

A shopper's device holds their own interactions and their private user vectors; each round the server
samples some devices, each trains locally from the current shared model (`fl/local_round.py`) and
returns only the change to the shared parameters, and the server takes the example-weighted mean
(FedAvg) and steps its optimiser. The round itself is computed by `fl/vectorised.py`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp
import torch

from fedshop.config import RunConfig
from fedshop.data.interactions import RecDataset, SiloData
from fedshop.errors import FedShopError
from fedshop.eval.metrics import MetricSums, evaluate, summarise
from fedshop.fl.local_round import LocalTraining, draw_round, poisson_sample
from fedshop.fl.server_opt import ServerOptimizer, make_server_optimizer
from fedshop.fl.simulator import RoundRecord, evaluated_after
from fedshop.fl.stages import Aggregate, mean_of
from fedshop.fl.vectorised import vectorised_round, vectorised_sum
from fedshop.models.spec import ModelSpec, Params, get_model, score_all
from fedshop.privacy.dp import PrivacyGuard
from fedshop.privacy.stages import add_gaussian_noise, fixed_denominator
from fedshop.secure.protocol import ProtectionError
from fedshop.secure.stage import ProtectedSum, make_protection
from fedshop.seeding import torch_generator


@dataclass
class CrossDeviceRun:
    spec: ModelSpec
    shared: Params
    # Every shopper's private rows. In a deployment each row lives on its own device; the simulator
    # keeps them in one table for speed, but only the owning client's computation ever reads a row.
    user_tables: Params
    dataset: RecDataset
    history: list[RoundRecord] = field(default_factory=list)
    protection: ProtectedSum | None = None  # the secure sum, when updates are protected
    # Sliced once: the run is evaluated after many rounds.
    silos: list[SiloData] = field(init=False)

    def __post_init__(self) -> None:
        self.silos = self.dataset.silos()

    def scores(self, users: torch.Tensor) -> torch.Tensor:
        device = self.shared[self.spec.item_tables[0]].device
        return score_all(self.spec, self.shared, self.user_tables, users.to(device)).cpu()

    def evaluate(self, split: str = "test") -> dict[str, MetricSums]:
        """Per-silo metrics (for shoppers, a silo is just the reporting group they belong to)."""
        out = {}
        for silo in self.silos:
            users = torch.from_numpy(silo.users)
            out[silo.name] = evaluate(
                lambda rows, users=users: self.scores(users[rows]),
                silo.train,
                silo.heldout(split),
                negatives=silo.eval_negatives,
            )
        return out


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise FedShopError('[federated] device = "cuda" but torch sees no CUDA device')
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def eligible_clients(train: sp.csr_matrix) -> torch.Tensor:
    """Shoppers with at least one training interaction: the others have nothing to train on."""
    return torch.from_numpy(np.flatnonzero(np.diff(train.indptr) > 0).astype(np.int64))


def run_cross_device(
    dataset: RecDataset,
    config: RunConfig,
    on_round: Callable[[RoundRecord], None] | None = None,
    guard: PrivacyGuard | None = None,
) -> CrossDeviceRun:
    """Train; with a `guard` (user-level DP) every round is DP-FedAvg: Poisson-sampled shoppers,
    each update clipped, Gaussian noise on the sum, the expected count as denominator, and the
    round written to the ledger before its result reaches the server optimiser.

    With secure aggregation every sampled shopper sends a masked dense update and the server
    learns only the round's sum; under DP the server adds the noise to that sum after unmasking
    (the trusted-aggregator placement: the server sees the exact sum, never one shopper's update)."""
    fed = config.federated
    spec = get_model(config.model.name)
    model = config.model
    device = resolve_device(fed.device)
    # Initialised on the CPU (the same numbers whatever the device), then moved.
    shared = spec.init_shared(
        dataset.n_items, model, torch_generator(config.seed, "shared", "init")
    )
    user_tables = spec.init_users(
        dataset.n_users, model, torch_generator(config.seed, "devices", "users")
    )
    shared = {k: v.to(device) for k, v in shared.items()}
    user_tables = {k: v.to(device) for k, v in user_tables.items()}
    run = CrossDeviceRun(spec, shared, user_tables, dataset)
    protection = make_protection(config.protection)
    if protection is not None:
        run.protection = ProtectedSum(protection, config.protection.bound)
    optimizer: ServerOptimizer = make_server_optimizer(fed)
    pool = eligible_clients(dataset.train)
    per_round = len(pool) if fed.clients_per_round <= 0 else min(fed.clients_per_round, len(pool))
    sampling = torch_generator(config.seed, "server", "sampling")
    noise = torch_generator(config.seed, "server", "noise")
    training = LocalTraining(
        fed.local_epochs, fed.client_learning_rate, config.train.l2, config.train.negatives
    )
    for round_number in range(1, fed.rounds + 1):
        started = time.perf_counter()
        if guard is not None:
            clients = poisson_sample(pool, guard.plan.sampling_rate, sampling)
        elif per_round == len(pool):
            clients = pool
        else:
            clients = torch.sort(pool[torch.randperm(len(pool), generator=sampling)[:per_round]])[0]
        batch = draw_round(
            dataset.train, clients, training.epochs, training.negatives,
            torch_generator(config.seed, "devices", "round", round_number),
        )  # fmt: skip
        clip = guard.plan.clip if guard is not None else None
        if run.protection is not None and len(clients) == 1:
            raise ProtectionError(
                f"round {round_number} sampled a single shopper: secure aggregation cannot hide "
                "a lone update; raise [federated] clients_per_round or the sampling rate"
            )
        summation = run.protection if len(clients) > 0 else None
        total, new_users = vectorised_sum(
            spec, run.shared, run.user_tables, batch, training, clip=clip, summation=summation
        )
        for k, v in new_users.items():
            run.user_tables[k][clients] = v
        epsilon = None
        if guard is not None:
            plan = guard.plan
            # Write-ahead: the ledger holds this round's ε before the noisy sum exists.
            epsilon = guard.release(round_number, plan.round_event)
            total = add_gaussian_noise(plan.noise_std, noise)(_on_cpu(total))
            total = fixed_denominator(plan.sampling_rate * len(pool))(total)
        total = replace(total, tensors={k: v.to(device) for k, v in total.tensors.items()})
        if total.weight > 0:
            run.shared = optimizer.step(run.shared, mean_of(total))
        seconds = time.perf_counter() - started
        metrics = None
        if evaluated_after(config, round_number):
            metrics = summarise(run.evaluate(config.eval.split))
        cost = run.protection.last_round() if summation is not None else None
        record = RoundRecord(round_number, clients.tolist(), seconds, metrics, epsilon, cost)
        run.history.append(record)
        if on_round is not None:
            on_round(record)
    personalise(run, config)
    return run


def _on_cpu(aggregate: Aggregate) -> Aggregate:
    # The noise is drawn on the CPU from the run's generator: the same numbers on any device.
    return replace(aggregate, tensors={k: v.cpu() for k, v in aggregate.tensors.items()})


def personalise(run: CrossDeviceRun, config: RunConfig) -> None:
    """Every shopper refits their own vectors against the final shared model; nothing is sent."""
    epochs = config.federated.personalise_epochs
    if epochs <= 0:
        return
    pool = eligible_clients(run.dataset.train)
    training = LocalTraining(
        epochs, config.federated.client_learning_rate, config.train.l2, config.train.negatives,
        update_shared=False,
    )  # fmt: skip
    batch = draw_round(
        run.dataset.train, pool, epochs, training.negatives,
        torch_generator(config.seed, "devices", "personalise"),
    )  # fmt: skip
    _, new_users = vectorised_round(run.spec, run.shared, run.user_tables, batch, training)
    for k, v in new_users.items():
        run.user_tables[k][pool] = v
