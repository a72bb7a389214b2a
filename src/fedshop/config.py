"""Run configuration: TOML ⇄ typed, validated dataclasses.

Every key is checked once, here: unknown keys, wrong types and impossible values raise `ConfigError`
with the section and key named, so the rest of the code can trust its inputs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedshop.choices import (
    ACCOUNTANTS,
    AGGREGATIONS,
    DATASETS,
    FEDERATED_MODES,
    METHODS,
    MODELS,
    PRIVACY_MODES,
    PROTECTIONS,
    PROTOCOLS,
    SERVER_OPTIMIZERS,
)
from fedshop.errors import ConfigError


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "online-retail"
    # auto: `path`, else `data_dir` / $FEDSHOP_DATA_DIR, else the embedded copy.
    # embedded: always the copy inside the package. download: the official release, cached.
    source: str = "auto"
    path: str = ""
    data_dir: str = ""
    min_silo_customers: int = 10
    # online-retail: at most this many silos, the smallest countries merged into "Rest of world"
    # (0: no limit). `fedshop deploy local --silos N` sets it.
    max_silos: int = 0
    min_train_days: int = 1
    validation: bool = False
    # Leave-one-out datasets (movielens-*, amazon-*): which interaction per user is held out.
    # last: the most recent one (and the one before it for validation); on data without timestamps
    # (ML-1M's ratings_no_timestamp.csv) this falls back to random, and the data report says so.
    # random: one drawn uniformly at random (a second one for validation), seeded by the run seed.
    # Ignored by online-retail, which holds out each customer's last purchase day (temporal split).
    leave_out: str = "last"
    # Datasets without a natural silo key (Amazon) deal their users at random into this many shards.
    silos: int = 10

    def validate(self) -> None:
        DATASETS.check(self.dataset, "[data] dataset")
        _choice("data", "source", self.source, ("auto", "embedded", "download"))
        _choice("data", "leave_out", self.leave_out, ("last", "random"))
        _at_least("data", "min_silo_customers", self.min_silo_customers, 0)
        _at_least("data", "max_silos", self.max_silos, 0)
        if self.max_silos == 1:
            raise ConfigError(
                "[data] max_silos = 1 leaves nothing to federate; use 0 or at least 2"
            )
        _at_least("data", "min_train_days", self.min_train_days, 1)
        _at_least("data", "silos", self.silos, 1)
        if self.dataset == "amazon-sequential" and not self.path:
            raise ConfigError(
                '[data] dataset = "amazon-sequential" needs [data] path: a file with one '
                "'user item item ...' line per user"
            )


@dataclass(frozen=True)
class ModelConfig:
    name: str = "mf-bpr"
    dim: int = 64
    init_std: float = 0.1
    # A private per-silo item-bias offset (local taste); see models/mf.py. Cross-silo only (off by
    # default in cross-device mode, where a shopper's own taste is their user embedding).
    silo_item_bias: bool = True
    mlp_layers: int = 3  # NeuMF: hidden layers of the MLP tower (widths dim, dim/2, ...)

    def validate(self) -> None:
        MODELS.check(self.name, "[model] name")
        _at_least("model", "dim", self.dim, 1)
        _positive("model", "init_std", self.init_std)
        _at_least("model", "mlp_layers", self.mlp_layers, 1)


@dataclass(frozen=True)
class TrainConfig:
    """Local training, used alike by federated silos and by the centralized / local-only baselines."""

    learning_rate: float = 0.005
    batch_size: int = 1024
    # Small silos get smaller batches so that every epoch takes at least this many optimiser steps;
    # otherwise a storefront with 500 purchases would train for one step per epoch.
    min_batches_per_epoch: int = 20
    l2: float = 0.01
    negatives: int = 1

    def validate(self) -> None:
        _positive("train", "learning_rate", self.learning_rate)
        _at_least("train", "batch_size", self.batch_size, 1)
        _at_least("train", "min_batches_per_epoch", self.min_batches_per_epoch, 1)
        _at_least("train", "l2", self.l2, 0.0)
        _at_least("train", "negatives", self.negatives, 1)


@dataclass(frozen=True)
class FederatedConfig:
    # cross-silo: each silo (storefront) is a client. cross-device: each shopper is a client, holding
    # only their own interactions and user embedding (simulated vectorised, see fl/vectorised.py).
    mode: str = "cross-silo"
    rounds: int = 30
    local_epochs: int = 1
    silos_per_round: int = 0  # cross-silo: 0 means every silo takes part in every round
    clients_per_round: int = 0  # cross-device: shoppers sampled per round; 0 means all of them
    # cross-device local training is plain SGD with this step size, one full-batch step per local
    # epoch over the shopper's own items (cross-silo silos use [train] learning_rate with Adam).
    # Cross-device mode also changes some defaults below: see MODE_DEFAULTS.
    client_learning_rate: float = 2.0
    # Where the cross-device simulator trains: auto = CUDA when torch sees a GPU, else the CPU.
    device: str = "auto"
    # fedavg: example-weighted mean of the updates. fednova: the same, normalised by each silo's
    # local step count, so a large silo's many local steps do not drown the small ones. Cross-device
    # always uses fedavg: every shopper takes the same number of local steps, so FedNova is a no-op.
    aggregation: str = "fednova"
    server_optimizer: str = "fedavg"
    server_learning_rate: float = 1.0
    server_momentum: float = 0.9
    # FedAdam's τ (Reddi et al.): keep it well below the typical update size. Cross-device item
    # updates are tiny (each shopper touches few rows), so they need a much smaller τ than silos.
    server_epsilon: float = 1e-3
    # Decoupled weight decay of the shared matrices after each server step (0: none); see
    # fl/server_opt.py. configs/movielens-dp.toml uses it against noise that piles up under DP.
    server_weight_decay: float = 0.0
    # Federated Reconstruction (Singhal et al., NeurIPS 2021): each round a silo first refits its
    # private parameters (user embeddings, item-bias offsets) against the frozen global parameters for
    # this many epochs, so the item update it then computes starts from well-fitted private state.
    reconstruction_epochs: int = 0
    # FedProx (Li et al., MLSys 2020): μ of the proximal term μ/2·‖w − w_global‖² added to every
    # client's local loss, on the shared parameters only (item tables, dense weights; never the
    # private user embeddings), so local training drifts less from the round's global model.
    # 0: off (plain local training). Every local trainer that moves shared parameters has it:
    # recommendation (cross-silo and cross-device), fit and the retail tasks; not sasrec, nor
    # record-level DP (DP-SGD replaces the local epochs there): validation refuses those.
    proximal_mu: float = 0.0
    # After the last round each silo refits its private parameters against the final shared model;
    # nothing leaves the silo, so this costs no privacy and no communication.
    personalise_epochs: int = 5
    # A server that does not trust every silo (fl/robust.py). robust: the aggregation rule that
    # replaces the plain sum (none, norm-bound, median, trimmed-mean, krum); each needs every
    # silo's own update, so none works under secure aggregation or encryption.
    # Cross-device (fl/device_robust.py): none, norm-bound, row-bound, similarity (server stages on
    # every shopper's own update, so again not under secure aggregation).
    robust: str = "none"
    robust_trim: float = 0.2  # trimmed-mean: the share dropped at each end, per coordinate
    robust_bound: float = 1.0  # norm-bound: the largest L2 norm an update keeps
    byzantine: int = 1  # krum: how many attackers it tolerates
    # row-bound (cross-device): every item row a shopper moves is clipped to this multiple of the
    # median row-change norm of the round, and only its `max_rows` largest row changes are kept.
    row_bound: float = 3.0
    max_rows: int = 1000
    # similarity (cross-device, FoolsGold-style): a shopper whose update has cosine similarity above
    # this with another shopper's update of the same round is left out of the sum.
    similarity_threshold: float = 0.5
    # Refuse (and log) any silo's update longer than this L2 norm; 0: only malformed ones.
    max_update_norm: float = 0.0

    def validate(self) -> None:
        FEDERATED_MODES.check(self.mode, "[federated] mode")
        _choice("federated", "robust", self.robust, ALL_ROBUST_RULES)
        if not 0.0 <= self.robust_trim < 0.5:
            raise ConfigError(
                f"[federated] robust_trim must be in [0, 0.5), got {self.robust_trim}"
            )
        _positive("federated", "robust_bound", self.robust_bound)
        _positive("federated", "row_bound", self.row_bound)
        _at_least("federated", "max_rows", self.max_rows, 1)
        _share(
            "federated", "similarity_threshold", self.similarity_threshold, "a cosine similarity"
        )
        _at_least("federated", "byzantine", self.byzantine, 0)
        _at_least("federated", "max_update_norm", self.max_update_norm, 0.0)
        _at_least("federated", "rounds", self.rounds, 1)
        _at_least("federated", "local_epochs", self.local_epochs, 1)
        _at_least("federated", "silos_per_round", self.silos_per_round, 0)
        _at_least("federated", "clients_per_round", self.clients_per_round, 0)
        _positive("federated", "client_learning_rate", self.client_learning_rate)
        _choice("federated", "device", self.device, ("auto", "cpu", "cuda"))
        _positive("federated", "server_epsilon", self.server_epsilon)
        if not 0.0 <= self.server_weight_decay < 1.0:
            raise ConfigError(
                f"[federated] server_weight_decay must be in [0, 1), got {self.server_weight_decay}"
            )
        AGGREGATIONS.check(self.aggregation, "[federated] aggregation")
        SERVER_OPTIMIZERS.check(self.server_optimizer, "[federated] server_optimizer")
        _positive("federated", "server_learning_rate", self.server_learning_rate)
        if not 0.0 <= self.server_momentum < 1.0:
            raise ConfigError(
                f"[federated] server_momentum must be in [0, 1), got {self.server_momentum}"
            )
        _at_least("federated", "reconstruction_epochs", self.reconstruction_epochs, 0)
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0.0):
            raise ConfigError(
                "[federated] proximal_mu must be a finite number ≥ 0 (FedProx's μ; 0 turns the "
                f"proximal term off), got {self.proximal_mu}"
            )
        _at_least("federated", "personalise_epochs", self.personalise_epochs, 0)


@dataclass(frozen=True)
class FitConfig:
    """Size and fit prediction (`task = "fit"`, issue 20): the model and the shops."""

    model: str = "k-lf-ml"  # see FIT_MODELS below
    dim: int = 4  # K, the length of a shopper's and a product's true-size vectors
    silos: str = "rented-for"  # the shops: rented-for occasions, or category-group
    split: str = "temporal"  # each shopper's latest feedback held out; random: 80:10:10 (the paper)
    learning_rate: float = 0.01  # local AdamW
    l2: float = 1e-3  # on the rows a record touches
    weight_decay: float = 1.0  # AdamW decay of the shared weights per step (stops memorising)
    private_decay: float = 3.0  # a shopper's own vector shrinks by e^-this per pass over the data
    batch_size: int = 1024
    user_learning_rate: float = 0.5  # DP-SGD: plain SGD step on a sampled customer's own vector
    max_shoppers: int = 0  # keep this many shoppers, drawn by the seed (0: all)
    methods: tuple[str, ...] = (
        "federated", "centralized", "centralized_unlinked", "local_only", "majority", "1-lv-lr",
        "measurements",
    )  # fmt: skip

    def validate(self) -> None:
        _choice("fit", "model", self.model, FIT_MODELS)
        _choice("fit", "silos", self.silos, ("rented-for", "category-group"))
        _choice("fit", "split", self.split, ("temporal", "random"))
        _at_least("fit", "dim", self.dim, 1)
        _positive("fit", "learning_rate", self.learning_rate)
        _at_least("fit", "l2", self.l2, 0.0)
        _at_least("fit", "weight_decay", self.weight_decay, 0.0)
        _at_least("fit", "private_decay", self.private_decay, 0.0)
        _at_least("fit", "batch_size", self.batch_size, 1)
        _positive("fit", "user_learning_rate", self.user_learning_rate)
        _at_least("fit", "max_shoppers", self.max_shoppers, 0)
        if not self.methods:
            raise ConfigError("[fit] methods must name at least one of " + ", ".join(FIT_METHODS))
        for method in self.methods:
            _choice("fit", "methods", method, FIT_METHODS)


# The fit models (models/fit.py) and methods, named here so that validation imports no torch.
FIT_MODELS = ("k-lf-ml", "k-lf-lr", "k-lv-lr", "1-lv-lr", "measure-ml")
FIT_METHODS = (
    "federated", "centralized", "centralized_unlinked", "local_only", "majority", "1-lv-lr",
    "measurements",
)  # fmt: skip
RETAIL_TASKS = ("demand", "returns", "fraud")
TASKS = ("recommend", "fit", *RETAIL_TASKS)
RETAIL_METHODS = ("federated", "centralized", "local_only")


@dataclass(frozen=True)
class RetailConfig:
    """The retail tasks beyond recommendation (`task = "demand" | "returns" | "fraud"`, issue 22):
    the table network every method trains (models/tabular.py) and which methods run. Each task's
    table is built by its own module (data/demand.py, data/returns.py, data/fraud.py)."""

    embedding_dim: int = 8  # at most this many numbers per code (smaller for small vocabularies)
    hidden: int = 64  # width of the two hidden layers
    learning_rate: float = 3e-3  # local AdamW
    weight_decay: float = 1e-4
    batch_size: int = 256
    quantiles: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)  # demand: the levels forecast
    methods: tuple[str, ...] = RETAIL_METHODS
    # demand: weeks held out and forecast, and weeks of history a row sees (data/demand.py)
    horizon: int = 8
    lags: int = 8
    # demand: the inventory policy's stated costs per unit (eval/inventory.py) and lead time
    holding_cost: float = 1.0  # per unit left on the shelf at a week's end
    stockout_cost: float = 4.0  # per unit of demand lost
    lead_time: int = 0  # weeks
    # demand: also the best of statsforecast's models per series (about a minute on 2 cores)
    statistical_baseline: bool = True
    # returns: ε each storefront spends on the DP quality view (items returned abnormally often),
    # paid from its ledger budget on online-retail; 0: no quality view
    quality_epsilon: float = 1.0

    def validate(self) -> None:
        _at_least("retail", "embedding_dim", self.embedding_dim, 1)
        _at_least("retail", "hidden", self.hidden, 1)
        _positive("retail", "learning_rate", self.learning_rate)
        _at_least("retail", "weight_decay", self.weight_decay, 0.0)
        _at_least("retail", "batch_size", self.batch_size, 1)
        levels = list(self.quantiles)
        if not levels or levels != sorted(set(levels)) or not 0 < levels[0] <= levels[-1] < 1:
            raise ConfigError(
                "[retail] quantiles must be increasing levels in (0, 1), e.g. [0.1, 0.5, 0.9]; "
                f"got {levels}"
            )
        _at_least("retail", "horizon", self.horizon, 1)
        _at_least("retail", "lags", self.lags, 1)
        _at_least("retail", "holding_cost", self.holding_cost, 0.0)
        _positive("retail", "stockout_cost", self.stockout_cost)
        _at_least("retail", "lead_time", self.lead_time, 0)
        _at_least("retail", "quality_epsilon", self.quality_epsilon, 0.0)
        if 0.5 not in levels:
            raise ConfigError(
                "[retail] quantiles must include 0.5: the point forecast is the median"
            )
        if not self.methods:
            raise ConfigError(
                "[retail] methods must name at least one of " + ", ".join(RETAIL_METHODS)
            )
        for method in self.methods:
            _choice("retail", "methods", method, RETAIL_METHODS)


ROBUST_RULES = ("none", "norm-bound", "median", "trimmed-mean", "krum")  # fl/robust.py
DEVICE_ROBUST_RULES = ("none", "norm-bound", "row-bound", "similarity")  # fl/device_robust.py
ALL_ROBUST_RULES = (*ROBUST_RULES, "row-bound", "similarity")
STOREFRONT_ATTACKS = ("sign-flip", "scale", "free-ride", "fake-purchases")  # fl/poisoning.py
FAKE_SHOPPER_ATTACKS = ("fedrecattack", "a-hum")  # fl/fake_shoppers.py


@dataclass(frozen=True)
class AttackConfig:
    """Attacks as experiments of the simulator; off by default.

    A malicious storefront (cross-silo, fl/poisoning.py): sign-flip | scale | free-ride |
    fake-purchases, `attackers`, `scale`; fake-purchases also `fake_fraction`, `targets`, `fillers`.
    Fake shoppers promoting target items (cross-device, fl/fake_shoppers.py): fedrecattack | a-hum,
    `fake_fraction`, `targets`, `known_fraction` (fedrecattack), `hard_users` (a-hum), `norm`."""

    # none | sign-flip | scale | free-ride | fake-purchases (storefronts) | fedrecattack | a-hum
    kind: str = "none"
    attackers: int = 1  # how many silos attack (drawn by the run seed)
    scale: float = 10.0  # how much the attacker multiplies its update by
    # Fake shoppers: round(fake_fraction × genuine shoppers) extra clients in the pool (at most 1).
    # fake-purchases: round(fake_fraction × the storefront's customers) fake customers (any > 0).
    fake_fraction: float = 0.05
    # How many target items, drawn by the run seed among the items bought by fewer training shoppers
    # than the median item (and by at least one).
    targets: int = 1
    # fedrecattack: the share of genuine training interactions the attacker knows (public ones).
    known_fraction: float = 0.05
    # a-hum: synthesised hard users per fake shopper, and gradient-ascent steps to mine them.
    hard_users: int = 32
    mining_steps: int = 10
    # Each fake shopper's update has L2 norm `norm` × the median norm of the round's genuine updates
    # (what a shopper's update plausibly measures) and moves at most `rows` item rows.
    norm: float = 1.0
    rows: int = 60
    # The share of a fake's squared norm spent on random other rows (to evade the similarity
    # defence; 0: none).
    camouflage: float = 0.0
    # fake-purchases: each fake customer buys every target and the storefront's `fillers` best
    # sellers.
    fillers: int = 10

    def validate(self) -> None:
        _choice("attack", "kind", self.kind, ("none", *STOREFRONT_ATTACKS, *FAKE_SHOPPER_ATTACKS))
        _at_least("attack", "attackers", self.attackers, 1)
        _positive("attack", "scale", self.scale)
        _positive("attack", "fake_fraction", self.fake_fraction)
        if self.fake_shoppers:
            _share("attack", "fake_fraction", self.fake_fraction, "fake shoppers per genuine one")
        _at_least("attack", "targets", self.targets, 1)
        _at_least("attack", "fillers", self.fillers, 0)
        _share("attack", "known_fraction", self.known_fraction, "of the genuine interactions")
        _at_least("attack", "hard_users", self.hard_users, 1)
        _at_least("attack", "mining_steps", self.mining_steps, 0)
        _positive("attack", "norm", self.norm)
        _at_least("attack", "rows", self.rows, 1)
        if not 0.0 <= self.camouflage < 1.0:
            raise ConfigError(f"[attack] camouflage must be in [0, 1), got {self.camouflage}")
        if self.kind in FAKE_SHOPPER_ATTACKS and self.rows < self.targets:
            raise ConfigError(
                f"[attack] rows ({self.rows}) must be at least targets ({self.targets}): a fake "
                "shopper has to move every target item's row"
            )

    @property
    def fake_shoppers(self) -> bool:
        return self.kind in FAKE_SHOPPER_ATTACKS


CONTRIBUTION_METHODS = ("gtg", "exact", "none")  # fl/contribution.py
CONTRIBUTION_UTILITIES = ("ndcg@10", "hr@10", "silo_mean_ndcg@10", "silo_mean_hr@10")


@dataclass(frozen=True)
class ContributionConfig:
    """Each silo's contribution (fl/contribution.py), valued from the rounds of a cross-silo run.

    Every utility evaluation is one evaluation of a candidate model by every silo on its held-out
    customers (the validation split where the run has one, else [eval] split). At the defaults a
    round of the embedded Online Retail data (11 silos) costs 22 evaluations: measured, about a
    quarter of the federated method's time and a tenth of a default run's
    (benchmarks/contribution.py)."""

    # gtg: GTG-Shapley (Monte-Carlo permutations with truncation); exact: every subset of a round's
    # silos (at most 12 silos; a check); none: off, no evaluation added. Leave-one-out comes with
    # both.
    method: str = "gtg"
    # the summarised metric a candidate model is valued by; silo_mean_…: every storefront counts
    # alike, not every customer
    utility: str = "ndcg@10"
    permutations: int = 1  # gtg: permutations per round
    # gtg: a permutation stops once the utility of its prefix is within this share of the round's
    # gain of the round's model (within-round truncation; 0: never)
    tolerance: float = 0.05
    # A round whose model's utility differs from the previous model's by less than this (in utility
    # units) is not valued: everyone gets zero (between-round truncation; 0: every round valued).
    round_tolerance: float = 0.0005
    # At most this many evaluated customers per silo read the utility, drawn by the seed, their sums
    # scaled to the silo's size (0: all of them).
    customers: int = 100

    def validate(self) -> None:
        _choice("contribution", "method", self.method, CONTRIBUTION_METHODS)
        _choice("contribution", "utility", self.utility, CONTRIBUTION_UTILITIES)
        _at_least("contribution", "permutations", self.permutations, 1)
        if not 0.0 <= self.tolerance < 1.0:
            raise ConfigError(
                f"[contribution] tolerance must be in [0, 1) (a share of the round's gain), got "
                f"{self.tolerance}"
            )
        _at_least("contribution", "round_tolerance", self.round_tolerance, 0.0)
        _at_least("contribution", "customers", self.customers, 0)


CODECS = ("none", "float16", "int8-row", "int8-tensor", "topk")  # fl/compression.py
SCHEDULES = ("sync", "fedbuff")  # fl/buffered.py
CLIENT_SPEEDS = ("equal", "lognormal")  # fl/timing.py


@dataclass(frozen=True)
class CommunicationConfig:
    """What a round costs on the wire and in time (fl/compression.py, fl/timing.py, fl/buffered.py).

    Every run reports the bytes each party sent and received; these settings compress the updates,
    model the clients' speeds (the simulated clock) and pick the schedule."""

    # How each client encodes its update: none (touched rows as float32), float16, int8-row /
    # int8-tensor (8-bit stochastic rounding, a scale per row / per tensor), topk (the largest
    # `topk_fraction` of the entries)
    codec: str = "none"
    topk_fraction: float = 0.1
    # topk: keep what it dropped on the client and add it to the next update (int8's rounding is
    # unbiased and float16's tiny: they need none)
    error_feedback: bool = True
    # Item tables' updates projected onto a shared random basis of this rank (CoLR); 0: off. Linear,
    # so it also works under secure aggregation.
    low_rank: int = 0
    # sync: every round waits for all its clients. fedbuff: `concurrency` clients train at once and
    # the server steps on the first `buffer_size` updates to arrive (Nguyen et al., AISTATS 2022).
    schedule: str = "sync"
    buffer_size: int = 10
    concurrency: int = 0  # 0: [federated] clients_per_round (or silos_per_round)
    staleness_exponent: float = 0.5  # an update s steps stale weighs (1 + s)^-exponent
    # The simulated clock: equal (every client alike) or lognormal (each client's compute and link
    # speed drawn once per run, log-normally around the medians below)
    client_speeds: str = "equal"
    seconds_per_example: float = 0.002  # median local compute per training example and epoch
    uplink_mbps: float = 5.0  # median link speeds, megabits per second
    downlink_mbps: float = 20.0
    speed_sigma: float = 1.0  # log-normal σ of compute and link speeds across clients
    dropout: float = 0.0  # the chance that a started client never reports back
    round_timeout: float = 0.0  # sync: seconds a round waits for a dropped client (0: 3 × median)

    def validate(self) -> None:
        _choice("communication", "codec", self.codec, CODECS)
        _choice("communication", "schedule", self.schedule, SCHEDULES)
        _choice("communication", "client_speeds", self.client_speeds, CLIENT_SPEEDS)
        if not 0.0 < self.topk_fraction <= 1.0:
            raise ConfigError(
                f"[communication] topk_fraction must be in (0, 1], got {self.topk_fraction}"
            )
        _at_least("communication", "low_rank", self.low_rank, 0)
        _at_least("communication", "buffer_size", self.buffer_size, 1)
        _at_least("communication", "concurrency", self.concurrency, 0)
        _at_least("communication", "staleness_exponent", self.staleness_exponent, 0.0)
        for key in ("seconds_per_example", "uplink_mbps", "downlink_mbps"):
            _positive("communication", key, getattr(self, key))
        _at_least("communication", "speed_sigma", self.speed_sigma, 0.0)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"[communication] dropout must be in [0, 1), got {self.dropout}")
        _at_least("communication", "round_timeout", self.round_timeout, 0.0)


