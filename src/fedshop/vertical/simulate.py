"""The whole vertical experiment in one process: scenario, joint split learning, the two baselines,
the attacks with and without protection. Every party is still a separate object that sees only its
own table and the messages; only the simulator (which plays the attacker's ground truth) sees all."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from fedshop.config import Environment
from fedshop.data.renttherunway import RentTheRunway, load_renttherunway
from fedshop.errors import ConfigError
from fedshop.seeding import derive_seed
from fedshop.vertical.leakage import (
    RecordingTransport,
    label_dp_epsilon,
    label_leakage,
    reconstruction_attack,
    single_label_customers,
)
from fedshop.vertical.scenario import (
    DEFAULT_FRACTIONS,
    Columns,
    PartyTable,
    Scenario,
    renttherunway_scenario,
    split_features,
)
from fedshop.vertical.split_learning import (
    FeatureHolder,
    LabelHolder,
    LocalTransport,
    Plan,
    SplitResult,
    train_split,
)


@dataclass(frozen=True)
class VerticalSettings:
    data_dir: str | None = None  # None: $FEDSHOP_DATA_DIR
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    feature_holders: int = 1  # 1: the partner; 2: its columns split into "body" and "profile"
    max_customers: int = 0  # > 0: a seeded random subsample of customers, before the split
    aux_fraction: float = 0.1  # customers whose features the label holder knows (reconstruction)
    # The protected run: per-customer gradient clip and noise multiplier (see Plan).
    protect_clip: float = 0.5
    protect_noise: float = 4.0
    protected_run: bool = True
    # The run with the partner's features protected: each activation row clipped to C (0: the
    # median row norm of the unprotected run) with N(0, (zC)²) noise per coordinate.
    activation_clip: float = 0.0
    activation_noise: float = 4.0
    activation_run: bool = True
    baselines: bool = True

    def data_dir_or_env(self) -> str | None:
        return self.data_dir or Environment.from_os().data_dir or None

    @staticmethod
    def from_dict(data: Mapping) -> VerticalSettings:
        data = dict(data)
        if "fractions" in data:
            data["fractions"] = tuple(data["fractions"])
        return VerticalSettings(**data)


class NoPartners:
    """The transport of a run without feature holders (the baselines)."""

    names: tuple[str, ...] = ()

    def exchange(self, requests):  # never called: no requests without partners
        raise ConfigError("no feature holders to exchange with")


def subsample(data: RentTheRunway, customers: int, seed: int) -> RentTheRunway:
    users = np.unique(data.rentals["user_id"].to_numpy(np.int64))
    if customers <= 0 or customers >= len(users):
        return data
    rng = np.random.default_rng(derive_seed(seed, "vertical", "subsample"))
    chosen = rng.choice(users, size=customers, replace=False)
    rentals = data.rentals.loc[data.rentals["user_id"].isin(chosen)].reset_index(drop=True)
    counts = {**data.counts, "subsample_customers": customers, "subsample_rentals": len(rentals)}
    return RentTheRunway(rentals, data.source, counts)


def pooled(scenario: Scenario) -> tuple[object, Columns]:
    """The centralised reference's table: each rental with its customer's features from every
    holder (left join; customers outside the intersection are dropped later anyway)."""
    frame = scenario.label.frame
    columns = scenario.label.columns
    for table in scenario.features:
        frame = frame.merge(
            table.frame.rename(columns={table.columns.id: columns.id}), on=columns.id, how="left"
        )
        columns = replace(
            columns,
            numeric=columns.numeric + table.columns.numeric,
            categorical=columns.categorical + table.columns.categorical,
        )
    return frame, columns


def block(result: SplitResult) -> dict:
    m = result.metrics
    return {
        "macro_auc": m["macro_auc"],
        "auc": m["auc"],
        "accuracy": m["accuracy"],
        "recall": m["recall"],
        "test_rentals": m["test_rentals"],
        "seconds": result.seconds,
        "exchanges": result.exchanges,
    }


def joint_run(
    scenario: Scenario, aligned: np.ndarray, plan: Plan, record: set[int] | None = None
) -> tuple[SplitResult, LabelHolder, dict[str, FeatureHolder], RecordingTransport]:
    holders = {
        t.name: FeatureHolder(t.frame, t.columns, aligned, plan, name=t.name)
        for t in scenario.features
    }
    label = LabelHolder(scenario.label.frame, scenario.label.columns, aligned, plan)
    transport = RecordingTransport(LocalTransport(holders), keep=record)
    return train_split(label, transport, plan), label, holders, transport


def attack_labels(label: LabelHolder, transport: RecordingTransport, seed: int) -> dict:
    truth = single_label_customers(
        label.positions[label.train_rows], label.labels[label.train_rows]
    )
    out: dict = {"exchanges": {}}
    for exchange, name, positions, gradients in transport.gradients:
        found = label_leakage(positions, gradients, truth, label.columns.classes, seed)
        out["exchanges"].setdefault(name, {})[str(exchange)] = found
    keys = {k for per in out["exchanges"].values() for e in per.values() for k in e}
    for key in sorted(k for k in keys if k.endswith(("_auc_not_fit", "_auc_small", "_auc_large"))):
        values = [e[key] for per in out["exchanges"].values() for e in per.values() if key in e]
        out["max_" + key] = float(np.nanmax(values))
    return out


def attack_features(
    holders: Mapping[str, FeatureHolder],
    label: LabelHolder,
    tables: Sequence[PartyTable],
    aux_fraction: float,
    seed: int,
) -> dict:
    out = {}
    positions = label.request_positions
    for table in tables:
        holder = holders[table.name]
        rows = holder._rows[positions]  # the simulator's view: the true features of those customers
        frame = table.frame.iloc[rows]
        numeric = frame[list(table.columns.numeric)].to_numpy(np.float64)
        _, codes = holder.encoding.transform(frame)
        found = reconstruction_attack(
            label.activations[table.name][positions].numpy(),
            numeric,
            codes - 1,  # encoding's 0 (missing) → -1
            aux_fraction,
            seed,
        )
        found["r2"] = dict(zip(table.columns.numeric, found["r2"], strict=True))
        for key in ("accuracy", "majority_accuracy"):
            found[key] = dict(zip(table.columns.categorical, found[key], strict=True))
        out[table.name] = found
    return out


def build_scenario(settings: VerticalSettings, seed: int) -> Scenario:
    """The parties' tables for `settings` (the deployment writes each into its party's file)."""
    data = subsample(load_renttherunway(settings.data_dir_or_env()), settings.max_customers, seed)
    scenario = renttherunway_scenario(data, settings.fractions, seed)
    if settings.feature_holders == 2:
        return split_features(scenario)
    if settings.feature_holders != 1:
        raise ConfigError("feature_holders is 1 (the partner) or 2 (body and profile)")
    return scenario


def align_by_psi(scenario: Scenario, protocol: str) -> tuple[dict, np.ndarray]:
    """Each feature holder aligns with the label holder by `protocol` (both ends here, over
    loopback, traffic measured); the customers every one of them shares, and the `psi` block."""
    from fedshop.secure.psi import local_psi

    label_ids = [int(i) for i in scenario.label.ids]
    block: dict = {
        "protocol": protocol,
        "reveal_to": "both",
        "label_holder_customers": len(label_ids),
        "with": {},
    }
    aligned = np.asarray(label_ids, dtype=np.int64)
    for table in scenario.features:
        ours, theirs = local_psi(label_ids, [int(i) for i in table.ids], protocol)
        found = np.asarray(sorted(int(i) for i in ours.intersection), dtype=np.int64)
        aligned = np.intersect1d(aligned, found)
        block["with"][table.name] = {
            "intersection_size": ours.intersection_size,
            "feature_holder_customers": ours.peer_size,
            "seconds": round(ours.seconds, 3),
            "bytes_label_to_feature": ours.bytes_sent,
            "bytes_feature_to_label": ours.bytes_received,
            "feature_holder_learned_intersection": theirs.intersection is not None,
        }
    block["aligned_customers"] = len(aligned)
    return block, aligned


def run_vertical(
    scenario_settings: VerticalSettings | Mapping | None = None,
    plan: Plan | None = None,
    seed: int = 0,
    psi_intersection: np.ndarray | None = None,
    psi_protocol: str | None = None,
) -> dict:
    """The whole experiment. With `psi_protocol`, the parties align by that PSI (both ends on
    loopback, `secure.psi.local_psi`) and the result has a `psi` block; else the intersection is
    `psi_intersection`, or computed in the clear."""
    settings = (
        scenario_settings
        if isinstance(scenario_settings, VerticalSettings)
        else VerticalSettings.from_dict(scenario_settings or {})
    )
    plan = replace(plan or Plan(), seed=seed)
    scenario = build_scenario(settings, seed)
    psi_block = None
    if psi_protocol is not None:
        psi_block, aligned = align_by_psi(scenario, psi_protocol)
    elif psi_intersection is not None:
        aligned = np.asarray(psi_intersection, dtype=np.int64)
    else:
        aligned = scenario.aligned_ids()  # in the clear: the simulator may look at everything
    if len(aligned) == 0:
        raise ConfigError(
            "no customer is held by the label holder and every feature holder: nothing to train "
            "(do the parties' id columns name customers the same way?)"
        )
    record = {3, 2 + plan.rounds // 2, 2 + plan.rounds}  # first, middle and last backward

    joint, label, holders, transport = joint_run(scenario, aligned, plan, record)
    out: dict = {
        "scenario": {
            **scenario.info,
            "aligned_customers": len(aligned),
            "aligned_rentals": len(label.labels),
            "train_rentals": len(label.train_rows),
            "test_rentals": len(label.test_rows),
            "test_rule": label.split_rule,
            "platform_rentals_not_aligned": label.rows_dropped_unaligned,
            "feature_holders": {t.name: list(t.columns.inputs) for t in scenario.features},
            "label_holder_columns": list(scenario.label.columns.inputs),
            "rented_for": "present in the file; on the platform's side",
        },
        "plan": plan.to_dict(),
        "seed": seed,
        **({"psi": psi_block} if psi_block is not None else {}),
        "joint": block(joint),
        "exchanges": joint.exchanges,
        "bytes": {
            "to_feature_holders": joint.bytes_to_feature_holders,
            "to_label_holder": joint.bytes_to_label_holder,
        },
    }
    gradient_norms = np.concatenate(
        [np.linalg.norm(g, axis=1) for _, _, _, g in transport.gradients]
    )
    attacks = attack_labels(label, transport, seed)
    reconstruction = attack_features(holders, label, scenario.features, settings.aux_fraction, seed)

    if settings.baselines:
        alone = LabelHolder(scenario.label.frame, scenario.label.columns, aligned, plan)
        out["label_holder_only"] = block(train_split(alone, NoPartners(), plan))
        frame, columns = pooled(scenario)
        central = LabelHolder(frame, columns, aligned, plan)
        out["centralized"] = block(train_split(central, NoPartners(), plan))
        out["joint_vs_centralized"] = joint.metrics["macro_auc"] / out["centralized"]["macro_auc"]

    protection: dict = {
        "protects": (
            "the fit labels of one customer's training rentals, against each feature holder, "
            "through the gradient rows it receives (one per customer per backward exchange, "
            "clipped to C then Gaussian noise); replace-one adjacency on that customer's labels "
            "(sensitivity 2C), RDP accountant over the releases. Not covered: what the top "
            "model, trained on all labels, carries into other customers' rows."
        ),
        "gradient_norm_quantiles_unprotected": {
            q: float(np.quantile(gradient_norms, float(q))) for q in ("0.5", "0.9", "0.99")
        },
        "unprotected": {"attacks": attacks, "reconstruction": reconstruction},
    }
    if settings.protected_run:
        safe_plan = replace(
            plan, gradient_clip=settings.protect_clip, gradient_noise=settings.protect_noise
        )
        result, safe_label, _, safe_transport = joint_run(scenario, aligned, safe_plan, record)
        protection["protected"] = {
            "clip": settings.protect_clip,
            "noise_multiplier": settings.protect_noise,
            "releases_per_customer": result.gradient_releases,
            "delta": plan.delta,
            "epsilon": label_dp_epsilon(
                settings.protect_noise, result.gradient_releases, plan.delta
            ),
            "joint": block(result),
            "macro_auc_cost": joint.metrics["macro_auc"] - result.metrics["macro_auc"],
            "attacks": attack_labels(safe_label, safe_transport, seed),
        }
    if settings.activation_run:
        protection["features_protected"] = protect_features(
            scenario, aligned, plan, settings, joint, label, seed
        )
    out["protection"] = protection
    out["settings"] = asdict(settings)
    return out


def protect_features(
    scenario: Scenario,
    aligned: np.ndarray,
    plan: Plan,
    settings: VerticalSettings,
    joint: SplitResult,
    label: LabelHolder,
    seed: int,
) -> dict:
    """The joint run with every activation row clipped and noised at its feature holder, and the
    reconstruction attack on what the label holder then receives. Feature DP per customer against
    the label holder: replacing a customer's features moves a clipped row by at most 2C, one row
    per forward (the same accounting as the labels'); δ as the plan's."""
    clip = settings.activation_clip
    if clip <= 0:  # the median row norm the label holder saw unprotected: noise at signal scale
        rows = np.concatenate(
            [label.activations[t.name][label.request_positions].numpy() for t in scenario.features]
        )
        clip = float(np.median(np.linalg.norm(rows, axis=1)))
    safe = replace(plan, activation_clip=clip, activation_noise=settings.activation_noise)
    result, safe_label, holders, _ = joint_run(scenario, aligned, safe, None)
    releases = result.exchanges - 1  # every exchange but the setup returns activation rows
    return {
        "clip": clip,
        "noise_multiplier": settings.activation_noise,
        "releases_per_customer": releases,
        "delta": plan.delta,
        "epsilon": label_dp_epsilon(settings.activation_noise, releases, plan.delta),
        "protects": (
            "each customer's feature values at each feature holder, against the label holder "
            "(replace-one adjacency on the customer's row, sensitivity 2C per release)"
        ),
        "joint": block(result),
        "macro_auc_cost": joint.metrics["macro_auc"] - result.metrics["macro_auc"],
        "reconstruction": attack_features(
            holders, safe_label, scenario.features, settings.aux_fraction, seed
        ),
    }
