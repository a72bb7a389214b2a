"""The deployment's outcome file: what the server knows at the end, written by the ServerApp and read
by `fedshop deploy` into the run folder. One schema for both ends."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors.torch import save

from fedshop.eval.fit_metrics import FitCounts, summarise_fit
from fedshop.eval.metrics import MetricSums
from fedshop.fl.rounds import RoundRecord
from fedshop.models.spec import Params
from fedshop.privacy.dp import PrivacySummary
from fedshop.secure.protected_sum import ProtectionSummary
from fedshop.storage.private_files import write_private

OUTCOME_FILE = "outcome.json"
SHARED_FILE = "shared.safetensors"
FIT_COUNTS_FILE = "fit-counts.npz"  # a fit run's per-silo counts (arrays, not JSON)


@dataclass
class Outcome:
    history: list[RoundRecord]
    # The final model's metric sums (a fit run's: `FitCounts`), after personalisation.
    per_silo: dict[str, MetricSums] | dict[str, FitCounts]
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
        write_private(folder / OUTCOME_FILE, json.dumps(data, indent=1) + "\n")

    def _per_silo_data(self, folder: Path) -> dict:
        """A recommender's sums as JSON; a fit run's metrics per silo (auc_macro, ...) as JSON and
        its counts, which they come from, beside it."""
        if self.task != "fit":
            return {n: {"sums": s.sums, "users": s.users} for n, s in self.per_silo.items()}
        write_private(folder / FIT_COUNTS_FILE, fit_counts_npz(self.per_silo))
        return {name: counts.means() for name, counts in self.per_silo.items()}

    @classmethod
    def read(cls, folder: Path) -> Outcome:
        data = json.loads((folder / OUTCOME_FILE).read_text())
        task = data.get("task", "recommend")
        return cls(
            history=[RoundRecord(**record) for record in data["history"]],
            per_silo=read_fit_counts(folder) if task == "fit" else read_sums(data["per_silo"]),
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
