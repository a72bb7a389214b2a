"""The deployment's outcome file: what the server knows at the end, written by the ServerApp and read
by `fedshop deploy` into the run folder. One schema for both ends."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors.torch import save

from fedshop.eval.metrics import MetricSums
from fedshop.fl.rounds import RoundRecord
from fedshop.models.spec import Params
from fedshop.privacy.dp import PrivacySummary
from fedshop.secure.protected_sum import ProtectionSummary
from fedshop.storage.private_files import write_private

OUTCOME_FILE = "outcome.json"
SHARED_FILE = "shared.safetensors"


@dataclass
class Outcome:
    history: list[RoundRecord]
    per_silo: dict[str, MetricSums]  # the final model's metric sums, after personalisation
    silo_names: list[str]
    privacy: PrivacySummary | None  # under DP
    protection: ProtectionSummary

    def write(self, folder: Path, shared: Params) -> None:
        """The outcome and the shared model into `folder` (the server's out-dir), owner-only: the
        silos' metric sums are theirs to show."""
        write_private(folder / SHARED_FILE, save({k: v.contiguous() for k, v in shared.items()}))
        data = {
            "history": [asdict(r) for r in self.history],
            "per_silo": {n: {"sums": s.sums, "users": s.users} for n, s in self.per_silo.items()},
            "silo_names": self.silo_names,
            "privacy": asdict(self.privacy) if self.privacy is not None else None,
            "protection": asdict(self.protection),
        }
        write_private(folder / OUTCOME_FILE, json.dumps(data, indent=1) + "\n")

    @classmethod
    def read(cls, folder: Path) -> Outcome:
        data = json.loads((folder / OUTCOME_FILE).read_text())
        return cls(
            history=[RoundRecord(**record) for record in data["history"]],
            per_silo={
                name: MetricSums(entry["sums"], entry["users"])
                for name, entry in data["per_silo"].items()
            },
            silo_names=list(data["silo_names"]),
            privacy=PrivacySummary(**data["privacy"]) if data["privacy"] else None,
            protection=ProtectionSummary(**data["protection"]),
        )
