"""A vertical run's configuration: TOML ⇄ typed settings, checked once, with errors that name the key.

seed = 1
[scenario]                # which real customers each party holds (`scenario.py`)
fractions = [0.3, 0.4, 0.3]   # A (platform only), B (both), C (partner only)
feature_holders = 1       # 2: the partner's columns split over two holders (body, profile)
max_customers = 0         # 0: every customer; else a seeded sample of customers
[psi]                     # `fedshop.secure.psi`
protocol = "rr22"         # rr22 | kkrt | ecdh (spu), openmined (simulator and benchmark only)
reveal_to = "both"        # both | label
timeout = 120.0
[split]                   # `split_learning.Plan`: any of its fields
rounds = 40
[protection]              # the cut's protection, measured against the attacks
gradient_clip = 0.0       # 0: off
gradient_noise = 0.0
activation_clip = 0.0
activation_noise = 0.0
[data]
dir = ""                  # else $FEDSHOP_DATA_DIR, else the cache
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import tomli_w

from fedshop.errors import FedShopError

PSI_PROTOCOLS = ("rr22", "kkrt", "ecdh", "openmined")
_PROTECTION = ("gradient_clip", "gradient_noise", "activation_clip", "activation_noise")


class VerticalConfigError(FedShopError):
    """A vertical configuration that cannot run, with the key that is wrong."""


@dataclass(frozen=True)
class ScenarioSettings:
    fractions: tuple[float, float, float] = (0.3, 0.4, 0.3)
    feature_holders: int = 1
    max_customers: int = 0


@dataclass(frozen=True)
class PsiSettings:
    protocol: str = "rr22"
    reveal_to: str = "both"
    timeout: float = 120.0


@dataclass(frozen=True)
class VerticalConfig:
    seed: int = 1
    scenario: ScenarioSettings = field(default_factory=ScenarioSettings)
    psi: PsiSettings = field(default_factory=PsiSettings)
    split: dict = field(default_factory=dict)  # Plan fields set in the config
    data_dir: str = ""

    @property
    def plan(self):
        from fedshop.vertical.split_learning import Plan

        return Plan.from_dict({**self.split, "seed": self.seed})

    def to_toml(self) -> str:
        data = {
            "seed": self.seed,
            "scenario": {**asdict(self.scenario), "fractions": list(self.scenario.fractions)},
            "psi": asdict(self.psi),
            "split": {k: v for k, v in self.split.items() if k not in _PROTECTION},
            "protection": {k: v for k, v in self.split.items() if k in _PROTECTION},
            "data": {"dir": self.data_dir},
        }
        data = {k: v for k, v in data.items() if v != {}}
        return tomli_w.dumps(data)


def load_vertical_config(path: Path | None, overrides: dict | None = None) -> VerticalConfig:
    """The config at `path` (defaults when None) with `overrides` ("psi.protocol": value, …; None
    values ignored) applied, checked."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise VerticalConfigError(f"config file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise VerticalConfigError(f"cannot read config {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise VerticalConfigError(f"{path} is not valid TOML: {exc}") from None
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, name = key.rpartition(".")
        target = data.setdefault(section, {}) if section else data
        target[name] = value
    return config_from_dict(data)


def config_from_dict(data: dict) -> VerticalConfig:
    known = {"seed", "scenario", "psi", "split", "protection", "data"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise VerticalConfigError(f"unknown setting(s) {unknown}; known: {sorted(known)}")
    seed = _int(data.get("seed", 1), "seed")
    scenario = _section(data, "scenario", ScenarioSettings)
    fractions = tuple(float(f) for f in scenario.fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-9:
        raise VerticalConfigError(
            "scenario.fractions must be three shares (A platform only, B both, C partner only) "
            f"that are not negative and sum to 1, got {list(scenario.fractions)}"
        )
    if fractions[1] == 0:
        raise VerticalConfigError("scenario.fractions: B (customers of both) must not be 0")
    if scenario.feature_holders not in (1, 2):
        raise VerticalConfigError(
            f"scenario.feature_holders must be 1 or 2, got {scenario.feature_holders}"
        )
    if scenario.max_customers < 0:
        raise VerticalConfigError("scenario.max_customers must be 0 (all) or positive")
    scenario = replace(scenario, fractions=fractions)
    psi = _section(data, "psi", PsiSettings)
    if psi.protocol not in PSI_PROTOCOLS:
        raise VerticalConfigError(
            f"psi.protocol must be one of {', '.join(PSI_PROTOCOLS)}, got {psi.protocol!r}"
        )
    if psi.reveal_to not in ("both", "label"):
        raise VerticalConfigError(f"psi.reveal_to must be both or label, got {psi.reveal_to!r}")
    if psi.timeout <= 0:
        raise VerticalConfigError("psi.timeout must be positive (seconds)")
    split = dict(data.get("split", {}))
    protection = dict(data.get("protection", {}))
    wrong = sorted(set(protection) - set(_PROTECTION))
    if wrong:
        raise VerticalConfigError(f"unknown protection setting(s) {wrong}; known: {_PROTECTION}")
    clash = sorted(set(split) & set(_PROTECTION))
    if clash:
        raise VerticalConfigError(f"{clash} belong in [protection], not [split]")
    if "seed" in split:
        raise VerticalConfigError("the seed is set at the top of the config, not in [split]")
    config = VerticalConfig(
        seed=seed,
        scenario=scenario,
        psi=psi,
        split={**split, **protection},
        data_dir=str(data.get("data", {}).get("dir", "")),
    )
    try:
        plan = config.plan
    except FedShopError as exc:
        raise VerticalConfigError(f"[split]/[protection]: {exc}") from None
    except TypeError as exc:
        raise VerticalConfigError(f"[split]/[protection]: {exc}") from None
    for name in _PROTECTION:
        if getattr(plan, name) < 0:
            raise VerticalConfigError(f"protection.{name} must not be negative")
    return config


def _section(data: dict, name: str, cls):
    raw = data.get(name, {})
    if not isinstance(raw, dict):
        raise VerticalConfigError(f"[{name}] must be a table")
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise VerticalConfigError(f"unknown setting(s) {name}.{unknown}; known: {sorted(names)}")
    values = {}
    for key, value in raw.items():
        default = getattr(cls(), key)
        try:
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif isinstance(default, float):
                ok = isinstance(value, int | float) and not isinstance(value, bool)
                value = float(value)
            elif isinstance(default, tuple):
                ok = isinstance(value, list | tuple)
                value = tuple(value)
            else:
                ok = isinstance(value, str)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise VerticalConfigError(
                f"{name}.{key} must be {type(default).__name__}, got {value!r}"
            )
        values[key] = value
    return cls(**values)


def _int(value, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise VerticalConfigError(f"{key} must be an integer, got {value!r}")
    return value