@dataclass(frozen=True)
class BaselineConfig:
    # 0 means: the same number of passes over the data as federated training (rounds × local_epochs).
    epochs: int = 0

    def validate(self) -> None:
        _at_least("baselines", "epochs", self.epochs, 0)


# At most half the eligible customers are held out as new shoppers: the rest must train the model.
MAX_COLD_START = 0.5
# At most half the catalogue is held out as new products.
MAX_COLD_ITEMS = 0.5


@dataclass(frozen=True)
class EvalConfig:
    # full: rank the whole catalogue. sampled-100: rank each held-out item against 100 items the user
    # never interacted with (the NCF / federated-recsys protocol; numbers are not comparable to full).
    # ncf (movielens-1m only): the NCF paper's published test pairs and their 99 negatives, exactly.
    protocol: str = "full"
    # "validation" scores the held-out validation baskets instead (needs data.validation = true):
    # use it to choose settings, and the test split only to report.
    split: str = "test"
    eval_every: int = 1  # evaluate the federated model every N rounds (for the per-round plot)
    # New shoppers: this fraction of the customers with at least two purchase days is held out of
    # training entirely (for every method); after training, a vector folded in from each one's first
    # purchase day is scored on their next one (metrics.json "cold_start"). 0: off.
    cold_start: float = 0.0
    # New products: this fraction of the catalogue is held out of training entirely (for every
    # method); after training, each shopper's interactions with them are ranked, the products placed
    # by their features alone (metrics.json "cold_items"; needs a model with item features). 0: off.
    cold_items: float = 0.0

    def validate(self) -> None:
        PROTOCOLS.check(self.protocol, "[eval] protocol")
        _choice("eval", "split", self.split, ("test", "validation"))
        _at_least("eval", "eval_every", self.eval_every, 1)
        if not 0.0 <= self.cold_start <= MAX_COLD_START:
            raise ConfigError(
                f"[eval] cold_start must be in [0, {MAX_COLD_START}] (a fraction of the customers "
                f"held out of training), got {self.cold_start}"
            )
        if not 0.0 <= self.cold_items <= MAX_COLD_ITEMS:
            raise ConfigError(
                f"[eval] cold_items must be in [0, {MAX_COLD_ITEMS}] (a fraction of the catalogue "
                f"held out of training), got {self.cold_items}"
            )


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy of the released shared model (see privacy/ and the README).

    user:   a shopper's whole history is the protected unit (DP-FedAvg, cross-device): each shopper's
            round update is clipped to L2 norm `clip`, the server adds N(0, (z·clip)²) to the sum.
    record: each storefront protects each of its customers (cross-silo): inside the silo, DP-SGD
            with one customer's whole history as the unit (per-customer clipping, Poisson sampling).
    Private parameters (user vectors) never leave their owner; they are fitted against the noisy
    shared model and serve only that user, so the guarantee covers what other parties can see.
    """

    mode: str = "none"
    # Give one of the two: a target ε for the whole run (the noise multiplier z is calibrated to it),
    # or z itself (ε is then computed).
    epsilon: float = 0.0
    noise_multiplier: float = 0.0
    # 0 means 1/(10·n) for the n protected units of the whole population (shoppers, or every silo's
    # customers together). δ ≥ 1/n is refused: such a δ allows releasing one unit's data outright.
    delta: float = 0.0
    clip: float = 0.5  # L2 bound on one unit's contribution to a release
    accountant: str = "rdp"  # rdp | pld (Google's dp-accounting)
    # The ε budget of every silo on this dataset in the ledger. Written there when the ledger has none
    # yet; an existing different budget is changed only with `fedshop privacy budget`.
    budget: float = 0.0
    ledger_url: str = ""  # default: $FEDSHOP_LEDGER_URL, else a SQLite file in the user data folder
    # record mode: DP-SGD steps per round in every silo, and the probability that a customer takes
    # part in a step. The same for every silo, so neither reveals how many customers a silo has.
    local_steps: int = 10
    sampling_rate: float = 0.05
    # record mode: how silos are weighted in the federated mean: by customer counts released with
    # the Gaussian mechanism at this noise multiplier (sensitivity 1), composed into ε.
    count_noise_multiplier: float = 10.0
    # 0: the noise (and the sampling that amplifies it) comes from a secret key drawn from the OS, so
    # two runs with the same seed add different noise. A positive integer makes the noise
    # reproducible from it, for debugging and tests: anyone who knows it can subtract the noise, so
    # such a run is reported as not private. Ignored without DP.
    noise_seed: int = 0

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def known_noise_seed(self) -> int | None:
        """The noise seed the user gave, or None: the noise is secret."""
        return self.noise_seed or None

    def validate(self) -> None:
        PRIVACY_MODES.check(self.mode, "[privacy] mode")
        ACCOUNTANTS.check(self.accountant, "[privacy] accountant")
        _at_least("privacy", "epsilon", self.epsilon, 0.0)
        _at_least("privacy", "noise_multiplier", self.noise_multiplier, 0.0)
        _at_least("privacy", "budget", self.budget, 0.0)
        _positive("privacy", "clip", self.clip)
        _at_least("privacy", "local_steps", self.local_steps, 1)
        _positive("privacy", "count_noise_multiplier", self.count_noise_multiplier)
        if self.noise_seed < 0:
            raise ConfigError(
                f"[privacy] noise_seed must be a positive integer (or 0: secret noise, the "
                f"default), got {self.noise_seed}"
            )
        if not 0.0 <= self.delta < 1.0:
            raise ConfigError(f"[privacy] delta must be in [0, 1), got {self.delta}")
        if not 0.0 < self.sampling_rate <= 1.0:
            raise ConfigError(
                f"[privacy] sampling_rate must be in (0, 1], got {self.sampling_rate}"
            )
        chosen = [k for k in ("epsilon", "noise_multiplier") if getattr(self, k) > 0]
        if not self.enabled:
            if chosen:
                raise ConfigError(
                    f'[privacy] {chosen[0]} is set but mode = "none"; choose mode = "user" or '
                    '"record" (--dp), or drop it'
                )
            return
        if len(chosen) != 1:
            raise ConfigError(
                f'[privacy] mode = "{self.mode}" needs exactly one of epsilon (a target) or '
                f"noise_multiplier; got {' and '.join(chosen) if chosen else 'neither'}"
            )


@dataclass(frozen=True)
class ProtectionConfig:
    """How updates travel to the server (see secure/ and the README): so that it learns only the sum.

    secagg:   secure aggregation (SecAgg+ masks; no party holds a key to individual updates)
    ckks:     CKKS homomorphic encryption (TenSEAL); a key holder decrypts only the aggregate
    paillier: exact Paillier encryption (phe); slow, for small models only
    """

    kind: str = "none"
    # Every protected entry (a silo's update, weighted and divided by the round's total weight;
    # FedNova's step count travels too) must lie within ±bound; a larger one stops the round with
    # an error naming this key.
    bound: float = 4096.0
    # secagg: the ring Z_2^bits. 32 halves the bytes but leaves a resolution of about
    # bound·clients/2^31: only for a tight bound (e.g. the DP clip).
    ring_bits: int = 64
    neighbours: int = 0  # secagg: k, the SecAgg+ neighbourhood (0: about 4·log2(clients))
    threshold: float = 0.0  # secagg: Shamir threshold as a fraction of k (0: a strict majority)
    paillier_key_bits: int = 2048

    def validate(self) -> None:
        PROTECTIONS.check(self.kind, "[protection] kind")
        _positive("protection", "bound", self.bound)
        if self.ring_bits not in (32, 64):
            raise ConfigError(f"[protection] ring_bits must be 32 or 64, got {self.ring_bits}")
        _at_least("protection", "neighbours", self.neighbours, 0)
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"[protection] threshold must be in [0, 1], got {self.threshold}")
        _at_least("protection", "paillier_key_bits", self.paillier_key_bits, 1024)


@dataclass(frozen=True)
class Environment:
    """FedShop's environment variables, read here and nowhere else. Each is a fallback that the
    config or the command line overrides; the module that needs one gets its value passed down."""

    data_dir: str = ""  # FEDSHOP_DATA_DIR: the real datasets' folder, when data.data_dir is unset
    cache_dir: str = ""  # FEDSHOP_CACHE_DIR: downloads (unset: the user's cache folder)
    ledger_url: str = ""  # FEDSHOP_LEDGER_URL: the privacy ledger, when no URL is configured
    nginx: str = ""  # FEDSHOP_NGINX: the nginx a deployment's front door runs (unset: on PATH)
    # FEDSHOP_SILO_TIMING: a deployed silo logs each message's phases with the wall clock
    silo_timing: bool = False
    # FEDSHOP_SUPERNODE_POLL: seconds a deployed silo's SuperNode waits between asks when idle
    supernode_poll: float = 0.25

    @staticmethod
    def from_os() -> Environment:
        """The variables as set now (read at each call, so a changed variable is seen)."""
        return Environment(
            data_dir=os.environ.get("FEDSHOP_DATA_DIR", ""),
            cache_dir=os.environ.get("FEDSHOP_CACHE_DIR", ""),
            ledger_url=os.environ.get("FEDSHOP_LEDGER_URL", ""),
            nginx=os.environ.get("FEDSHOP_NGINX", ""),
            silo_timing=bool(os.environ.get("FEDSHOP_SILO_TIMING")),
            supernode_poll=_seconds(os.environ.get("FEDSHOP_SUPERNODE_POLL"), 0.25),
        )


def _seconds(text: str | None, default: float) -> float:
    """A positive number of seconds from an environment variable; the default when unset."""
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise ConfigError(f"expected a positive number of seconds, got {text!r}")
    return value


@dataclass(frozen=True)
class RunConfig:
    seed: int = 42
    task: str = "recommend"  # recommend: top-K products; fit: will this size fit (issue 20)
    methods: tuple[str, ...] = METHODS.names()
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    protection: ProtectionConfig = field(default_factory=ProtectionConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    retail: RetailConfig = field(default_factory=RetailConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    contribution: ContributionConfig = field(default_factory=ContributionConfig)
    communication: CommunicationConfig = field(default_factory=CommunicationConfig)

    def validate(self) -> RunConfig:
        _at_least("", "seed", self.seed, 0)
        _choice("", "task", self.task, TASKS)
        fit_datasets = DATASETS.names(tag="fit")
        if self.task == "fit":
            return self._validate_fit(fit_datasets)
        if self.task in RETAIL_TASKS:
            return self._validate_retail()
        if self.data.dataset in fit_datasets:
            raise ConfigError(
                f"{self.data.dataset} is fit feedback, not purchases: train it with --task fit "
                '(task = "fit")'
            )
        if not self.methods:
            raise ConfigError("methods must name at least one of " + ", ".join(METHODS.names()))
        for method in self.methods:
            METHODS.check(method, "methods")
        for section in (
            self.data,
            self.model,
            self.train,
            self.federated,
            self.baselines,
            self.eval,
            self.privacy,
            self.protection,
        ):
            section.validate()
        self._validate_privacy()
        self._validate_proximal()
        self._validate_robust()
        self.attack.validate()
        self.contribution.validate()
        self._validate_attack()
        self._validate_communication()
        cross_device = PROTECTIONS.names(tag="cross-device")
        if self.federated.mode == "cross-device" and self.protection.kind not in cross_device:
            raise ConfigError(
                f'[protection] kind = "{self.protection.kind}" is for cross-silo mode (a few silos '
                'and one key holder); for shoppers\' devices use kind = "secagg"'
            )
        per_round = (
            "clients_per_round" if self.federated.mode == "cross-device" else "silos_per_round"
        )
        if self.protection.kind != "none" and getattr(self.federated, per_round) == 1:
            raise ConfigError(
                "[protection] needs at least two clients per round: a sum of one update hides "
                f"nothing; raise [federated] {per_round}"
            )
        if self.federated.mode == "cross-device" and self.model.silo_item_bias:
            raise ConfigError(
                '[model] silo_item_bias is cross-silo only; set it to false for mode = "cross-device"'
            )
        if self.model.name == "sasrec":
            self._validate_sequential()
        if self.eval.split == "validation" and not self.data.validation:
            raise ConfigError('[eval] split = "validation" needs [data] validation = true')
        if self.eval.protocol == "ncf" and self.data.dataset != "movielens-1m":
            raise ConfigError(
                '[eval] protocol = "ncf" is the NCF paper\'s own MovieLens-1M test set: set '
                f'[data] dataset = "movielens-1m" (not {self.data.dataset}), or use full or '
                "sampled-100"
            )
        self._validate_cold_start()
        self._validate_item_features()
        return self

    def _only_recommendation_communicates(self) -> None:
        """Compression and schedules are wired into the recommendation runtimes only."""
        if self.communication != CommunicationConfig():
            raise ConfigError(
                f'[communication] is available for task = "recommend" only, not "{self.task}" '
                "(its rounds still report their bytes); remove the section"
            )

    def _validate_fit(self, fit_datasets: tuple[str, ...]) -> RunConfig:
        """A fit run reads [data], [fit], [federated], [baselines], [eval], [privacy] and
        [protection]; [model], [train] and the top-level methods are the recommenders'."""
        self._only_recommendation_communicates()
        for section in (self.data, self.fit, self.federated, self.baselines, self.eval,
                        self.privacy, self.protection):  # fmt: skip
            section.validate()
        if self.data.dataset not in fit_datasets:
            raise ConfigError(
                f'task = "fit" needs fit feedback: [data] dataset must be one of '
                f"{', '.join(fit_datasets)}, not {self.data.dataset}"
            )
        if self.federated.mode != "cross-silo":
            raise ConfigError(
                'task = "fit" is cross-silo (shops keep their customers\' sizes): set [federated] '
                'mode = "cross-silo"'
            )
        if self.privacy.mode == "user":
            raise ConfigError(
                'task = "fit" protects each shop\'s customers: use [privacy] mode = "record"'
            )
        self._validate_proximal()
        if self.federated.robust != "none":
            raise ConfigError(
                '[federated] robust is not available for task = "fit" yet: its product rows are '
                "averaged over the shops that rent them, which the robust rules do not know"
            )
        if self.protection.kind != "none" and self.federated.silos_per_round == 1:
            raise ConfigError(
                "[protection] needs at least two clients per round: a sum of one update hides "
                "nothing; raise [federated] silos_per_round"
            )
        if self.eval.split == "validation" and not self.data.validation:
            raise ConfigError('[eval] split = "validation" needs [data] validation = true')
        if self.eval.cold_start or self.eval.cold_items or self.eval.protocol != "full":
            raise ConfigError(
                '[eval] cold_start, cold_items and protocol are for recommendation, not task = "fit"'
            )
        return self

    def _validate_retail(self) -> RunConfig:
        """A demand, returns or fraud run reads [retail], [federated], [data] (where its table
        comes from) and [protection]; each task builds its own table, whatever [data] dataset says."""
        self._only_recommendation_communicates()
        for section in (self.data, self.retail, self.federated, self.protection):
            section.validate()
        task = f'task = "{self.task}"'
        if self.federated.mode != "cross-silo":
            raise ConfigError(
                f'{task} is cross-silo (storefronts train together): set [federated] mode = "cross-silo"'
            )
        if self.privacy.enabled:
            raise ConfigError(
                f"{task} has no differentially private training yet: remove [privacy] (its "
                "secure aggregation, [protection], is available)"
            )
        if self.federated.robust != "none":
            raise ConfigError(f"[federated] robust is not available for {task} yet")
        if self.attack.kind != "none":
            raise ConfigError(f"[attack] is not available for {task}")
        if self.protection.kind != "none" and self.federated.silos_per_round == 1:
            raise ConfigError(
                "[protection] needs at least two clients per round: a sum of one update hides "
                "nothing; raise [federated] silos_per_round"
            )
        return self

    def _validate_proximal(self) -> None:
        """FedProx's proximal term lives in the local trainers; where there is none, say so."""
        if self.federated.proximal_mu == 0:
            return
        where = {
            '[model] name = "sasrec"': self.model.name == "sasrec",
            '[privacy] mode = "record" (DP-SGD replaces the silos\' local epochs)': (
                self.privacy.mode == "record"
            ),
        }
        for setting, applies in where.items():
            if applies:
                raise ConfigError(
                    f"[federated] proximal_mu (FedProx) is not implemented with {setting}: "
                    "set proximal_mu = 0"
                )

    def _validate_robust(self) -> None:
        """Robust rules read every client's own update: in plaintext, each rule in its mode."""
        rule = self.federated.robust
        if rule == "none":
            return
        if self.federated.mode == "cross-device" and rule not in DEVICE_ROBUST_RULES:
            raise ConfigError(
                f'[federated] robust = "{rule}" is for cross-silo runs; for cross-device shoppers '
                f"choose one of {', '.join(DEVICE_ROBUST_RULES)}"
            )
        if self.federated.mode == "cross-silo" and rule not in ROBUST_RULES:
            raise ConfigError(
                f'[federated] robust = "{rule}" is for cross-device runs (it reads each shopper\'s '
                f"item rows); for storefronts choose one of {', '.join(ROBUST_RULES)}"
            )
        if self.federated.mode == "cross-device" and self.privacy.enabled:
            raise ConfigError(
                f'[federated] robust = "{rule}" would change the updates DP-FedAvg has clipped and '
                "accounted; it is not available with [privacy] for cross-device runs"
            )
        unit = "shopper" if self.federated.mode == "cross-device" else "silo"
        if self.protection.kind != "none":
            raise ConfigError(
                f'[federated] robust = "{rule}" needs each {unit}\'s own update, which '
                f'[protection] kind = "{self.protection.kind}" hides from the server (it sees only '
                "the total): choose one of the two"
            )

    def _validate_communication(self) -> None:
        """Which compressions and schedules combine with which protections (fl/compression.py)."""
        com = self.communication
        com.validate()
        protected = self.protection.kind != "none"
        if com.codec != "none" and protected:
            raise ConfigError(
                f'[communication] codec = "{com.codec}" cannot run under [protection] kind = '
                f'"{self.protection.kind}": a secure sum adds fixed-point vectors of its own '
                "encoding, not decoded messages; low_rank compression is linear and does work there"
            )
        if com.low_rank and (self.federated.robust != "none" or self.attack.kind != "none"):
            raise ConfigError(
                "[communication] low_rank is not available with [federated] robust or [attack] "
                "yet: their screening reads each update at the model's full width"
            )
        if com.low_rank > self.model.dim:
            raise ConfigError(
                f"[communication] low_rank ({com.low_rank}) must not exceed [model] dim "
                f"({self.model.dim})"
            )
        if com.schedule != "fedbuff":
            return
        if protected or self.privacy.enabled:
            raise ConfigError(
                '[communication] schedule = "fedbuff" mixes updates trained on different rounds\' '
                "models into one step: neither [protection] (its sums are per round) nor "
                "[privacy] (its accountant assumes per-round sampling) is available with it yet"
            )
        if self.federated.robust != "none" or self.attack.kind != "none":
            raise ConfigError(
                '[communication] schedule = "fedbuff" is not available with [federated] robust or '
                "[attack] yet"
            )
        fed = self.federated
        key = "clients_per_round" if fed.mode == "cross-device" else "silos_per_round"
        concurrency = com.concurrency or getattr(fed, key)
        said = "concurrency" if com.concurrency else f"concurrency (0: [federated] {key})"
        if concurrency and concurrency < com.buffer_size:
            raise ConfigError(
                f"[communication] {said} is {concurrency}; it must be at least buffer_size "
                f"({com.buffer_size}): the server steps once that many updates have arrived"
            )

    def _validate_attack(self) -> None:
        """Storefront attacks are cross-silo; fake shoppers are cross-device, MF, in plaintext."""
        attack = self.attack
        if attack.kind in STOREFRONT_ATTACKS and self.federated.mode != "cross-silo":
            raise ConfigError(
                f'[attack] kind = "{attack.kind}" poisons a storefront\'s updates: it needs '
                '[federated] mode = "cross-silo" (fake shoppers are kind = "fedrecattack" or "a-hum")'
            )
        if not attack.fake_shoppers:
            return
        if self.federated.mode != "cross-device":
            raise ConfigError(
                f'[attack] kind = "{attack.kind}" adds fake shoppers: it needs [federated] mode = '
                '"cross-device" (a malicious storefront is kind = "sign-flip" or "scale")'
            )
        if self.model.name != "mf-bpr":
            raise ConfigError(
                f'[attack] kind = "{attack.kind}" is implemented for [model] name = "mf-bpr" only, '
                f"not {self.model.name}"
            )
        if self.privacy.enabled:
            raise ConfigError(
                f'[attack] kind = "{attack.kind}" is not simulated under [privacy] (a fake shopper '
                "ignores the client-side clipping DP-FedAvg relies on); turn one of them off"
            )
        if self.protection.kind != "none":
            raise ConfigError(
                f'[attack] kind = "{attack.kind}" is not simulated under [protection] kind = '
                f'"{self.protection.kind}" yet (fake updates would pass the secure sum unseen, '
                "and no defence can inspect them there)"
            )

    def _validate_item_features(self) -> None:
        """Models that read item features, and [eval] cold_items, which needs one."""
        featured = MODELS.names(tag="item-features")
        with_features = DATASETS.names(tag="item-features")
        if self.eval.cold_items and self.model.name not in featured:
            raise ConfigError(
                "[eval] cold_items places new products by their features: set [model] name to "
                f"{' or '.join(featured)}, or set [eval] cold_items = 0"
            )
        if self.model.name not in featured:
            return
        if self.data.dataset not in with_features:
            raise ConfigError(
                f'[model] name = "{self.model.name}" needs item features; {self.data.dataset} '
                f"has none (datasets with item features: {', '.join(with_features)})"
            )
        if self.privacy.enabled:
            raise ConfigError(
                f'[model] name = "{self.model.name}" does not run under differential privacy '
                "yet (noise would move its fixed feature-id tables); use another model or no DP"
            )

    def _validate_sequential(self) -> None:
        """What a sequential run (`fl/sequences.py`) supports; anything else names the setting."""
        name = self.model.name
        if not self.data.dataset.startswith("amazon-"):
            raise ConfigError(
                f'[model] name = "{name}" reads each shopper\'s items in time order: it needs an '
                "Amazon dataset (amazon-toys, amazon-beauty, amazon-sports, amazon-sequential), "
                f"not {self.data.dataset}"
            )
        unsupported = {
            '[data] leave_out = "last"': self.data.leave_out != "last",
            f'[eval] protocol = "full" (full ranking only; drop --protocol {self.eval.protocol})': (
                self.eval.protocol != "full"
            ),
            'no differential privacy ([privacy] mode = "none")': self.privacy.enabled,
            'no protection ([protection] kind = "none")': self.protection.kind != "none",
            "no cold-start evaluation ([eval] cold_start = 0)": bool(self.eval.cold_start),
            "methods among federated, centralized, popularity": bool(
                set(self.methods) - {"federated", "centralized", "popularity"}
            ),
        }
        for needs, violated in unsupported.items():
            if violated:
                raise ConfigError(f'[model] name = "{name}" needs {needs}')

    def _validate_cold_start(self) -> None:
        if not self.eval.cold_start:
            return
        supported = DATASETS.names(tag="purchase-days")
        if self.data.dataset not in supported:
            raise ConfigError(
                f"[eval] cold_start needs purchase days (a new shopper's first day is the basket, "
                f"the next day the target): {', '.join(supported)} has them, "
                f"{self.data.dataset} does not; set [eval] cold_start = 0"
            )
        if "federated" not in self.methods:
            raise ConfigError(
                '[eval] cold_start folds new shoppers into the federated model: add "federated" '
                "to methods, or set [eval] cold_start = 0"
            )

    def _validate_privacy(self) -> None:
        privacy, mode = self.privacy, self.federated.mode
        if privacy.mode == "user" and mode != "cross-device":
            raise ConfigError(
                '[privacy] mode = "user" protects each shopper as a client: it needs [federated] '
                'mode = "cross-device" (for storefronts protecting their customers use "record")'
            )
        if privacy.mode == "record" and mode != "cross-silo":
            raise ConfigError(
                '[privacy] mode = "record" is DP inside each silo: it needs [federated] mode = '
                '"cross-silo" (in cross-device mode every client is one shopper: use "user")'
            )
        if privacy.enabled and self.model.silo_item_bias:
            raise ConfigError(
                "[model] silo_item_bias is trained on the silo's customers without clipping or "
                "noise; set it to false under differential privacy"
            )

    @property
    def baseline_epochs(self) -> int:
        return self.baselines.epochs or self.federated.rounds * self.federated.local_epochs

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


