"""Cross-device federation: every shopper is a client, simulated many clients at a time.

A shopper's device holds their own interactions and their private user vectors; each round the server
samples some devices, each trains locally from the current shared model (`fl/local_round.py`) and
returns only the change to the shared parameters, and the server takes the example-weighted mean
(FedAvg) and steps its optimiser. The round itself is computed by `fl/vectorised.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp
import torch

from fedshop.config import RunConfig
from fedshop.data.interactions import RecDataset, SiloData
from fedshop.errors import FedShopError
from fedshop.eval.metrics import MetricSums, evaluate
from fedshop.fl.buffered import Schedule, StepOutcome, model_bytes, unscheduled
from fedshop.fl.device_robust import ScreenedRound, device_defences
from fedshop.fl.fake_shoppers import FakeShoppers
from fedshop.fl.in_process import make_server
from fedshop.fl.local_round import LocalTraining, RoundInput, draw_round
from fedshop.fl.rounds import (
    FinalEvaluation,
    RoundCallback,
    RoundDriver,
    RoundRecord,
    RoundReply,
    Traffic,
)
from fedshop.fl.vectorised import row_updates, train_groups, vectorised_round, vectorised_sum
from fedshop.fl.wire import RowProjection, RowWire, Wire, baseline_bytes, with_low_rank
from fedshop.messages import Aggregate, AggregationPipeline
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
    wire: Wire = field(default_factory=Wire)  # how messages are encoded ([communication] codec)
    schedule: Schedule | None = None  # the simulated clock, and FedBuff's buffer when it is on
    concurrency: int = 0  # FedBuff: shoppers training at once
    low_rank: RowProjection | None = None  # [communication] low_rank: item rows projected

    def __post_init__(self) -> None:
        self.rows_wire = RowWire(self.wire, self.run.spec.item_tables)

    def train(
        self, round_number: int, clients: Sequence[int], shared: Params, evaluate: int | None
    ) -> RoundReply:
        run = self.run
        clients = torch.as_tensor(clients, dtype=torch.int64)
        fakes = clients[clients >= run.dataset.n_users]  # fake shoppers craft, they do not train
        clients = clients[clients < run.dataset.n_users]
        if run.protection is not None and len(clients) == 1:
            raise ProtectionError(
                f"round {round_number} sampled a single shopper: secure aggregation cannot hide "
                "a lone update; raise [federated] clients_per_round or the sampling rate"
            )
        down = model_bytes(shared)
        if self.screened is not None:
            batch = self._batch(round_number, clients)
            total, new_users, kept = self.screened.run(
                round_number, run.spec, shared, run.user_tables, batch, fakes, self.training
            )
            for k, v in new_users.items():
                run.user_tables[k][clients] = v
            sizes = self._baseline_bytes(batch, shared).tolist()
            sent = dict(zip(clients.tolist(), sizes, strict=True))
            traffic = Traffic(sent, dict.fromkeys(clients.tolist(), down))
            return RoundReply(total, kept, traffic=traffic)
        if not self.wire.lossless or (self.schedule is not None and self.schedule.buffered):
            return self._train_messages(round_number, clients.tolist(), shared, down)
        outcome: dict = {}

        def train(chosen: list[int]) -> dict:
            """The vectorised round of the clients that report; each one's bytes, unbuilt."""
            chosen_clients = torch.as_tensor(chosen, dtype=torch.int64)
            batch = self._batch(round_number, chosen_clients)
            clip = self.pipeline.stage_of(ClipUpdate)
            summation = self._summation() if len(chosen) > 0 else None
            total, new_users = vectorised_sum(
                run.spec, shared, run.user_tables, batch, self.training,
                clip=clip.clip if clip is not None else None, summation=summation,
            )  # fmt: skip
            for k, v in new_users.items():
                run.user_tables[k][chosen_clients] = v
            if self.low_rank is not None and summation is None:
                # Linear: the sum of the shoppers' projected rows is the projected sum.
                total = replace(total, tensors=self.low_rank.project_message(total).tensors)
            cost = run.protection.costs[-1] if summation is not None else None
            outcome["sum"] = total, cost
            # A protected shopper sends the protection's own encoding (a dense masked vector).
            sizes = cost.bytes_sent_per_client if cost else self._baseline_bytes(batch, shared)
            return {c: (None, int(size)) for c, size in zip(chosen, sizes, strict=False)}

        step = self._step(clients.tolist(), train, down)
        total, cost = outcome["sum"]
        return RoundReply(total, list(step.parcels), cost, traffic=step.traffic, clock=step.clock)

    def _batch(self, round_number: int, clients: torch.Tensor, part: int = 0) -> RoundInput:
        """The round's negatives for `clients`; FedBuff starts clients several times in a step
        (as slots free up), each `part` with draws of its own."""
        labels = ("devices", "round", round_number, *((part,) if part else ()))
        return draw_round(
            self.run.dataset.train, clients, self.training.epochs, self.training.negatives,
            torch_generator(self.seed, *labels),
        )  # fmt: skip

    def _step(self, clients: list[int], train, down: int) -> StepOutcome:
        if self.schedule is not None:
            return self.schedule.round(clients, train, down, self.concurrency)
        return unscheduled(clients, train, down)

    def _summation(self):
        """The protection's secure sum, of the projected messages under low_rank."""
        protection, low_rank = self.run.protection, self.low_rank
        if protection is None or low_rank is None:
            return protection
        return lambda messages: protection([low_rank.project_message(m) for m in messages])

    def _baseline_bytes(self, batch: RoundInput, shared: Params) -> torch.Tensor:
        """Each shopper's uncompressed message: the item rows it touched (its positives and
        negatives) and the dense weights."""
        rows = torch.tensor(
            [len(torch.unique(torch.cat([p, n.reshape(-1)])))
             for p, n in zip(batch.positives, batch.negatives, strict=True)],
            dtype=torch.int64,
        )  # fmt: skip
        sent = self.low_rank.shapes(shared) if self.low_rank is not None else shared
        return baseline_bytes(rows, sent, self.run.spec.item_tables)

    def _train_messages(
        self, round_number: int, clients: list[int], shared: Params, down: int
    ) -> RoundReply:
        """Each shopper's own message (its touched rows, `RowUpdate`), encoded by the run's codec,
        held until it arrives (FedBuff) and decoded by the server: for lossy codecs and FedBuff."""
        run, training = self.run, self.training
        clip = self.pipeline.stage_of(ClipUpdate)
        rows_wire = self.rows_wire
        parts = iter(range(len(clients) + 1))

        def train(chosen: list[int]) -> dict:
            chosen_clients = torch.as_tensor(chosen, dtype=torch.int64)
            batch = self._batch(round_number, chosen_clients, next(parts))
            groups = train_groups(
                run.spec, shared, run.user_tables, batch, training,
                clip=clip.clip if clip is not None else None,
            )  # fmt: skip
            new_users = next(groups)
            trained = {}
            for bucket, update, weights in groups:
                ids = batch.clients[bucket.members.cpu()].tolist()
                updates = zip(ids, row_updates(update, bucket, weights), weights, strict=True)
                for c, row_update, weight in updates:
                    if self.low_rank is not None:
                        row_update = self.low_rank.project(row_update)
                    parcel, size = rows_wire.send(c, round_number, row_update)
                    trained[c] = ((parcel, float(weight)), size)
            for k, v in new_users.items():
                run.user_tables[k][chosen_clients] = v
            return trained

        step = self._step(clients, train, down)
        sums = self._sum_shapes(shared)
        weight = 0.0
        for c, (parcel, client_weight) in step.parcels.items():
            received = rows_wire.open(parcel)
            discount = step.discounts.get(c, 1.0)
            for k, v in received.tensors.items():
                v = v.to(sums[k].device) * discount
                if k in run.spec.item_tables:
                    sums[k].index_add_(0, received.items.to(sums[k].device), v)
                else:
                    sums[k] += v.reshape(sums[k].shape)
            weight += client_weight
        total = Aggregate(sums, weight, len(step.parcels))
        return RoundReply(
            total, list(step.parcels), traffic=step.traffic, clock=step.clock,
            staleness=step.staleness,
        )  # fmt: skip

    def _sum_shapes(self, shared: Params) -> Params:
        """Zeros shaped like what the clients send (item tables at the low rank, when on)."""
        sums = {k: torch.zeros_like(v) for k, v in shared.items()}
        if self.low_rank is not None:
            sums = self.low_rank.shapes(sums)
        return sums

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
        return with_low_rank(AggregationPipeline(**summation), config)
    plan = guard.plan
    # Secret noise: the run seed is public (see seeding.py).
    noise = GaussianNoise(
        plan.noise_multiplier, plan.clip,
        NoiseStream.of(config.privacy.known_noise_seed, "server", "noise"), plan.sampling_rate,
    )  # fmt: skip
    pipeline = AggregationPipeline(
        client_stages=(ClipUpdate(plan.clip),),
        server_stages=(noise, fixed_denominator(plan.sampling_rate * pool_size)),
        **summation,
    )
    return with_low_rank(pipeline, config)


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
    # User-level DP: a codec that may lengthen a clipped update is clipped again on arrival.
    wire = Wire.of_run(config, reclip=guard.plan.clip if guard is not None else None)
    transport = ShopperTransport(
        run, training, config.seed, config.eval.split, fed.personalise_epochs, pipeline,
        wire=wire,
    )  # fmt: skip
    if fakes is not None or defences:
        transport.screened = run.screened = ScreenedRound(defences, dataset.n_users, fakes)
    transport.low_rank = RowProjection.of_run(config)
    examples = np.diff(dataset.train.indptr)
    transport.schedule = Schedule(config, dataset.n_users, lambda c: examples[c], fed.local_epochs)
    transport.concurrency = config.communication.concurrency or fed.clients_per_round or len(pool)
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
