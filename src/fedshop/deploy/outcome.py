"""The deployment's outcome file: what the server knows at the end, written by the ServerApp and read
by `fedshop deploy` into the run folder. One schema for both ends."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors.torch import save

from fedshop.config import RETAIL_TASKS
from fedshop.eval.fit_metrics import FitCounts, summarise_fit
from fedshop.eval.metrics import MetricSums
from fedshop.eval.tabular_metrics import BinaryCounts, ForecastSums, summarise_counts
from fedshop.fl.rounds import RoundRecord
from fedshop.models.spec import Params
from fedshop.privacy.dp import PrivacySummary
from fedshop.secure.protected_sum import ProtectionSummary
from fedshop.storage.private_files import write_private

OUTCOME_FILE = "outcome.json"
SHARED_FILE = "shared.safetensors"
FIT_COUNTS_FILE = "fit-counts.npz"  # a fit run's per-silo counts (arrays, not JSON)
TABLE_COUNTS_FILE = "table-counts.npz"  # a retail task's per-silo counts or sums


@dataclass
class Outcome:
    history: list[RoundRecord]
    # The final model's metric sums (a fit run's: `FitCounts`; a retail task's: `BinaryCounts`
    # or `ForecastSums`), after personalisation.
    per_silo: dict[str, MetricSums] | dict[str, FitCounts] | dict[str, TableCounts]
    silo_names: list[str]
    privacy: PrivacySummary | None  # under DP
    protection: ProtectionSummary
    task: str = "recommend"

    def write(self, folder: Path, shared: Params) -> None:
        """The outcome and the shared model into `folder` (the server's out-dir), owner-only: the
        silos' metric sums are theirs to show."""
        write_private(folder / SHARED_FILE, save({k: v.contiguous() for k, v in shared.items()}))
        data = {
            "task": self.task,
            "history": [asdict(r) for r in self.history],
            "per_silo": self._per_silo_data(folder),
            "silo_names": self.silo_names,
            "privacy": asdict(self.privacy) if self.privacy is not None else None,
            "protection": asdict(self.protection),
        }
        if self.task == "fit" and self.per_silo:
            data["summary"] = summarise_fit(self.per_silo)
        if self.task in RETAIL_TASKS and self.per_silo:
            data["summary"] = summarise_counts(self.per_silo)
        write_private(folder / OUTCOME_FILE, json.dumps(data, indent=1) + "\n")

    def _per_silo_data(self, folder: Path) -> dict:
        """A recommender's sums as JSON; a fit run's metrics per silo (auc_macro, ...) as JSON and
        its counts, which they come from, beside it; a retail task's the same way."""
        if self.task in RETAIL_TASKS:
            write_private(folder / TABLE_COUNTS_FILE, table_counts_npz(self.per_silo))
            return {name: counts.metrics() for name, counts in self.per_silo.items()}
        if self.task != "fit":
            return {n: {"sums": s.sums, "users": s.users} for n, s in self.per_silo.items()}
        write_private(folder / FIT_COUNTS_FILE, fit_counts_npz(self.per_silo))
        return {name: counts.means() for name, counts in self.per_silo.items()}

    @classmethod
    def read(cls, folder: Path) -> Outcome:
        data = json.loads((folder / OUTCOME_FILE).read_text())
        task = data.get("task", "recommend")
        if task == "fit":
            per_silo = read_fit_counts(folder)
        elif task in RETAIL_TASKS:
            per_silo = read_table_counts(folder)
        else:
            per_silo = read_sums(data["per_silo"])
        return cls(
            history=[RoundRecord(**record) for record in data["history"]],
            per_silo=per_silo,
            silo_names=list(data["silo_names"]),
            privacy=PrivacySummary(**data["privacy"]) if data["privacy"] else None,
            protection=ProtectionSummary(**data["protection"]),
            task=task,
        )


def fit_counts_npz(per_silo: dict[str, FitCounts]) -> bytes:
    """Per silo `<index>/confusion` and `<index>/histograms`, silo names in order in `names`."""
    arrays = {"names": np.asarray(list(per_silo), dtype=str)}
    for index, counts in enumerate(per_silo.values()):
        arrays.update({f"{index}/{k}": v for k, v in counts.to_arrays().items()})
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


TableCounts = BinaryCounts | ForecastSums


def table_counts_npz(per_silo: dict[str, TableCounts]) -> bytes:
    """Per silo `<index>/histogram` (a classifier's) or `<index>/sums` (absolute error, actual:
    a forecaster's), silo names in order in `names`."""
    arrays = {"names": np.asarray(list(per_silo), dtype=str)}
    for index, counts in enumerate(per_silo.values()):
        if isinstance(counts, BinaryCounts):
            arrays[f"{index}/histogram"] = counts.histogram
        else:
            arrays[f"{index}/sums"] = np.array([counts.absolute_error, counts.actual])
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def read_table_counts(folder: Path) -> dict[str, TableCounts]:
    path = folder / TABLE_COUNTS_FILE
    if not path.exists():
        return {}
    per_silo: dict[str, TableCounts] = {}
    with np.load(path, allow_pickle=False) as f:
        for index, name in enumerate(f["names"]):
            if f"{index}/histogram" in f.files:
                per_silo[str(name)] = BinaryCounts(f[f"{index}/histogram"])
            else:
                error, actual = f[f"{index}/sums"]
                per_silo[str(name)] = ForecastSums(float(error), float(actual))
    return per_silo


def read_sums(per_silo: dict) -> dict[str, MetricSums]:
    return {name: MetricSums(entry["sums"], entry["users"]) for name, entry in per_silo.items()}


def read_fit_counts(folder: Path) -> dict[str, FitCounts]:
    path = folder / FIT_COUNTS_FILE
    if not path.exists():  # under DP the server has none: each silo kept its own
        return {}
    with np.load(path, allow_pickle=False) as f:
        return {
            str(name): FitCounts(f[f"{i}/confusion"], f[f"{i}/histograms"])
            for i, name in enumerate(f["names"])
        }