def config_from_toml(text: str) -> RunConfig:
    """A resolved config as `RunConfig.to_toml` wrote it (what a deployment sends its silos)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"the run's config is not valid TOML: {exc}") from None
    return _build(RunConfig, raw, "").validate()


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> RunConfig:
    """Read a TOML file (or start from defaults), apply dotted `overrides`, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not a UTF-8 text file") from None
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set(raw, dotted, value, replace=True)
    federated = raw.get("federated", {})
    mode = federated.get("mode") if isinstance(federated, dict) else None
    privacy = raw.get("privacy", {})
    privacy_mode = privacy.get("mode") if isinstance(privacy, dict) else None
    model = raw.get("model", {})
    model_name = model.get("name") if isinstance(model, dict) else None
    model_groups = MODEL_DEFAULTS.get((model_name, mode or "cross-silo"), ())
    for group in (
        model_groups + MODE_DEFAULTS.get(mode, ()) + PRIVACY_DEFAULTS.get(privacy_mode, ())
    ):
        # A group applies only as a whole: a user who picks the optimiser picks its settings too.
        if not any(_get(raw, dotted) is not None for dotted in group):
            for dotted, value in group.items():
                _set(raw, dotted, value, replace=False)
    return _build(RunConfig, raw, "").validate()


# Defaults that differ by federation mode, applied where the file and the overrides are silent (the
# resolved config.toml of every run shows them). Cross-device updates are tiny per item row (each
# shopper touches a few rows), which plain FedAvg barely moves; FedAdam rescales them per coordinate.
# Chosen on MovieLens-1M (benchmarks/movielens_quality.py).
MODE_DEFAULTS: dict[str, tuple[dict[str, Any], ...]] = {
    "cross-device": (
        {
            "federated.server_optimizer": "fedadam",
            "federated.server_learning_rate": 0.05,
            "federated.server_epsilon": 1e-8,
        },
        {"federated.local_epochs": 2},
        # A shopper's own taste is their user vector; per-silo offsets are a cross-silo idea, and
        # every method trains the same model, so they are off for the baselines too.
        {"model.silo_item_bias": False},
    )
}


