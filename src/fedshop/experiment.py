"""One experiment: the federated model and its baselines trained and evaluated on the same split.

- federated:   cross-silo (FedNova-weighted FedAvg over silos) or cross-device (every shopper a
               client, FedAvg); private parameters stay with their owner (fl/)
- centralized: one model on everyone's pooled data (the reference that privacy gives up)
- local_only:  every silo trains alone; each customer is scored by their own silo's model
- popularity:  items ranked by how many training customers bought them (a sanity floor)
All four are evaluated per silo on the same held-out items with the same protocol (full ranking, or
the same 100 sampled negatives per user for every method).
With [eval] cold_start, new shoppers held out of every method's training are then scored by the
federated model from their first-day basket (`evaluate_cold_start`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from fedshop.cold_items import evaluate_cold_items
from fedshop.cold_items import prepare as prepare_items
from fedshop.config import ConfigError, RunConfig
from fedshop.data.interactions import RecDataset, SiloData, for_protocol
from fedshop.data.partition import slug
from fedshop.eval.cold_start import ColdStartResult, evaluate_cohort
from fedshop.eval.exposure import exposure
from fedshop.eval.metrics import MetricSums, evaluate, summarise
from fedshop.fl.audit import AuditTrail
from fedshop.fl.contribution import unavailable
from fedshop.fl.cross_device import CrossDeviceRun, eligible_clients, run_cross_device
from fedshop.fl.in_process import run_cross_silo
from fedshop.fl.rounds import RoundRecord
from fedshop.models.fold_in import fold_in, settings_for
from fedshop.models.spec import ModelSpec, Params, get_model, score_all
from fedshop.models.train import TrainResult, train_bpr
from fedshop.privacy.dp import DpPlan, PrivacyGuard, PrivacySummary, make_plan
from fedshop.secure.protected_sum import ProtectionSummary, summarise_costs
from fedshop.seeding import torch_generator


class Progress(Protocol):
    """How long-running steps report progress (the CLI draws bars; tests pass nothing)."""

    def start(self, task: str, total: int) -> None: ...

    def advance(self, task: str, note: str = "") -> None: ...


class _Silent:
    def start(self, task: str, total: int) -> None:
        pass

    def advance(self, task: str, note: str = "") -> None:
        pass


@dataclass
class MethodResult:
    summary: dict[str, float | int]
    per_silo: dict[str, dict[str, float | int]]
    seconds: float
    # (epoch or round, summarised test metrics) along training, where the method has a curve
    curve: list[tuple[int, dict[str, float | int]]] = field(default_factory=list)


@dataclass
class MethodRun:
    """What training one method gives: its metrics and the weights it writes into the run folder;
    the federated method also its rounds and the protection's cost."""

    result: MethodResult
    weights: dict[str, dict[str, torch.Tensor]]
    history: list[RoundRecord] = field(default_factory=list)
    protection: ProtectionSummary = field(default_factory=ProtectionSummary)
    attack: dict | None = None  # metrics.json "attack": an [attack] experiment's outcome
    audit: AuditTrail | None = None  # the federated run's audit log (fl/audit.py)
    contribution: dict | None = None  # metrics.json "contribution" (the federated method's)


@dataclass
class ExperimentResult:
    config: RunConfig
    dataset: RecDataset
    methods: dict[str, MethodResult]
    history: list[RoundRecord]
    # file stem -> tensors, written as safetensors into the run folder
    weights: dict[str, dict[str, torch.Tensor]]
    # metrics.json "privacy": ε (None without DP), δ, protected unit, accountant, mechanism, …
    privacy: PrivacySummary = field(default_factory=PrivacySummary)
    # metrics.json "protection": kind, seconds_per_round, bytes_per_client_per_round (null: none)
    protection: ProtectionSummary = field(default_factory=ProtectionSummary)
    # metrics.json "cold_start": new shoppers held out of training ([eval] cold_start), or None
    cold_start: ColdStartResult | None = None
    # metrics.json "cold_items": new products held out of training ([eval] cold_items), or None
    cold_items: dict | None = None
    # metrics.json "attack": who attacked and what it achieved ([attack]), or None
    attack: dict | None = None
    # The federated run's audit log, closed and written as audit.jsonl by the run folder's writer.
    audit: AuditTrail | None = None
    # metrics.json "contribution": each silo's value (fl/contribution.py) or why there is none;
    # None: the run has no federated method
    contribution: dict | None = None


def method_result(per_silo: dict[str, MetricSums], seconds: float, curve=None) -> MethodResult:
    return MethodResult(
        summary=summarise(per_silo),
        per_silo={name: sums.means() for name, sums in per_silo.items()},
        seconds=seconds,
        curve=curve or [],
    )


