"""Privacy accounting with Google's `dp-accounting`: no home-made formulas.

Every differentially private release in FedShop is described as a `DpEvent` (what was released, with
which noise, under which sampling) and composed in an accountant, which turns the history into (ε, δ):
- RDP (Rényi DP; Mironov 2017, with the tight conversion of Balle et al. 2020) and
- PLD (privacy loss distributions; Koskela et al. 2020, Doroshenko et al. 2022), usually tighter.
The protected unit (a record, a shopper, a silo) is not the accountant's business: it is fixed by what
one unit can change, i.e. by where the clipping happens, and is reported beside ε.

Training events: DP-SGD / DP-FedAvg with Poisson sampling at rate q, each step
`PoissonSampled(q, Gaussian(z))`, under add-or-remove-one adjacency. (Fixed-size sampling, "k clients
per round", needs replace-one adjacency, which these accountants handle differently: not yet offered.)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import dp_accounting as dpa
from dp_accounting import mechanism_calibration, pld, rdp

from fedshop.choices import ACCOUNTANTS
from fedshop.errors import ConfigError


class _QuietRdpOrders(logging.Filter):
    """dp-accounting logs a warning each time it drops an RDP order whose series did not converge;
    dropping it is correct (ε stays an upper bound), and a run would print hundreds of them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietRdpOrders())
# PLD discretisation: finer than the library default so that ε is within about 1% of the exact value.
_PLD_DISCRETIZATION = 1e-4


def make_accountant(kind: str) -> dpa.PrivacyAccountant:
    return ACCOUNTANTS.get(kind)()


def rdp_accountant() -> dpa.PrivacyAccountant:
    return rdp.RdpAccountant()


def pld_accountant() -> dpa.PrivacyAccountant:
    return pld.PLDAccountant(value_discretization_interval=_PLD_DISCRETIZATION)


def gaussian_step(noise_multiplier: float, sampling_rate: float = 1.0) -> dpa.DpEvent:
    """One Gaussian release of a clipped sum with noise std = noise_multiplier × clip, where each unit
    takes part independently with probability `sampling_rate` (Poisson sampling; 1.0 = everyone)."""
    if noise_multiplier <= 0:
        raise ValueError("noise_multiplier must be positive")
    gaussian = dpa.GaussianDpEvent(noise_multiplier)
    if sampling_rate >= 1.0:
        return gaussian
    return dpa.PoissonSampledDpEvent(sampling_rate, gaussian)


def repeated(event: dpa.DpEvent, times: int) -> dpa.DpEvent:
    return dpa.SelfComposedDpEvent(event, times)


def together(events: Sequence[dpa.DpEvent]) -> dpa.DpEvent | None:
    """The composition of `events` as one event: n equal events as one self-composition (what
    the accountant composes fastest), none as None."""
    if not events:
        return None
    if all(e == events[0] for e in events):
        return events[0] if len(events) == 1 else repeated(events[0], len(events))
    return dpa.ComposedDpEvent(list(events))


# Events as plain data, for a message between parties (a silo says what noise it added).
_EVENT_FIELDS = {
    "GaussianDpEvent": ("noise_multiplier",),
    "PoissonSampledDpEvent": ("sampling_probability", "event"),
    "SelfComposedDpEvent": ("event", "count"),
    "ComposedDpEvent": ("events",),
}


def event_to_data(event: dpa.DpEvent) -> dict:
    kind = type(event).__name__
    if kind not in _EVENT_FIELDS:
        raise ValueError(f"cannot send a {kind}")
    out: dict = {"kind": kind}
    for name in _EVENT_FIELDS[kind]:
        value = getattr(event, name)
        if name == "event":
            value = event_to_data(value)
        elif name == "events":
            value = [event_to_data(e) for e in value]
        out[name] = value
    return out


def event_from_data(data: dict) -> dpa.DpEvent:
    kind = data.get("kind")
    if kind not in _EVENT_FIELDS:
        raise ValueError(f"not a DP event: {kind!r}")
    fields = {}
    for name in _EVENT_FIELDS[kind]:
        value = data[name]
        if name == "event":
            value = event_from_data(value)
        elif name == "events":
            value = [event_from_data(e) for e in value]
        fields[name] = value
    return getattr(dpa, kind)(**fields)


