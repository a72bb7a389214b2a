"""`fedshop insight RUN_DIR`: each storefront of a finished run releases its counts under
differential privacy (`privacy/insight.py`), paid for in its privacy ledger, and the over-indexing
items per storefront are written to the run folder's `insight.json` (public).

Order of work, so that nothing leaves unpaid:
1. read the run folder's public files (metrics.json, data_report.json, catalogue.csv, serving.json)
   and check that every storefront's private history file is there;
2. read each storefront's own history file (a broken one stops the command before any spend);
3. calibrate the noise to the requested (ε, δ) and check every storefront's ledger: if any one
   would pass its budget, stop with an error naming it, before any count is computed;
4. per storefront: record the spend (write-ahead), then form its counts from its own histories
   only and release them with its own secret noise stream;
5. post-process the released values (lifts, intervals) and write insight.json.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedshop.choices import ACCOUNTANTS
from fedshop.errors import DataError, FedShopError
from fedshop.experiment import slug
from fedshop.privacy import insight as maths
from fedshop.privacy.dp import UNITS
from fedshop.seeding import NoiseStream
from fedshop.storage.ledger import BudgetExceededError, Ledger

INSIGHT = "insight.json"
INSIGHT_FORMAT = 1
MECHANISM = (
    "Gaussian mechanism on each storefront's (customers, per-item distinct customers) vector, "
    "each customer counting for at most max_items items"
)
INTERVAL_METHOD = (
    "delta method on log(lift) with the known Gaussian noise, on the measuring view of the "
    "release; items chosen on an independent view (Gaussian data fission)"
)


@dataclass(frozen=True)
class Storefront:
    name: str
    slug: str

    @property
    def history_file(self) -> str:
        return f"models/federated/silo-{self.slug}.customers.npz"


@dataclass(frozen=True)
class RunFolder:
    """What the insight reads of a run folder before any private file: all public."""

    path: Path
    dataset: str
    seed: int
    item_ids: list[str]
    item_names: list[str]
    storefronts: list[Storefront]
    population: int | None  # every silo's customers together (data_report.json), None: unknown


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def open_run_folder(run_dir: str | Path) -> RunFolder:
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise FedShopError(f"run folder {path} not found")
    if not (path / "metrics.json").is_file():
        raise FedShopError(f"{path} is not a finished run folder (no metrics.json)")
    metrics = _read_json(path / "metrics.json")
    report = _read_json(path / "data_report.json") if (path / "data_report.json").is_file() else {}
    if not (path / "catalogue.csv").is_file():
        raise FedShopError(f"{path} has no catalogue.csv: it was written by an older fedshop")
    catalogue = pd.read_csv(
        path / "catalogue.csv", dtype={"item_id": str, "name": str}, keep_default_na=False
    )
    silos_known = report.get("silos") or []
    if (path / "serving.json").is_file():
        names = [s["name"] for s in _read_json(path / "serving.json").get("silos", [])]
    else:
        names = [s["silo"] for s in silos_known]
    if not names:
        raise FedShopError(f"{path} names no storefronts (no serving.json or data_report.json)")
    counts = [s.get("customers") for s in silos_known]
    population = sum(counts) if counts and all(isinstance(c, int) for c in counts) else None
    storefronts = [Storefront(name, slug(name)) for name in names]
    missing = [s for s in storefronts if not (path / s.history_file).is_file()]
    if missing:
        raise FedShopError(
            f"{path} has no purchase histories for {', '.join(repr(s.name) for s in missing)} "
            f"({missing[0].history_file}): the run was written by an older fedshop; train it again"
        )
    return RunFolder(
        path=path,
        dataset=str(metrics.get("dataset", "")),
        seed=int(metrics.get("seed", 0) or 0),
        item_ids=catalogue["item_id"].astype(str).tolist(),
        item_names=catalogue["name"].astype(str).tolist(),
        storefronts=storefronts,
        population=population,
    )


def read_histories(run: RunFolder, storefront: Storefront) -> maths.Histories:
    """One storefront's private history file (owner-only), and nothing else."""
    path = run.path / storefront.history_file
    try:
        with np.load(path, allow_pickle=False) as data:
            histories = maths.Histories(
                customer_ids=np.asarray(data["customer_ids"]).astype(str),
                indptr=np.asarray(data["history_indptr"], dtype=np.int64),
                items=np.asarray(data["history_items"], dtype=np.int64),
            )
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    items = histories.items
    if items.size and (items.min() < 0 or items.max() >= len(run.item_ids)):
        raise DataError(f"{path} names items outside the catalogue of {len(run.item_ids)}")
    return histories