def _evaluate_silos(
    silos: list[SiloData],
    scorer: Callable[[SiloData], Callable[[np.ndarray], torch.Tensor]],
    split: str,
) -> dict[str, MetricSums]:
    """Evaluate every silo's customers; `scorer(silo)` scores rows of that silo's local users."""
    return {
        silo.name: evaluate(
            scorer(silo), silo.train, silo.heldout(split), negatives=silo.eval_negatives
        )
        for silo in silos
    }


def run_federated(
    config: RunConfig, dataset: RecDataset, progress: Progress, guard: PrivacyGuard | None = None
) -> MethodRun:
    progress.start("federated", config.federated.rounds)
    started = time.perf_counter()

    def on_round(record: RoundRecord) -> None:
        note = f"HR@10 {record.metrics['hr@10']:.3f}" if record.metrics else ""
        if record.epsilon is not None:
            note += f"  ε {record.epsilon:.2f}"
        if record.protection is not None:
            note += f"  {config.protection.kind} {record.protection['seconds']:.2f}s"
        progress.advance("federated", note)

    if config.federated.mode == "cross-device":
        device_run = run_cross_device(dataset, config, on_round=on_round, guard=guard)
        result = method_result(device_run.final, time.perf_counter() - started)
        weights = {
            "federated/shared": {k: v.cpu() for k, v in device_run.shared.items()},
            # Each shopper's vectors belong on their own device; the simulator keeps them together
            # and writes them per storefront, in the same layout as a cross-silo run's silo files.
            **device_tables_by_silo(dataset, device_run.user_tables),
        }
        history, protected, audit = device_run.history, device_run.protection, device_run.audit
        attack = fake_shopper_block(config, device_run)
        contribution = unavailable(
            "cross-device mode: each shopper is a client; valuing subsets of a round's shoppers "
            "is not implemented"
        )
    else:
        from fedshop.fl.poisoning import attack_outcome, poison

        hook = poison(config)
        run = run_cross_silo(dataset, config, on_round=on_round, guard=guard, clients_hook=hook)
        # The per-round curve lives in the round history (metrics.json "history"), not in `curve`.
        result = method_result(run.final, time.perf_counter() - started)
        weights = {"federated/shared": dict(run.server.shared)}
        for client in run.clients:
            # Written by each silo into its own part of the run folder; the server never had these.
            state = client.private_state()
            state["users"] = torch.tensor(client.data.users)
            weights[f"federated/silo-{slug(client.name)}"] = state
        history, protected, audit = run.history, run.protection, run.audit
        attack = attack_outcome(run.clients, run.server.shared)
        contribution = run.contribution
    costs = protected.costs if protected is not None else []
    protection = summarise_costs(config.protection.kind, costs)
    return MethodRun(
        result, weights, history, protection, attack=attack, audit=audit, contribution=contribution
    )


def fake_shopper_block(config: RunConfig, run: CrossDeviceRun) -> dict | None:
    """metrics.json "attack" of a fake-shopper run: ER@10 of the federated model (after the
    genuine shoppers' refit, over the genuine shoppers only), the targets, the fakes."""
    fakes = run.fakes
    if fakes is None:
        return None
    targets = fakes.targets.tolist()
    er = exposure(lambda rows: run.scores(torch.from_numpy(rows)), run.dataset.train, targets)
    return {
        "kind": config.attack.kind,
        "targets": targets,
        "fake_shoppers": fakes.count,
        "fake_fraction": config.attack.fake_fraction,
        "defence": config.federated.robust,
        "er@10": er.ratio,
        "exposed_shoppers": er.exposed,
        "shoppers": er.shoppers,
    }


def device_tables_by_silo(
    dataset: RecDataset, user_tables: dict[str, torch.Tensor]
) -> dict[str, dict[str, torch.Tensor]]:
    """Every shopper's private rows split by storefront: per silo its shoppers' rows, in the order
    of `dataset.silo(i).users`, plus `users` (their global indices), as a cross-silo silo file."""
    out = {}
    for index, name in enumerate(dataset.silo_names):
        users = torch.from_numpy(np.flatnonzero(dataset.user_silo == index))
        tables = {k: v.detach().cpu()[users].clone() for k, v in user_tables.items()}
        out[f"federated/silo-{slug(name)}"] = {**tables, "users": users}
    return out


