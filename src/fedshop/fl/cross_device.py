"""Cross-device federation: every shopper is a client, simulated many clients at a time.

A shopper's device holds their own interactions and their private user vectors; each round the server
samples some devices, each trains locally from the current shared model (`fl/local_round.py`) and
returns only the change to the shared parameters, and the server takes the example-weighted mean
(FedAvg) and steps its optimiser. The round itself is computed by `fl/vectorised.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from fedshop.config import RunConfig
from fedshop.data.interactions import RecDataset, SiloData
from fedshop.errors import FedShopError
from fedshop.eval.metrics import MetricSums, evaluate
from fedshop.fl.device_robust import ScreenedRound, device_defences
from fedshop.fl.fake_shoppers import FakeShoppers
from fedshop.fl.in_process import make_server
from fedshop.fl.local_round import LocalTraining, draw_round
from fedshop.fl.rounds import FinalEvaluation, RoundCallback, RoundDriver, RoundRecord, RoundReply
from fedshop.fl.vectorised import vectorised_round, vectorised_sum
from fedshop.messages import AggregationPipeline
from fedshop.models.spec import ModelSpec, Params, get_model, score_all
from fedshop.privacy.dp import PrivacyGuard
from fedshop.privacy.noise import ClipUpdate, GaussianNoise, fixed_denominator
from fedshop.secure.protected_sum import ProtectedSum, make_protection
from fedshop.secure.protocol import ProtectionError
from fedshop.seeding import NoiseStream, torch_generator


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
    final: dict[str, MetricSums] | None = None  # after every shopper refitted their vectors
    audit: object = None  # the audit trail (fl/audit.py): server-signed, shoppers hold no keys
    fakes: FakeShoppers | None = None  # [attack]: the fake shoppers (never evaluated)
    screened: ScreenedRound | None = None  # the round with defences and fakes, when there is one
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


@dataclass
class ShopperTransport:
    """A round's messages as the vectorised simulator computes them: every sampled shopper trains
    on its own device (`fl/vectorised.py`, many at once), only shared-parameter updates are summed."""

    run: CrossDeviceRun
    training: LocalTraining
    seed: int
    split: str
    personalise_epochs: int
    pipeline: AggregationPipeline
    unit: str = "shoppers"
    retries: bool = False
    client_dp_event: None = None  # shoppers add no noise of their own; the server does (user DP)
    # [attack] fake shoppers or [federated] robust: the round summed from every client's own update.
    screened: ScreenedRound | None = None

    def train(
        self, round_number: int, clients: Sequence[int], shared: Params, evaluate: int | None
    ) -> RoundReply:
        run = self.run
        clients = torch.as_tensor(clients, dtype=torch.int64)
        fakes = clients[clients >= run.dataset.n_users]  # fake shoppers craft, they do not train
        clients = clients[clients < run.dataset.n_users]
        batch = draw_round(
            run.dataset.train, clients, self.training.epochs, self.training.negatives,
            torch_generator(self.seed, "devices", "round", round_number),
        )  # fmt: skip
        if run.protection is not None and len(clients) == 1:
            raise ProtectionError(
                f"round {round_number} sampled a single shopper: secure aggregation cannot hide "
                "a lone update; raise [federated] clients_per_round or the sampling rate"
            )
        if self.screened is not None:
            total, new_users, kept = self.screened.run(
                round_number, run.spec, shared, run.user_tables, batch, fakes, self.training
            )
            for k, v in new_users.items():
                run.user_tables[k][clients] = v
            return RoundReply(total, kept)
        clip = self.pipeline.stage_of(ClipUpdate)
        summation = run.protection if len(clients) > 0 else None
        total, new_users = vectorised_sum(
            run.spec, shared, run.user_tables, batch, self.training,
            clip=clip.clip if clip is not None else None, summation=summation,
        )  # fmt: skip
        for k, v in new_users.items():
            run.user_tables[k][clients] = v
        cost = run.protection.costs[-1] if summation is not None else None
        return RoundReply(total, clients.tolist(), cost)

    def evaluate(self, round_number: int, shared: Params) -> dict[str, MetricSums]:
        self.run.shared = shared
        return self.run.evaluate(self.split)

    def finish(self, shared: Params, evaluate: int | None) -> FinalEvaluation:
        self.run.shared = shared
        personalise(self.run, self.personalise_epochs, self.training, self.seed)
        return FinalEvaluation(self.run.evaluate(self.split))

    def recover(self) -> None:
        pass


def shopper_pipeline(
    config: RunConfig, guard: PrivacyGuard | None, pool_size: int, protection: ProtectedSum | None
) -> AggregationPipeline:
    """FedAvg over shoppers; under user-level DP, DP-FedAvg: each update clipped, Gaussian noise on
    the sum, the expected count as denominator."""
    summation = {"summation": protection} if protection is not None else {}
    if guard is None:
        return AggregationPipeline(**summation)
    plan = guard.plan
    # Secret noise: the run seed is public (see seeding.py).
    noise = GaussianNoise(
        plan.noise_multiplier, plan.clip,
        NoiseStream.of(config.privacy.known_noise_seed, "server", "noise"), plan.sampling_rate,
    )  # fmt: skip
    return AggregationPipeline(
        client_stages=(ClipUpdate(plan.clip),),
        server_stages=(noise, fixed_denominator(plan.sampling_rate * pool_size)),
        **summation,
    )


def run_cross_device(
    dataset: RecDataset,
    config: RunConfig,
    on_round: RoundCallback | None = None,
    guard: PrivacyGuard | None = None,
) -> CrossDeviceRun:
    """Train; with a `guard` (user-level DP) every round is DP-FedAvg: Poisson-sampled shoppers,
    each update clipped, Gaussian noise on the sum, the expected count as denominator, and the
    round written to the ledger before its noisy sum exists.

    With secure aggregation every sampled shopper sends a masked dense update and the server
    learns only the round's sum; under DP the server adds the noise to that sum after unmasking
    (the trusted-aggregator placement: the server sees the exact sum, never one shopper's update)."""
    fed = config.federated
    spec = get_model(config.model.name)
    device = resolve_device(fed.device)
    user_tables = spec.init_users(
        dataset.n_users, config.model, torch_generator(config.seed, "devices", "users")
    )
    user_tables = {k: v.to(device) for k, v in user_tables.items()}
    pool = eligible_clients(dataset.train)
    fakes = None
    if config.attack.fake_shoppers:  # extra clients in the pool, sampled like the others
        fakes = FakeShoppers.register(config.attack, dataset.train, config.seed)
        pool = torch.cat([pool, fakes.ids])
    defences = device_defences(config, dataset.n_items)
    protection = make_protection(config.protection)
    protected = ProtectedSum(protection, config.protection.bound) if protection else None
    pipeline = shopper_pipeline(config, guard, len(pool), protected)
    rate = guard.plan.sampling_rate if guard is not None else None
    server = make_server(
        config, dataset.n_items, pool, pipeline, rate, device, dataset.item_features
    )
    run = CrossDeviceRun(
        spec, server.shared, user_tables, dataset, protection=protected, fakes=fakes
    )
    training = LocalTraining(
        fed.local_epochs,
        fed.client_learning_rate,
        config.train.l2,
        config.train.negatives,
        proximal_mu=fed.proximal_mu,
    )
    transport = ShopperTransport(
        run, training, config.seed, config.eval.split, fed.personalise_epochs, pipeline
    )
    if fakes is not None or defences:
        transport.screened = run.screened = ScreenedRound(defences, dataset.n_users, fakes)
    from fedshop.fl.audit import start_device_audit

    run.audit = start_device_audit(config)
    finished = RoundDriver(
        config, server, transport, guard, on_round=on_round, audit=run.audit.rounds
    ).run_all()
    run.shared, run.history = server.shared, finished.history
    run.final = finished.final.per_silo
    return run


def personalise(run: CrossDeviceRun, epochs: int, training: LocalTraining, seed: int) -> None:
    """Every shopper refits their own vectors against the final shared model; nothing is sent."""
    if epochs <= 0:
        return
    pool = eligible_clients(run.dataset.train)
    training = LocalTraining(
        epochs, training.learning_rate, training.l2, training.negatives, update_shared=False
    )
    batch = draw_round(
        run.dataset.train, pool, epochs, training.negatives,
        torch_generator(seed, "devices", "personalise"),
    )  # fmt: skip
    _, new_users = vectorised_round(run.spec, run.shared, run.user_tables, batch, training)
    for k, v in new_users.items():
        run.user_tables[k][pool] = v
