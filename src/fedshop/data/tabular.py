"""Tables for the retail tasks beyond recommendation (demand, returns, fraud): one silo's rows as
model inputs, the same layout for every task, so one federated trainer carries all three.

Numeric features are fixed transforms of a silo's own rows (log1p, ratios, counts over the silo's own
past): no statistic pooled across silos, none computed over held-out rows, so nothing of another silo
or of the test period reaches a silo's training inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedshop.errors import DataError

# What a model predicts: a binary label's probability, or quantiles of h future values.
KINDS = ("binary", "quantile")


@dataclass
class TabularPart:
    """One silo's rows of one split."""

    categorical: np.ndarray  # int64 (n, c): codes into the dataset's vocabularies, 0 = unknown
    numeric: np.ndarray  # float32 (n, d)
    target: np.ndarray  # float32 (n,) labels in {0, 1}, or (n, h) future values (scaled)
    # Per row, what the task needs to turn predictions back into its own terms (demand: the
    # series id and the scale that `target` was divided by); empty for classification.
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.target)
        self.categorical = _rows(self.categorical, np.int64, n)
        self.numeric = _rows(self.numeric, np.float32, n)
        self.target = np.ascontiguousarray(self.target, dtype=np.float32)
        for name, values in self.extra.items():
            if len(values) != n:
                raise DataError(f"{name}: {len(values)} values for {n} rows")
        if not np.isfinite(self.numeric).all():
            raise DataError("a numeric feature is not finite")

    def __len__(self) -> int:
        return len(self.target)

    def take(self, rows: np.ndarray) -> TabularPart:
        return TabularPart(
            self.categorical[rows], self.numeric[rows], self.target[rows],
            {k: v[rows] for k, v in self.extra.items()},
        )  # fmt: skip

    @staticmethod
    def concat(parts: list[TabularPart]) -> TabularPart:
        extra_names = parts[0].extra.keys() if parts else ()
        return TabularPart(
            np.concatenate([p.categorical for p in parts]),
            np.concatenate([p.numeric for p in parts]),
            np.concatenate([p.target for p in parts]),
            {k: np.concatenate([p.extra[k] for p in parts]) for k in extra_names},
        )


def _rows(values: np.ndarray, dtype, n: int) -> np.ndarray:
    """`values` as n rows; an empty part keeps its column count (reshape(0, -1) cannot infer it)."""
    array = np.ascontiguousarray(values, dtype=dtype)
    width = array.shape[1] if array.ndim == 2 else (array.size // n if n else 0)
    return array.reshape(n, width)


@dataclass
class TabularSilo:
    index: int
    name: str
    train: TabularPart
    test: TabularPart


@dataclass
class TabularDataset:
    name: str
    kind: str  # one of KINDS
    silos: list[TabularSilo]
    categorical_names: list[str]
    cardinalities: list[int]  # per categorical column, codes are < cardinality
    numeric_names: list[str]
    horizon: int = 1  # quantile: the number of future values per row
    report: dict = field(default_factory=dict)  # how the table was built: counts, rules, source

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"kind {self.kind!r}: expected one of {KINDS}")
        for silo in self.silos:
            for part in (silo.train, silo.test):
                if part.categorical.shape[1] != len(self.cardinalities):
                    raise DataError(f"{silo.name}: categorical columns do not match")
                if part.numeric.shape[1] != len(self.numeric_names):
                    raise DataError(f"{silo.name}: numeric columns do not match")
                if len(part) and (part.categorical.max(0) >= self.cardinalities).any():
                    raise DataError(f"{silo.name}: a categorical code is out of its vocabulary")

    @property
    def n_silos(self) -> int:
        return len(self.silos)

    @property
    def silo_names(self) -> list[str]:
        return [s.name for s in self.silos]

    def pooled(self, split: str) -> TabularPart:
        return TabularPart.concat([getattr(s, split) for s in self.silos])