def compose(accountant: dpa.PrivacyAccountant, event: dpa.DpEvent) -> None:
    if not accountant.supports(event):
        raise ConfigError(
            f"the {type(accountant).__name__} cannot account this release ({type(event).__name__})"
        )
    accountant.compose(event)


def epsilon(event: dpa.DpEvent, delta: float, kind: str = "rdp") -> float:
    """ε of `event` at δ, by the named accountant."""
    accountant = make_accountant(kind)
    compose(accountant, event)
    return float(accountant.get_epsilon(delta))


def noise_for_epsilon(
    target_epsilon: float,
    delta: float,
    steps: int,
    sampling_rate: float = 1.0,
    kind: str = "rdp",
) -> float:
    """The smallest noise multiplier z with ε(`steps` Gaussian steps at rate q, δ) ≤ target."""
    return noise_for_target(
        target_epsilon, delta, lambda z: repeated(gaussian_step(z, sampling_rate), steps), kind
    )


def noise_for_target(
    target_epsilon: float,
    delta: float,
    event_for: Callable[[float], dpa.DpEvent],
    kind: str = "rdp",
) -> float:
    """The smallest noise multiplier z with ε(event_for(z), δ) ≤ target: `event_for` builds the whole
    run's releases (training steps, and any fixed-noise releases composed with them)."""
    if target_epsilon <= 0:
        raise ConfigError(f"target ε must be positive, got {target_epsilon}")
    # The search must not try z = 0 (no noise is no mechanism); it widens upwards from 1.
    bracket = mechanism_calibration.LowerEndpointAndGuess(1e-2, 1.0)
    if kind == "pld":
        # PLDs of tiny z take minutes at our discretisation; RDP's answer is an upper bound (PLD is
        # never looser), so search below it, halving until PLD's ε is over the target.
        upper = noise_for_target(target_epsilon, delta, event_for, "rdp")
        lower = upper / 2
        while lower > 1e-3 and epsilon(event_for(lower), delta, "pld") <= target_epsilon:
            upper, lower = lower, lower / 2
        bracket = mechanism_calibration.ExplicitBracketInterval(lower, upper)
    try:
        return float(
            dpa.calibrate_dp_mechanism(
                lambda: make_accountant(kind), event_for, target_epsilon, delta,
                bracket_interval=bracket,
            )
        )  # fmt: skip
    except mechanism_calibration.NoBracketIntervalFoundError:
        raise ConfigError(
            f"no noise level reaches ε = {target_epsilon:g} at δ = {delta:.3g}: the run's other "
            "releases (e.g. released counts) already spend more; raise ε or their noise"
        ) from None


@dataclass
class Release:
    """One release as the accountant saw it (round number, event), kept for the report."""

    step: int
    event: dpa.DpEvent


@dataclass
class RunAccountant:
    """The running (ε, δ) of one training run: compose each release as it happens."""

    delta: float
    kind: str = "rdp"
    entries: list[Release] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._accountant = make_accountant(self.kind)
        # (event, accountant state after it) from the last `epsilon_if`, reused by `record`
        self._trial: tuple[dpa.DpEvent, dpa.PrivacyAccountant] | None = None

    def record(self, step: int, event: dpa.DpEvent) -> None:
        if self._trial is not None and self._trial[0] is event:
            self._accountant = self._trial[1]  # the state `epsilon_if` just computed for it
        else:
            compose(self._accountant, event)
        self.entries.append(Release(step, event))
        self._trial = None

    def epsilon(self) -> float:
        return float(self._accountant.get_epsilon(self.delta)) if self.entries else 0.0

    def epsilon_if(self, event: dpa.DpEvent) -> float:
        """ε after one more `event`, without recording it (to refuse a release before it happens)."""
        # A copy of the composed state (RDP orders or a PLD), not a re-composition of the history:
        # composing a Poisson-subsampled step costs about 0.1 s, and runs have hundreds of releases.
        trial = copy.deepcopy(self._accountant)
        compose(trial, event)
        self._trial = (event, trial)
        return float(trial.get_epsilon(self.delta))