def resolve_delta(delta: float | None, population: int | None) -> tuple[float, str]:
    """(δ, whom it is sized to): given, or 1/(10·n) for the n customers of all storefronts, as
    record-level training sizes it; refused at δ ≥ 1/n (it would allow publishing one customer)."""
    if delta is None:
        if population is None:
            raise FedShopError(
                "the run folder does not say how many customers the storefronts have "
                "(data_report.json): pass --delta"
            )
        delta = 1.0 / (10 * population)
    if not 0 < delta < 1:
        raise FedShopError(f"--delta must be between 0 and 1 (exclusive), got {delta:g}")
    if population is None:
        return delta, "given with --delta (customer counts unknown)"
    if delta >= 1.0 / population:
        raise FedShopError(
            f"δ = {delta:.3g} is not below 1/n = {1 / population:.3g} for the n = {population:,} "
            "customers of all storefronts; such a δ allows releasing one customer's data outright"
        )
    return delta, f"{population:,} customers of all storefronts"


def _check_budgets(
    ledger: Ledger, run: RunFolder, epsilon: float, delta: float, budget: float | None
) -> None:
    """Every storefront's ledger must afford (ε, δ) before any count is computed. Budgets that
    `budget` supplies are written only once every storefront has passed."""
    budget_delta = 1.0 / run.population if run.population else 10 * delta
    unset = []
    for storefront in run.storefronts:
        balance = ledger.balance(storefront.name, run.dataset)
        if balance.budget_epsilon is not None:
            try:
                ledger.check(storefront.name, run.dataset, epsilon, delta)
            except BudgetExceededError as exc:
                message = str(exc).replace("the run plans", "the insight needs")
                raise BudgetExceededError(f"{message}; nothing was released") from None
            continue
        if budget is None:
            raise BudgetExceededError(
                f"no privacy budget is set for storefront '{storefront.name}' on '{run.dataset}': "
                "pass --budget, or set one with `fedshop privacy budget`; nothing was released"
            )
        if balance.spent_epsilon + epsilon > budget or balance.spent_delta + delta > budget_delta:
            raise BudgetExceededError(
                f"storefront '{storefront.name}' on '{run.dataset}': the insight needs "
                f"ε = {epsilon:.4g}, δ = {delta:.3g}, more than the --budget ε = {budget:g} "
                f"(δ = {budget_delta:.3g}) leaves after ε = {balance.spent_epsilon:.4g} spent; "
                "nothing was released"
            )
        unset.append(storefront)
    for storefront in unset:
        # The δ budget training gives a silo: 1/n in all, n every storefront's customers.
        ledger.set_budget(storefront.name, run.dataset, budget, budget_delta)


def _finite(value: float) -> float | None:
    """JSON has no infinity: an unbounded end (or a lift that could not be measured) is null."""
    return value if math.isfinite(value) else None