def train_centralized(config: RunConfig, dataset: RecDataset, progress: Progress) -> MethodRun:
    epochs = config.baseline_epochs
    progress.start("centralized", epochs)
    started = time.perf_counter()
    model, spec = config.model, get_model(config.model.name)
    shared = spec.init_model(
        dataset.n_items, model, torch_generator(config.seed, "centralized", "init"),
        dataset.item_features,
    )  # fmt: skip
    private = spec.init_private(
        dataset.n_users, dataset.n_items, model,
        torch_generator(config.seed, "centralized", "users"), n_silos=dataset.n_silos,
    )  # fmt: skip
    user_silo = torch.tensor(dataset.user_silo)
    silos = dataset.silos()  # sliced once, evaluated after every epoch
    split = config.eval.split
    curve: list[tuple[int, dict]] = []

    def on_epoch(epoch: int, state: TrainResult) -> None:
        note = ""
        if epoch % config.eval.eval_every == 0 or epoch == epochs:
            sums = _evaluate_silos(
                silos,
                lambda s: _pooled_rows(spec, state.shared, state.private, user_silo, s),
                split,
            )
            curve.append((epoch, summarise(sums)))
            note = f"HR@10 {curve[-1][1]['hr@10']:.3f}"
        progress.advance("centralized", note)

    result = train_bpr(
        shared, private, dataset.train, epochs, config.train,
        torch_generator(config.seed, "centralized", "train"),
        user_silo=user_silo, on_epoch=on_epoch, spec=spec,
    )  # fmt: skip
    per_silo = _evaluate_silos(
        silos,
        lambda silo: _pooled_rows(spec, result.shared, result.private, user_silo, silo),
        split,
    )
    weights = {"centralized": {**result.shared, **result.private, "user_silo": user_silo}}
    return MethodRun(method_result(per_silo, time.perf_counter() - started, curve), weights)


def _pooled_rows(
    spec: ModelSpec, shared: Params, private: Params, user_silo: torch.Tensor, silo: SiloData
):
    """Score rows (local to `silo`) with a model whose private tables cover all users."""
    silo_users = torch.from_numpy(silo.users)
    return lambda rows: score_all(spec, shared, private, silo_users[rows], user_silo)


def train_local_only(config: RunConfig, dataset: RecDataset, progress: Progress) -> MethodRun:
    epochs = config.baseline_epochs
    progress.start("local_only", dataset.n_silos)
    started = time.perf_counter()
    model, spec = config.model, get_model(config.model.name)
    per_silo, weights = {}, {}
    for index, silo in enumerate(dataset.silos()):
        shared = spec.init_model(
            dataset.n_items, model, torch_generator(config.seed, "local", index, "init"),
            dataset.item_features,
        )  # fmt: skip
        private = spec.init_private(
            silo.n_users, dataset.n_items, model,
            torch_generator(config.seed, "local", index, "users"),
        )  # fmt: skip
        result = train_bpr(
            shared, private, silo.train, epochs, config.train,
            torch_generator(config.seed, "local", index, "train"), spec=spec,
        )  # fmt: skip
        per_silo[silo.name] = evaluate(
            lambda rows, r=result: score_all(spec, r.shared, r.private, torch.from_numpy(rows)),
            silo.train,
            silo.heldout(config.eval.split),
            negatives=silo.eval_negatives,
        )
        weights[f"local_only/silo-{slug(silo.name)}"] = {**result.shared, **result.private}
        progress.advance("local_only", silo.name)
    return MethodRun(method_result(per_silo, time.perf_counter() - started), weights)


def popularity(config: RunConfig, dataset: RecDataset, progress: Progress) -> MethodRun:
    progress.start("popularity", 1)
    started = time.perf_counter()
    # Distinct training customers per item across all silos.
    counts = torch.from_numpy(np.asarray(dataset.train.sum(axis=0), dtype=np.float32).ravel())
    per_silo = _evaluate_silos(
        dataset.silos(), lambda silo: lambda rows: counts.expand(len(rows), -1), config.eval.split
    )
    progress.advance("popularity")
    result = method_result(per_silo, time.perf_counter() - started)
    return MethodRun(result, {"popularity": {"counts": counts}})