# Defaults of sequential models (fl/sequences.py) by (model, mode), applied before the
# mode's. Cross-device SASRec: one SGD step per shopper and FedAdam at Adam's usual step size, for
# many more rounds than the user-vector models, evaluated every few hundred rounds (full ranking is
# the costly part). Cross-silo: each shard trains Adam for an epoch, plain FedAvg.
_SASREC_COMMON: tuple[dict[str, Any], ...] = (
    {"train.learning_rate": 5e-3},
    {"train.batch_size": 128},
    {"baselines.epochs": 12},
    {"methods": ["federated", "centralized", "popularity"]},
    {"model.silo_item_bias": False},
)
MODEL_DEFAULTS: dict[tuple[str, str], tuple[dict[str, Any], ...]] = {
    ("sasrec", "cross-device"): (
        {
            "federated.server_optimizer": "fedadam",
            "federated.server_learning_rate": 5e-3,
            "federated.server_epsilon": 1e-8,
            "federated.server_momentum": 0.9,
        },
        {"federated.local_epochs": 1, "federated.client_learning_rate": 1.0},
        {"federated.rounds": 1800},  # 12 passes over Toys' shoppers at 128 per round
        {"federated.clients_per_round": 128},
        {"eval.eval_every": 300},
        *_SASREC_COMMON,
    ),
    ("sasrec", "cross-silo"): (
        {"federated.server_optimizer": "fedavg", "federated.server_learning_rate": 1.0},
        {"federated.aggregation": "fedavg"},
        {"federated.local_epochs": 1},
        {"federated.rounds": 20},
        {"eval.eval_every": 5},
        *_SASREC_COMMON,
    ),
}


