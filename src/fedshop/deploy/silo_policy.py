"""What a silo accepts, decided by the silo: its policy file and its own privacy ledger.

Every protection setting of a task comes from the coordinator (the DP plan, the SecAgg setup). A silo
does not take them on trust: before it trains it checks the task against its **policy** (a TOML file
beside its data file, `silo-<i>.policy.toml`), and before an update leaves it records the release in
its **own ledger** (a SQLite file in its state folder), which refuses a release that would take the
silo past its total budget, whatever the server's ledger says. A refusal is an error reply whose
reason the server logs; the silo prints it in its own log too.

The silo's ledger composes every DP release it ever made on its data (all runs together) with the
accountant, at the policy's δ: it trusts no run id the coordinator could reuse. A release that is
byte for byte one it already made (a restarted server asking for the same round again) is free: it
tells nothing new.
"""

from __future__ import annotations

import json
import math
import sqlite3
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from fedshop.errors import FedShopError
from fedshop.storage.private_files import open_private_append

if TYPE_CHECKING:
    from fedshop.privacy.dp import DpPlan
    from fedshop.secure.secagg import RoundSetup

POLICY_SUFFIX = ".policy.toml"
LEDGER_FILE = "privacy-ledger.sqlite"


class PolicyError(FedShopError):
    """A task below the silo's policy, a release past its budget, or a policy file that is wrong."""


def policy_path(silo_data: Path) -> Path:
    """The policy file beside a silo's data file: silo-3.npz → silo-3.policy.toml."""
    return Path(silo_data).with_suffix(POLICY_SUFFIX)


@dataclass(frozen=True)
class SiloPolicy:
    require_secagg: bool = False  # refuse a task whose update would leave unmasked
    min_secagg_threshold: int = 2  # refuse a SecAgg round whose Shamir threshold is lower
    require_dp: bool = False  # refuse a task without record-level DP
    min_noise_multiplier: float = 0.0  # refuse a DP plan with less noise
    max_delta: float = 1e-5  # refuse a DP plan with a larger δ
    max_epsilon_per_run: float = 0.0  # refuse a plan whose whole run exceeds it (0: no DP task)
    budget_epsilon: float = 0.0  # ε of all releases on this data, all runs together (0: none)

    def __post_init__(self) -> None:
        numbers = {
            f.name: getattr(self, f.name) for f in fields(self) if f.type in ("float", "int")
        }
        for name, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise PolicyError(f"policy: {name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise PolicyError(f"policy: {name} must be a finite number ≥ 0, got {value}")
        if not 0 < self.max_delta < 1:
            raise PolicyError(f"policy: max_delta must be in (0, 1), got {self.max_delta}")

    @classmethod
    def read(cls, path: Path) -> SiloPolicy:
        if not Path(path).is_file():
            raise PolicyError(
                f"no policy file {path}: a silo states what it accepts beside its data "
                "(`fedshop deploy silo-data` writes one to edit)"
            )
        try:
            table = tomllib.loads(Path(path).read_text()).get("policy", {})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise PolicyError(f"cannot read the policy file {path}: {exc}") from None
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(table) - set(known))
        if unknown:
            raise PolicyError(f"{path}: unknown policy settings {unknown}; known: {sorted(known)}")
        for name, value in table.items():
            if (known[name].type == "bool") != isinstance(value, bool):
                raise PolicyError(f"{path}: {name} = {value!r} is not a {known[name].type}")
        return cls(**table)

    def to_toml(self) -> str:
        lines = [
            "# What this silo accepts, whatever the coordinator asks: every task is checked against",
            "# it before training, every DP release against budget_epsilon in the silo's own ledger.",
            "[policy]",
        ]
        for f in fields(self):
            value = getattr(self, f.name)
            text = ("true" if value else "false") if isinstance(value, bool) else repr(value)
            lines.append(f"{f.name} = {text}")
        return "\n".join(lines) + "\n"

    def check_task(self, plan: DpPlan | None, secagg: RoundSetup | None) -> None:
        """Refuse, before any training, a task that protects this silo's data less than it asks."""
        if self.require_secagg and secagg is None:
            raise PolicyError("the silo's policy requires secure aggregation; the task has none")
        if secagg is not None and secagg.threshold < self.min_secagg_threshold:
            raise PolicyError(
                f"the round's SecAgg threshold {secagg.threshold} is below the silo's minimum "
                f"{self.min_secagg_threshold}"
            )
        if plan is None:
            if self.require_dp:
                raise PolicyError("the silo's policy requires record-level DP; the task has none")
            return
        if plan.mode != "record":
            raise PolicyError(f"a silo trains with record-level DP, not {plan.mode!r}")
        if self.require_dp and plan.noise_seed_known:
            raise PolicyError(
                "the task's noise comes from a seed the coordinator knows: not private"
            )
        if plan.noise_multiplier < self.min_noise_multiplier:
            raise PolicyError(
                f"the task's noise multiplier {plan.noise_multiplier:.4g} is below the silo's "
                f"minimum {self.min_noise_multiplier:.4g}"
            )
        if plan.delta > self.max_delta:
            raise PolicyError(
                f"the task's δ = {plan.delta:.3g} is above the silo's maximum {self.max_delta:.3g}"
            )
        # The silo's own accountant on the plan's parameters, not the ε the server states.
        planned = plan.planned_epsilon()
        if planned > self.max_epsilon_per_run * (1 + 1e-9):
            raise PolicyError(
                f"the task's plan spends ε = {planned:.4g} over the run; the silo accepts at most "
                f"{self.max_epsilon_per_run:.4g} per run"
            )


class SiloLedger:
    """The silo's own record of its DP releases, in a file only its user can read."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        open_private_append(self.path).close()  # owner-only from creation
        self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS releases (digest TEXT PRIMARY KEY, event TEXT NOT NULL, "
            "epsilon REAL NOT NULL, recorded_at TEXT DEFAULT CURRENT_TIMESTAMP)"
        )

    def spend(self, digest: str, event, policy: SiloPolicy, accountant: str = "rdp") -> float:
        """Record the release `digest` (with its DP event) before it leaves; refuse it when all the
        silo's releases together would pass the policy's budget. Returns ε after it."""
        from fedshop.privacy.accounting import epsilon, event_from_data, event_to_data, together

        self._db.execute("BEGIN IMMEDIATE")  # check and spend as one: concurrent runs queue here
        try:
            done = self._db.execute(
                "SELECT epsilon FROM releases WHERE digest = ?", (digest,)
            ).fetchone()
            if done is not None:
                self._db.execute("COMMIT")
                return float(done[0])
            rows = self._db.execute("SELECT event FROM releases").fetchall()
            events = [event_from_data(json.loads(r[0])) for r in rows] + [event]
            after = epsilon(together(events), policy.max_delta, accountant)
            if after > policy.budget_epsilon * (1 + 1e-9):
                raise PolicyError(
                    f"this release would bring the silo's own ledger to ε = {after:.4g} at "
                    f"δ = {policy.max_delta:.3g}, past its budget {policy.budget_epsilon:.4g} "
                    f"({len(rows)} releases so far); nothing was released"
                )
            self._db.execute(
                "INSERT INTO releases (digest, event, epsilon) VALUES (?, ?, ?)",
                (digest, json.dumps(event_to_data(event)), after),
            )
            self._db.execute("COMMIT")
            return after
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def releases(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM releases").fetchone()[0])