def run_experiment(
    config: RunConfig, dataset: RecDataset, progress: Progress | None = None
) -> ExperimentResult:
    progress = progress or _Silent()
    if config.model.name == "sasrec":  # a sequential model: fl/sequences.py trains its methods
        from fedshop.fl.sequences import train_sequential

        runs = train_sequential(config, dataset, progress)
        return ExperimentResult(
            config, dataset,
            {name: method_result(r.per_silo, r.seconds, r.curve) for name, r in runs.items()},
            runs["federated"].history if "federated" in runs else [],
            {k: v for r in runs.values() for k, v in r.weights.items()},
            contribution=unavailable(SEQUENTIAL_CONTRIBUTION) if "federated" in runs else None,
        )  # fmt: skip
    # Item features for models that read them; [eval] cold_items: new products leave the dataset.
    dataset, new_products = prepare_items(config, dataset)
    dataset = for_protocol(dataset, config.eval.protocol, config.eval.split, config.seed)
    # Before any training: a run that would overspend a budget stops here.
    guard = open_privacy(config, dataset) if "federated" in config.methods else None
    trainers = {
        "federated": lambda: run_federated(config, dataset, progress, guard),
        "centralized": lambda: train_centralized(config, dataset, progress),
        "local_only": lambda: train_local_only(config, dataset, progress),
        "popularity": lambda: popularity(config, dataset, progress),
    }
    runs = {name: train() for name, train in trainers.items() if name in config.methods}
    weights = {k: v for run in runs.values() for k, v in run.weights.items()}
    federated = runs.get("federated")
    cold = None
    if dataset.cold is not None and federated is not None:
        progress.start(COLD_START_TASK, 3)
        cold = evaluate_cold_start(config, dataset, federated.weights, progress)
    cold_items = None
    if new_products is not None:
        progress.start(COLD_ITEMS_TASK, 1)
        cold_items = evaluate_cold_items(config, dataset, new_products, weights)
        progress.advance(COLD_ITEMS_TASK)
    return ExperimentResult(
        config, dataset, {name: run.result for name, run in runs.items()},
        federated.history if federated else [],
        weights,
        guard.summary() if guard is not None else PrivacySummary(),
        federated.protection if federated else ProtectionSummary(),
        cold,
        cold_items,
        contribution=federated.contribution if federated else None,
        attack=federated.attack if federated else None,
        audit=federated.audit if federated else None,
    )  # fmt: skip


SEQUENTIAL_CONTRIBUTION = (
    "sequential models (SASRec) train in fl/sequences.py, which values no silo"
)
COLD_ITEMS_TASK = "new products (cold items)"
COLD_START_TASK = "new shoppers (cold start)"


def evaluate_cold_start(
    config: RunConfig,
    dataset: RecDataset,
    weights: dict[str, dict[str, torch.Tensor]],
    progress: Progress | None = None,
) -> ColdStartResult:
    """Score the new shoppers (`dataset.cold`) with the federated model in `weights` (its shared
    tables and each storefront's private offsets): folded-in vectors, popularity, and vectors
    trained on the same baskets (the reference), all with the basket excluded from the ranking."""
    progress = progress or _Silent()
    cold = dataset.cold
    if cold is None:
        raise ValueError("the dataset holds no new shoppers ([eval] cold_start = 0)")
    spec = get_model(config.model.name)
    shared = {k: v.detach().cpu() for k, v in weights["federated/shared"].items()}
    offsets = storefront_offsets(weights, dataset.silo_names)
    rows, silo_of_row = torch.arange(cold.n_customers), torch.from_numpy(cold.silo)
    with_offsets = {} if offsets is None else {"silo_item_bias": offsets}

    settings = settings_for(spec)
    folded: dict[str, list[torch.Tensor]] = {name: [] for name in spec.user_tables}
    milliseconds = []
    for row in range(cold.n_customers):
        basket = cold.basket.indices[cold.basket.indptr[row] : cold.basket.indptr[row + 1]]
        offset = None if offsets is None else offsets[cold.silo[row]]
        started = time.perf_counter()
        vector = fold_in(spec, shared, torch.from_numpy(basket.astype(np.int64)), offset, settings)
        milliseconds.append(1000 * (time.perf_counter() - started))
        for name, value in vector.items():
            folded[name].append(value)
    users = {name: torch.cat(values) for name, values in folded.items()}
    with torch.no_grad():
        fold_scores = score_all(spec, shared, {**users, **with_offsets}, rows, silo_of_row)
    progress.advance(COLD_START_TASK, "fold-in")

    counts = torch.from_numpy(np.asarray(dataset.train.sum(axis=0), dtype=np.float32).ravel())
    popularity_scores = counts.expand(cold.n_customers, -1)
    progress.advance(COLD_START_TASK, "popularity")

    # The reference: vectors trained on the same baskets the way a silo trains its customers'.
    epochs = config.baseline_epochs
    private = spec.init_users(
        cold.n_customers, config.model, torch_generator(config.seed, "cold-start", "users")
    )
    trained = train_bpr(
        shared, {**private, **with_offsets}, cold.basket, epochs, config.train,
        torch_generator(config.seed, "cold-start", "train"), update_shared=False,
        user_silo=silo_of_row, spec=spec, frozen=("silo_item_bias",),
    )  # fmt: skip
    with torch.no_grad():
        trained_scores = score_all(spec, shared, trained.private, rows, silo_of_row)
    progress.advance(COLD_START_TASK, "trained vectors")

    scores = {"fold_in": fold_scores, "popularity": popularity_scores, "trained": trained_scores}
    return ColdStartResult(
        methods={m: evaluate_cohort(s, cold, dataset.silo_names) for m, s in scores.items()},
        fold_in_ms=milliseconds,
        settings=asdict(settings),
        trained_epochs=epochs,
        held_out=len(cold.held_out_ids),
    )


