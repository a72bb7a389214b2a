"""One run's differential privacy: the plan (what is released, with which noise) and the guard that
accounts each release and writes it to the ledger before it leaves.

    plan  = make_plan(config, rounds, units, q, steps)     # z calibrated to the target ε, or given
    guard = PrivacyGuard.open(plan, config, dataset, silos)  # refuses before training if over budget
    for each round:  ε = guard.release(round, event)  # write-ahead, then release

(`experiment.open_privacy` builds the plan of a run from its config. The plan calibrates z and sizes
the noise stages; each round's `event` is what those stages declare, composed by the round driver in
`fl/rounds.py`, which checks it against the noise they drew.)

Under `user` (DP-FedAvg) each release is one round's noisy sum over Poisson-sampled shoppers; under
`record` it is one round's silo message, made of `local_steps` DP-SGD steps over Poisson-sampled
customers. Fixed-noise releases (counts) are composed in the same accountant.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import dp_accounting as dpa
import numpy as np

from fedshop.config import PrivacyConfig
from fedshop.errors import ConfigError
from fedshop.privacy.accounting import (
    RunAccountant,
    epsilon,
    gaussian_step,
    noise_for_target,
    repeated,
)
from fedshop.privacy.mechanisms import gaussian_mechanism
from fedshop.seeding import NoiseStream
from fedshop.storage.ledger import BudgetExceededError, Ledger

UNITS = {
    "user": "shopper (all of one user's interactions)",
    "record": "customer of a silo (all of one customer's interactions in that silo)",
}
MECHANISMS = {
    "user": "DP-FedAvg: per-shopper clipping, Gaussian noise on the sum, Poisson sampling",
    "record": "DP-SGD in each silo: per-customer clipping, Gaussian noise, Poisson sampling",
}


@dataclass(frozen=True)
class DpPlan:
    mode: str  # "user" | "record"
    noise_multiplier: float  # z: noise std = z × clip on every coordinate of each noisy sum
    clip: float
    delta: float
    sampling_rate: float  # q: each unit takes part in a step with this probability
    steps_per_round: int  # noisy sums per released round (1 for user, local_steps for record)
    rounds: int
    accountant: str
    # The protected population δ is sized to: every unit that any release can touch (all shoppers,
    # or every silo's customers together), so δ bounds the failure probability of the whole run.
    units: int
    population: str = (
        ""  # the same in words, for the privacy block ("4,334 customers of all 11 silos")
    )
    # The user named the noise seed: the noise can be reproduced, so it protects nothing.
    noise_seed_known: bool = False
    # record: the silos' customer counts are released once with the Gaussian mechanism at this
    # noise multiplier (one customer is in one silo: L2 sensitivity 1); None: no count release.
    count_noise_multiplier: float | None = None

    @property
    def unit(self) -> str:
        return UNITS[self.mode]

    @property
    def mechanism(self) -> str:
        return MECHANISMS[self.mode]

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip

    @property
    def fixed_events(self) -> tuple[dpa.DpEvent, ...]:
        """Releases whose noise is fixed by the config, composed before training."""
        return _fixed_events(self.count_noise_multiplier)

    @property
    def round_event(self) -> dpa.DpEvent:
        return _gaussian_steps(self.noise_multiplier, self.sampling_rate, self.steps_per_round)

    def planned_event(self) -> dpa.DpEvent:
        return _run_event(
            self.noise_multiplier, self.sampling_rate, self.steps_per_round * self.rounds,
            self.fixed_events,
        )  # fmt: skip

    def planned_epsilon(self) -> float:
        return epsilon(self.planned_event(), self.delta, self.accountant)

    def describe(self) -> dict:
        """The plan as it goes into metrics.json (ε itself is added by the guard)."""
        return {
            "unit": self.unit,
            "mechanism": self.mechanism,
            "accountant": self.accountant,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "clip": self.clip,
            "sampling_rate": self.sampling_rate,
            "sampling": "poisson",
            "steps": self.steps_per_round * self.rounds,
            "delta_population": self.population,
            "protected_units": self.units,
            "noise_seed_known": self.noise_seed_known,
        }


def _gaussian_steps(z: float, q: float, steps: int) -> dpa.DpEvent:
    step = gaussian_step(z, q)
    return step if steps == 1 else repeated(step, steps)


def _fixed_events(count_noise_multiplier: float | None) -> tuple[dpa.DpEvent, ...]:
    if count_noise_multiplier is None:
        return ()
    return (dpa.GaussianDpEvent(count_noise_multiplier),)


def _run_event(z: float, q: float, steps: int, fixed: tuple[dpa.DpEvent, ...]) -> dpa.DpEvent:
    training = _gaussian_steps(z, q, steps)
    return dpa.ComposedDpEvent([*fixed, training]) if fixed else training


def release_silo_counts(
    counts: Sequence[int], plan: DpPlan, rng: np.random.Generator | NoiseStream
) -> np.ndarray:
    """Silos' customer counts with Gaussian noise, the plan's fixed release (one customer is in one
    silo: L2 sensitivity 1). Clamping is post-processing; a silo never weighs below one customer."""
    if plan.count_noise_multiplier is None:
        raise ValueError("this plan releases no counts")
    release = gaussian_mechanism(
        np.asarray(counts, dtype=np.float64), 1.0, plan.count_noise_multiplier, rng
    )
    if release.event != plan.fixed_events[0]:
        raise ValueError("the counts' noise is not the plan's accounted release")
    return np.maximum(release.values, 1.0)


def resolve_delta(config: PrivacyConfig, units: int) -> float:
    """δ from the config, or 1/(10·n) for the n protected units of the whole population (not of one
    silo: δ is the run's chance of failing anyone). δ ≥ 1/n is refused: it permits publishing one
    unit's data outright."""
    if units < 1:
        raise ConfigError("differential privacy needs at least one protected unit with data")
    delta = config.delta or 1.0 / (10 * units)
    if delta >= 1.0 / units:
        raise ConfigError(
            f"[privacy] delta = {delta:.3g} is not below 1/n = {1 / units:.3g} for n = {units:,} "
            "protected units; such a δ allows releasing one unit's data outright (use ≤ 1/(10·n))"
        )
    return delta


def make_plan(
    config: PrivacyConfig,
    rounds: int,
    units: int,
    sampling_rate: float,
    steps_per_round: int,
    count_noise_multiplier: float | None = None,
    population: str = "",
) -> DpPlan:
    delta = resolve_delta(config, units)
    fixed = _fixed_events(count_noise_multiplier)
    z = config.noise_multiplier or noise_for_target(
        config.epsilon,
        delta,
        lambda z: _run_event(z, sampling_rate, steps_per_round * rounds, fixed),
        config.accountant,
    )
    return DpPlan(
        mode=config.mode, noise_multiplier=z, clip=config.clip, delta=delta,
        sampling_rate=sampling_rate, steps_per_round=steps_per_round, rounds=rounds,
        accountant=config.accountant, units=units, count_noise_multiplier=count_noise_multiplier,
        population=population or f"{units:,} protected units",
        noise_seed_known=config.known_noise_seed is not None,
    )  # fmt: skip


@dataclass
class PrivacyGuard:
    """Accounts every release of one run and writes it to the ledger *before* it leaves (write-ahead:
    a crash between the two over-counts, never under-counts)."""

    plan: DpPlan
    ledger: Ledger
    dataset: str
    silos: tuple[str, ...]  # every silo whose units the releases touch
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, ε after it)

    def __post_init__(self) -> None:
        self._accountant = RunAccountant(self.plan.delta, self.plan.accountant)

    @classmethod
    def open(
        cls,
        plan: DpPlan,
        config: PrivacyConfig,
        dataset: str,
        silos: tuple[str, ...],
        run_id: str | None = None,
    ) -> PrivacyGuard:
        """Check the whole run's planned spend against every silo's budget, before any training."""
        ledger = Ledger(config.ledger_url or None)
        planned = plan.planned_epsilon()
        for silo in silos:
            balance = ledger.balance(silo, dataset)
            if balance.budget_epsilon is None:
                if config.budget <= 0:
                    raise BudgetExceededError(
                        f"no privacy budget is set for silo '{silo}' on '{dataset}': pass --budget "
                        "(or [privacy] budget), or set one with `fedshop privacy budget`"
                    )
                # δ budget: 1/n in all, so the runs' δ together stay meaningful.
                ledger.set_budget(silo, dataset, config.budget, 1.0 / plan.units)
            elif config.budget > 0 and abs(config.budget - balance.budget_epsilon) > 1e-12:
                raise BudgetExceededError(
                    f"silo '{silo}' on '{dataset}' already has the budget ε = "
                    f"{balance.budget_epsilon:g} in the ledger, not {config.budget:g}; a run cannot "
                    "change it (use `fedshop privacy budget`)"
                )
            ledger.check(silo, dataset, planned, plan.delta)
        guard = cls(plan, ledger, dataset, silos, **({"run_id": run_id} if run_id else {}))
        for position, event in enumerate(plan.fixed_events):
            guard.release(-len(plan.fixed_events) + position, event)
        return guard

    @classmethod
    def resume(
        cls,
        plan: DpPlan,
        config: PrivacyConfig,
        dataset: str,
        silos: tuple[str, ...],
        run_id: str,
        completed_rounds: int,
    ) -> PrivacyGuard:
        """The guard of an interrupted run, with its fixed releases and its first
        `completed_rounds` rounds composed again. The ledger keeps each run's largest ε, so writing
        the same cumulative values again changes nothing; the whole plan was checked against the
        budgets when the run opened (checking it again would count the spent part twice)."""
        guard = cls(plan, Ledger(config.ledger_url or None), dataset, silos, run_id=run_id)
        for position, event in enumerate(plan.fixed_events):
            guard.release(-len(plan.fixed_events) + position, event)
        for round_number in range(1, completed_rounds + 1):
            guard.release(round_number, plan.round_event)
        return guard

    def release(self, step: int, event: dpa.DpEvent) -> float:
        """Record the release (step, event) in the ledger, then in the accountant; returns ε after it.
        Call before the released value leaves; a BudgetExceededError means it must not leave."""
        after = self._accountant.epsilon_if(event)
        for silo in self.silos:
            self.ledger.record(
                self.run_id, silo, self.dataset, step, after, self.plan.delta,
                self.plan.unit, self.plan.accountant,
            )  # fmt: skip
        self._accountant.record(step, event)
        self.history.append((step, after))
        return after

    @property
    def epsilon(self) -> float:
        return self.history[-1][1] if self.history else 0.0

    def summary(self) -> PrivacySummary:
        return PrivacySummary(epsilon=self.epsilon, **self.plan.describe(), run_id=self.run_id)


@dataclass(frozen=True)
class PrivacySummary:
    """The `privacy` block of metrics.json: (ε, δ) and how they were reached; all None without DP."""

    epsilon: float | None = None  # the whole run's, from the accountant
    delta: float | None = None
    unit: str | None = None  # what one protected unit is
    mechanism: str | None = None
    accountant: str | None = None
    noise_multiplier: float | None = None
    clip: float | None = None
    sampling_rate: float | None = None
    sampling: str | None = None
    steps: int | None = None  # noisy steps over the run
    delta_population: str | None = None  # whom δ is sized to ("4,334 customers of all 11 silos")
    protected_units: int | None = None  # how many units that population has
    # True: the user gave [privacy] noise_seed, so anyone who knows it can remove the noise and the
    # run is not private whatever ε says.
    noise_seed_known: bool | None = None
    run_id: str | None = None  # the ledger's run