# Under differential privacy, parameters trained on a silo's customers without clipping and noise
# would escape the guarantee (see PrivacyConfig).
PRIVACY_DEFAULTS: dict[str, tuple[dict[str, Any], ...]] = {
    "user": ({"model.silo_item_bias": False},),
    "record": ({"model.silo_item_bias": False},),
}


def _get(raw: dict[str, Any], dotted: str) -> Any:
    value: Any = raw
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _set(raw: dict[str, Any], dotted: str, value: Any, replace: bool) -> None:
    *sections, key = dotted.split(".")
    target = raw
    for section in sections:
        target = target.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"[{section}] must be a table")
    if replace or key not in target:
        target[key] = value


def _build(cls: type, raw: dict[str, Any], section: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{section}] must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        where = f"in [{section}]" if section else "at the top level"
        raise ConfigError(
            f"unknown config key '{unknown[0]}' {where}; known keys: {', '.join(sorted(known))}"
        )
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, section, name)
    return cls(**values)


# TOML scalar kinds: (accepts the value?, how to name the kind in an error, conversion)
_SCALARS: dict[type, tuple[Callable[[Any], bool], str, Callable[[Any], Any]]] = {
    bool: (lambda v: isinstance(v, bool), "true or false", bool),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer", int),
    float: (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number", float),
    str: (lambda v: isinstance(v, str), "a string", str),
}


def _coerce(hint: Any, value: Any, section: str, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, name)
    if typing.get_origin(hint) is tuple:
        accepts, kind, convert = _SCALARS[typing.get_args(hint)[0]]
        if not isinstance(value, list) or not all(accepts(v) for v in value):
            plural = {"a string": "strings", "a number": "numbers"}.get(kind, kind)
            raise ConfigError(f"{_label(section, name)} must be a list of {plural}, got {value!r}")
        return tuple(convert(v) for v in value)
    accepts, kind, convert = _SCALARS[hint]
    if not accepts(value):
        raise ConfigError(f"{_label(section, name)} must be {kind}, got {value!r}")
    return convert(value)


def _label(section: str, key: str) -> str:
    return f"[{section}] {key}" if section else key


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    return value


def _choice(section: str, key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{_label(section, key)} must be one of {', '.join(allowed)}; got '{value}'"
        )


def _at_least(section: str, key: str, value: float, minimum: float) -> None:
    if value < minimum:
        raise ConfigError(f"{_label(section, key)} must be at least {minimum}, got {value}")


def _share(section: str, key: str, value: float, meaning: str) -> None:
    """A share in (0, 1]; `meaning` says of what."""
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{_label(section, key)} must be in (0, 1] ({meaning}), got {value}")


def _positive(section: str, key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{_label(section, key)} must be greater than 0, got {value}")