def storefront_offsets(
    weights: dict[str, dict[str, torch.Tensor]], silo_names: Sequence[str]
) -> torch.Tensor | None:
    """Every storefront's private item-bias row (silos × items) from the federated run's weights,
    or None when the model has none."""
    rows = [
        weights.get(f"federated/silo-{slug(name)}", {}).get("silo_item_bias") for name in silo_names
    ]
    if any(row is None for row in rows):
        return None
    return torch.cat([row.detach().cpu().reshape(1, -1) for row in rows])


def open_privacy(
    config: RunConfig, dataset: RecDataset, run_id: str | None = None
) -> PrivacyGuard | None:
    """The run's DP plan, checked against the ledger (raises BudgetExceededError), or None."""
    privacy = config.privacy
    if not privacy.enabled:
        return None
    fed = config.federated
    if privacy.mode == "user":
        shoppers = len(eligible_clients(dataset.train))
        expected = fed.clients_per_round or shoppers
        plan = make_plan(
            privacy, fed.rounds, units=shoppers,
            sampling_rate=min(1.0, expected / shoppers), steps_per_round=1,
            population=f"{shoppers:,} shoppers",
        )  # fmt: skip
    else:
        customers = np.bincount(dataset.user_silo, minlength=dataset.n_silos)
        plan = record_level_plan(config, [int(n) for n in customers])
    return PrivacyGuard.open(plan, privacy, dataset.name, dataset.silo_names, run_id)


def record_level_plan(config: RunConfig, silo_customers: Sequence[int] | None) -> DpPlan:
    """Record-level DP of a cross-silo run (the simulator's and a deployment's), given every silo's
    customer count. δ is sized to all silos' customers together: δ = 1/(10·n) tolerates a mechanism
    that publishes each of n units' data with probability δ (a tenth of a unit expected); sized to
    the largest silo alone, S silos together would tolerate about S/10.

    Without the counts (a deployment's server, which never sees them) δ must be in the config, and
    the plan takes the largest population that δ suits (n = 1/(10·δ))."""
    privacy = config.privacy
    if silo_customers is None:
        if not privacy.delta:
            raise ConfigError(
                "[privacy] delta is needed: a deployment's server does not see the silos' "
                "customer counts to size δ from (`fedshop deploy local` sets it from the data)"
            )
        customers = max(1, math.floor(1 / (10 * privacy.delta)))
        # The largest population this δ is 1/(10·n) for: what the privacy block can state.
        population = f"at most {customers:,} units, from [privacy] delta (no counts seen)"
    else:
        customers = sum(silo_customers)
        population = f"{customers:,} customers of all {len(silo_customers)} silos"
    return make_plan(
        privacy, config.federated.rounds, units=customers,
        sampling_rate=privacy.sampling_rate, steps_per_round=privacy.local_steps,
        # The silos' customer counts weight the federated mean: released once, with noise.
        count_noise_multiplier=privacy.count_noise_multiplier,
        population=population,
    )  # fmt: skip


def run_cold_items(
    dataset: str,
    seed: int = 0,
    mode: str = "cross-silo",
    fraction: float = 0.1,
    overrides: dict[str, Any] | None = None,
    config_path: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Train the federated and centralized mf-features models with `fraction` of the catalogue held
    out and return, per method, the among-cold metrics ("hr@10", "ndcg@10", "recall@20", "users")
    plus "among_all" (the whole-catalogue ranking)."""
    from fedshop.config import load_config
    from fedshop.data.datasets import load_dataset

    config = load_config(
        config_path,
        {
            "data.dataset": dataset,
            "seed": seed,
            "federated.mode": mode,
            "model.name": "mf-features",
            "eval.cold_items": fraction,
            "methods": ["federated", "centralized"],
            **(overrides or {}),
        },
    )
    result = run_experiment(config, load_dataset(config.data, seed=config.seed))
    return result.cold_items["methods"]