def _write_public(path: Path, document: dict) -> None:
    """insight.json is public (the page shows it); written whole under its name or not at all."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as f:
            f.write(json.dumps(document, indent=2) + "\n")
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def release_insight(
    run_dir: str | Path,
    epsilon: float = 1.0,
    delta: float | None = None,
    max_items: int = maths.DEFAULT_MAX_ITEMS,
    top: int = 10,
    ledger_url: str | None = None,
    noise_seed: int | None = None,
    accountant: str = "pld",
    budget: float | None = None,
) -> dict[str, Any]:
    """Release every storefront's counts, paid for in the ledger, and write insight.json; returns
    its content. Raises BudgetExceededError (nothing released, nothing written) when a storefront
    cannot afford it."""
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise FedShopError(f"--epsilon must be greater than 0, got {epsilon:g}")
    if max_items < 1:
        raise FedShopError(f"--max-items must be at least 1, got {max_items}")
    if top < 1:
        raise FedShopError(f"--top must be at least 1, got {top}")
    if noise_seed is not None and noise_seed < 1:
        raise FedShopError(f"--noise-seed must be a positive integer, got {noise_seed}")
    if budget is not None and not budget > 0:
        raise FedShopError(f"--budget must be greater than 0, got {budget:g}")
    ACCOUNTANTS.check(accountant, "--accountant")
    run = open_run_folder(run_dir)
    delta, population = resolve_delta(delta, run.population)
    noise_multiplier = maths.noise_multiplier_for(epsilon, delta, accountant)
    event = maths.gaussian_event(noise_multiplier)
    spent = maths.event_epsilon(event, delta, accountant)  # the accountant's ε, not the target
    # Each storefront's own file, read (and checked) before anything is spent: a broken file
    # stops the command with nothing charged. No count is formed before the ledger agrees.
    histories = [read_histories(run, storefront) for storefront in run.storefronts]
    ledger = Ledger(ledger_url)
    _check_budgets(ledger, run, spent, delta, budget)

    ledger_run = f"insight-{uuid.uuid4().hex}"
    releases = []
    for storefront, own in zip(run.storefronts, histories, strict=True):
        # Write-ahead: the spend is in the ledger before this storefront's counts exist.
        ledger.record(
            ledger_run, storefront.name, run.dataset, 0, spent, delta, UNITS["record"], accountant
        )
        release = maths.release_counts(
            own, run.item_ids, max_items, noise_multiplier,
            NoiseStream.of(noise_seed, "insight", storefront.slug), seed=run.seed,
        )  # fmt: skip
        if release.event != event:
            raise ValueError("the release's noise is not the one the ledger was charged for")
        releases.append(release)

    customers = np.array([r.customers for r in releases])
    counts = np.stack([r.item_counts for r in releases])
    scale = np.array([r.scale for r in releases])
    threshold = maths.listing_threshold(counts.size)
    # The fission's randomness is public (post-processing); fixed, so the file follows from the
    # released values.
    listed = maths.over_indexing(customers, counts, scale, top, threshold, seed=run.seed)
    document = {
        "format": INSIGHT_FORMAT,
        "dataset": run.dataset,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "epsilon": spent,
        "epsilon_requested": epsilon,
        "delta": delta,
        "delta_population": population,
        "accountant": accountant,
        "unit": UNITS["record"],
        "mechanism": MECHANISM,
        "max_items": max_items,
        "sensitivity": releases[0].sensitivity,
        "noise_multiplier": noise_multiplier,
        "sigma": float(scale[0]),
        "threshold_sigma": threshold,
        "interval": {"level": maths.INTERVAL_LEVEL, "method": INTERVAL_METHOD},
        "choosing_share": maths.CHOOSING_SHARE,
        "noise_seed_known": noise_seed is not None,
        "ledger_run_id": ledger_run,
        "customers": float(customers.sum()),
        "storefronts": [
            {
                "name": storefront.name,
                "slug": storefront.slug,
                "customers": float(release.customers),
                "sigma": release.scale,
                "items": [
                    {
                        "item_id": run.item_ids[entry.item],
                        "name": run.item_names[entry.item],
                        "count": entry.count,
                        "lift": _finite(entry.lift),
                        "interval": [_finite(entry.interval[0]), _finite(entry.interval[1])],
                        "chosen_lift": _finite(entry.chosen_lift),
                    }
                    for entry in entries
                ],
            }
            for storefront, release, entries in zip(run.storefronts, releases, listed, strict=True)
        ],
    }
    _write_public(run.path / INSIGHT, document)
    return document
