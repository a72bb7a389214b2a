"""Split learning between one label holder and N feature holders, in few large exchanges.

Each feature holder runs a bottom model over its own columns and sends cut-layer activations, one row
per customer; the label holder runs its own bottom model over its columns, a top model over all of
them, and sends back the gradient of its loss with respect to each activation row. Labels are per
rental and activations per customer, so a customer's gradient row is the sum over their training
rentals. Nothing else crosses the cut.

Messages are `dict[str, numpy.ndarray]` (scalars as 0-d arrays; numbers only). After PSI both sides
hold the same sorted list of aligned customer ids, and messages name customers by int64 positions in
it, never by id. Kinds a feature holder handles:
- "setup"    {n_aligned}                                  → {activation_dim, n_aligned}
- "forward"  {positions}                                  → {positions, activations}
- "backward" {positions, gradients[, next_positions]}     → {positions, activations} of the next
             positions, or {} (the update and the next forward in one exchange)
- "predict"  {positions}                                  → {positions, activations}, no state change
A feature holder may be a fresh process at every message: its state round-trips through `save` and
`load` (safetensors and json, no pickle).

Exchanges are the expensive part of a deployment (a process start each), so training is full-batch
over the aligned customers and block-coordinate (FedBCD, Liu et al. 2022): per exchange the label
holder takes `top_epochs` local epochs of mini-batch steps on its top and bottom models with the
activations it holds, then sends the cut gradients; each feature holder takes `bottom_steps` Adam
steps on them. The default run is 2 + `rounds` exchanges.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedshop.errors import FedShopError
from fedshop.eval.auc import macro_auc
from fedshop.seeding import NoiseStream, derive_seed, torch_generator
from fedshop.vertical.scenario import Columns, temporal_test_mask

Message = dict[str, np.ndarray]


class SplitProtocolError(FedShopError):
    """A message across the cut is malformed, out of range, or not what was asked for."""


@dataclass(frozen=True)
class Plan:
    """Everything both sides must agree on (JSON-able: it travels in a deployment's config)."""

    activation_dim: int = 16  # width of every bottom model's output (the cut layer)
    hidden: int = 64
    embedding_dim: int = 8
    rounds: int = 40  # backward+forward exchanges; the run has 2 + rounds exchanges in all
    top_epochs: int = 1  # label holder's local epochs per exchange
    final_epochs: int = 1  # label holder's epochs on the last activations, before evaluation
    batch_size: int = 4096
    top_lr: float = 2e-3
    bottom_lr: float = 1e-2
    bottom_steps: int = 4  # feature holder's Adam steps per received gradient (FedBCD)
    weight_decay: float = 1e-5
    dropout: float = 0.1
    test_fraction: float = 0.2  # latest rentals by time, the label holder's test set
    seed: int = 0
    # Label protection (label holder → feature holders): each customer's gradient row clipped to
    # `gradient_clip` (L2), then N(0, (gradient_noise · gradient_clip)²) noise on each coordinate.
    gradient_clip: float = 0.0  # 0: off
    gradient_noise: float = 0.0
    # Feature protection (feature holder → label holder), the same on each activation row.
    activation_clip: float = 0.0
    activation_noise: float = 0.0
    noise_seed: int | None = None  # None: secret noise (a NoiseStream from the OS)
    delta: float = 1e-5

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(data: Mapping) -> Plan:
        known = {f.name for f in fields(Plan)}
        unknown = set(data) - known
        if unknown:
            raise SplitProtocolError(f"unknown plan settings {sorted(unknown)}")
        return Plan(**dict(data))


# ---------------------------------------------------------------- encoding (each party's own business)


@dataclass(frozen=True)
class Encoding:
    """Numeric columns standardised with the fitting rows' mean and std (missing → 0 plus a missing
    flag); categorical values → indices, 0 for missing or unseen."""

    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    vocab: dict[str, list[str]]

    @staticmethod
    def fit(frame: pd.DataFrame, columns: Columns) -> Encoding:
        mean, std = [], []
        for c in columns.numeric:
            values = frame[c].to_numpy(np.float64)
            ok = values[np.isfinite(values)]
            mean.append(float(ok.mean()) if len(ok) else 0.0)
            std.append(float(ok.std()) if len(ok) > 1 and ok.std() > 0 else 1.0)
        vocab = {c: sorted(set(_strings(frame[c]).dropna())) for c in columns.categorical}
        return Encoding(columns.numeric, columns.categorical, tuple(mean), tuple(std), vocab)

    def transform(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        n = len(frame)
        numeric = np.zeros((n, 2 * len(self.numeric)), dtype=np.float32)
        for j, c in enumerate(self.numeric):
            values = frame[c].to_numpy(np.float64)
            missing = ~np.isfinite(values)
            numeric[:, j] = np.where(missing, 0.0, (values - self.mean[j]) / self.std[j])
            numeric[:, len(self.numeric) + j] = missing
        codes = np.zeros((n, len(self.categorical)), dtype=np.int64)
        for j, c in enumerate(self.categorical):
            index = pd.Index(self.vocab[c])
            found = index.get_indexer(_strings(frame[c]).fillna("\x00"))
            codes[:, j] = found + 1  # -1 (missing or unseen) → 0
        return numeric, codes

    @property
    def cardinalities(self) -> list[int]:
        return [len(self.vocab[c]) + 1 for c in self.categorical]

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(data: Mapping) -> Encoding:
        return Encoding(
            tuple(data["numeric"]),
            tuple(data["categorical"]),
            tuple(data["mean"]),
            tuple(data["std"]),
            {k: list(v) for k, v in data["vocab"].items()},
        )


def _strings(series: pd.Series) -> pd.Series:
    return series.astype("string").astype(object).where(series.notna())


# ---------------------------------------------------------------- models


class Bottom(nn.Module):
    """Embeddings of the categorical columns and the numeric ones → MLP → the cut layer."""

    def __init__(self, n_numeric: int, cardinalities: Sequence[int], plan: Plan) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(k, plan.embedding_dim) for k in cardinalities)
        width = n_numeric + plan.embedding_dim * len(cardinalities)
        self.mlp = nn.Sequential(
            nn.Linear(max(width, 1), plan.hidden),
            nn.ReLU(),
            nn.Linear(plan.hidden, plan.activation_dim),
        )

    def forward(self, numeric: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        x = torch.cat([numeric, *(e(codes[:, j]) for j, e in enumerate(self.embeddings))], dim=1)
        return self.mlp(x if x.shape[1] else torch.zeros(len(x), 1))  # a holder of no columns


def top_model(inputs: int, classes: int, plan: Plan) -> nn.Module:
    return nn.Sequential(
        nn.ReLU(),  # the cut layers are linear outputs; the top model starts non-linear
        nn.Linear(inputs, plan.hidden),
        nn.ReLU(),
        nn.Dropout(plan.dropout),
        nn.Linear(plan.hidden, classes),
    )


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# ---------------------------------------------------------------- pure maths


def clip_rows(rows: np.ndarray, bound: float) -> np.ndarray:
    """Each row scaled down to L2 norm ≤ bound."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows * np.minimum(1.0, bound / np.maximum(norms, 1e-12))


def protect_rows(
    rows: np.ndarray, clip: float, noise: float, source: NoiseStream | torch.Generator
) -> np.ndarray:
    """Clip each row to `clip`, then add N(0, (noise·clip)²) to each coordinate (clip 0: as is)."""
    if clip <= 0:
        return rows
    out = clip_rows(rows.astype(np.float64), clip)
    if noise > 0:
        from fedshop.seeding import standard_normal

        out = out + noise * clip * standard_normal(out.shape, torch.float64, source).numpy()
    return out.astype(np.float32)


def digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()


# ---------------------------------------------------------------- message checks


def check_message(message: object, what: str) -> Message:
    if not isinstance(message, Mapping):
        raise SplitProtocolError(f"{what}: a message is a dict of arrays, got {type(message)}")
    for key, value in message.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise SplitProtocolError(f"{what}: entry {key!r} is not a numpy array")
        if value.dtype.kind not in "biuf":
            raise SplitProtocolError(f"{what}: entry {key!r} has dtype {value.dtype}, not numeric")
    return dict(message)


def _require(message: Message, key: str, what: str) -> np.ndarray:
    if key not in message:
        raise SplitProtocolError(f"{what}: missing {key!r}")
    return message[key]


def check_positions(values: np.ndarray, n_aligned: int, what: str) -> np.ndarray:
    """int64, one-dimensional, distinct, each in [0, n_aligned)."""
    if values.ndim != 1 or values.dtype != np.int64:
        raise SplitProtocolError(f"{what}: positions must be a 1-d int64 array")
    if len(values) and (values.min() < 0 or values.max() >= n_aligned):
        raise SplitProtocolError(
            f"{what}: positions outside the intersection (0..{n_aligned - 1}): "
            f"{values[(values < 0) | (values >= n_aligned)][:5].tolist()}"
        )
    if len(np.unique(values)) != len(values):
        raise SplitProtocolError(f"{what}: repeated positions")
    return values


def check_rows(values: np.ndarray, count: int, width: int, what: str) -> np.ndarray:
    if values.dtype.kind != "f" or values.shape != (count, width):
        raise SplitProtocolError(
            f"{what}: expected a float array of shape ({count}, {width}), got "
            f"{values.dtype} {values.shape}"
        )
    if not np.isfinite(values).all():
        raise SplitProtocolError(f"{what}: non-finite values")
    return values


def _scalar(message: Message, key: str, what: str) -> int:
    value = _require(message, key, what)
    if value.shape != () or value.dtype.kind not in "iu":
        raise SplitProtocolError(f"{what}: {key!r} must be a 0-d integer array")
    return int(value)


# ---------------------------------------------------------------- feature holder


class FeatureHolder:
    """One party's bottom model over its own columns; answers the label holder's requests."""

    def __init__(
        self,
        table: pd.DataFrame,
        columns: Columns,
        aligned_ids: np.ndarray,
        plan: Plan,
        name: str = "feature",
    ) -> None:
        self.name, self.columns, self.plan = name, columns, plan
        self.aligned_ids = np.asarray(aligned_ids, dtype=np.int64)
        if np.any(np.diff(self.aligned_ids) <= 0):
            raise SplitProtocolError(f"{name}: aligned ids must be sorted and distinct")
        ids = table[columns.id].to_numpy(np.int64)
        if len(np.unique(ids)) != len(ids):
            raise SplitProtocolError(f"{name}: a feature table has one row per customer")
        order = np.argsort(ids)
        where = np.searchsorted(ids[order], self.aligned_ids)
        where = np.minimum(where, len(ids) - 1)
        if len(ids) == 0 or np.any(ids[order][where] != self.aligned_ids):
            raise SplitProtocolError(f"{name}: some aligned customers are not in this table")
        self._rows = order[where]  # aligned position → table row
        # Fitted on all of the holder's own rows: they carry no label, so no test information.
        self.encoding = Encoding.fit(table, columns)
        self._table = table
        self._encode()
        self.model = _seeded(
            derive_seed(plan.seed, "vertical", "bottom", name),
            lambda: Bottom(2 * len(columns.numeric), self.encoding.cardinalities, plan),
        )
        self.optimiser = torch.optim.Adam(self.model.parameters(), lr=plan.bottom_lr)
        self.served = np.zeros(0, dtype=np.int64)  # positions of the last forward
        self.updates = 0
        self.noise = NoiseStream.of(plan.noise_seed, "vertical", "activations", name)

    def _encode(self) -> None:
        numeric, codes = self.encoding.transform(self._table)
        self._numeric = torch.from_numpy(numeric[self._rows])
        self._codes = torch.from_numpy(codes[self._rows])

    @property
    def n_aligned(self) -> int:
        return len(self.aligned_ids)

    def handle(self, kind: str, message: Message) -> Message:
        what = f"{self.name} {kind}"
        message = check_message(message, what)
        if kind == "setup":
            n = _scalar(message, "n_aligned", what)
            if n != self.n_aligned:
                raise SplitProtocolError(
                    f"{what}: the label holder aligned {n} customers, this holder {self.n_aligned}"
                )
            return {
                "activation_dim": np.array(self.plan.activation_dim, dtype=np.int64),
                "n_aligned": np.array(self.n_aligned, dtype=np.int64),
            }
        if kind == "forward":
            positions = check_positions(_require(message, "positions", what), self.n_aligned, what)
            self.served = positions.copy()
            return self._activations(positions)
        if kind == "predict":
            positions = check_positions(_require(message, "positions", what), self.n_aligned, what)
            return self._activations(positions)
        if kind == "backward":
            positions = check_positions(_require(message, "positions", what), self.n_aligned, what)
            if not np.isin(positions, self.served).all():
                raise SplitProtocolError(f"{what}: gradients for positions not served last forward")
            gradients = check_rows(
                _require(message, "gradients", what), len(positions), self.plan.activation_dim, what
            )
            self._update(positions, gradients)
            if "next_positions" not in message:
                return {}
            return self.handle("forward", {"positions": message["next_positions"]})
        raise SplitProtocolError(f"{self.name}: unknown request kind {kind!r}")

    def _activations(self, positions: np.ndarray) -> Message:
        self.model.eval()
        with torch.no_grad():
            index = torch.from_numpy(positions)
            out = self.model(self._numeric[index], self._codes[index]).numpy()
        out = protect_rows(out, self.plan.activation_clip, self.plan.activation_noise, self.noise)
        return {"positions": positions.copy(), "activations": out.astype(np.float32)}

    def _update(self, positions: np.ndarray, gradients: np.ndarray) -> None:
        """`bottom_steps` Adam steps on ⟨h(x), g⟩: the chain rule's step with a received (stale) g."""
        self.model.train()
        index = torch.from_numpy(positions)
        g = torch.from_numpy(gradients.astype(np.float32))
        for _ in range(self.plan.bottom_steps):
            self.optimiser.zero_grad()
            out = self.model(self._numeric[index], self._codes[index])
            (out * g).sum().div(max(len(positions), 1)).backward()
            self.optimiser.step()
        self.updates += 1

    # State: model, optimiser, last forward's positions and the noise stream (safetensors), the rest
    # as json. The table and aligned ids come back with the process (its own file and PSI's output).
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v.contiguous() for k, v in self.model.state_dict().items()}
        for i, state in self.optimiser.state_dict()["state"].items():
            for key, value in state.items():
                tensors[f"adam.{i}.{key}"] = torch.as_tensor(value).contiguous()
        tensors["served"] = torch.from_numpy(self.served.copy())
        tensors["noise"] = self.noise.get_state()
        save_file(tensors, str(folder / "state.safetensors"))
        meta = {
            "name": self.name,
            "plan": self.plan.to_dict(),
            "columns": self.columns.to_dict(),
            "encoding": self.encoding.to_dict(),
            "aligned": {"count": self.n_aligned, "sha256": digest(self.aligned_ids)},
            "updates": self.updates,
        }
        (folder / "state.json").write_text(json.dumps(meta))

    def load(self, folder: str | Path) -> FeatureHolder:
        folder = Path(folder)
        meta = json.loads((folder / "state.json").read_text())
        if meta["aligned"] != {"count": self.n_aligned, "sha256": digest(self.aligned_ids)}:
            raise SplitProtocolError(f"{self.name}: saved state is for another intersection")
        mine = json.loads(json.dumps([self.plan.to_dict(), self.columns.to_dict()]))
        if [meta["plan"], meta["columns"]] != mine:
            raise SplitProtocolError(f"{self.name}: saved state is for another plan or columns")
        self.encoding = Encoding.from_dict(meta["encoding"])
        self._encode()
        tensors = load_file(str(folder / "state.safetensors"))
        self.model.load_state_dict(
            {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        )
        optimiser = self.optimiser.state_dict()
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("adam."):
                _, i, name = key.split(".", 2)
                state.setdefault(int(i), {})[name] = value
        optimiser["state"] = state
        self.optimiser.load_state_dict(optimiser)
        self.served = tensors["served"].numpy().astype(np.int64)
        self.noise.set_state(tensors["noise"])
        self.updates = int(meta["updates"])
        return self


# ---------------------------------------------------------------- label holder


class LabelHolder:
    """The top model and the label holder's own bottom model; checks every reply; trains."""

    def __init__(
        self,
        label_table: pd.DataFrame,
        columns: Columns,
        aligned_ids: np.ndarray,
        plan: Plan,
        name: str = "label",
    ) -> None:
        if not columns.label or not columns.classes or not columns.time:
            raise SplitProtocolError(f"{name}: a label table names its label, classes and time")
        self.name, self.columns, self.plan = name, columns, plan
        self.aligned_ids = np.asarray(aligned_ids, dtype=np.int64)
        if np.any(np.diff(self.aligned_ids) <= 0):
            raise SplitProtocolError(f"{name}: aligned ids must be sorted and distinct")
        ids = label_table[columns.id].to_numpy(np.int64)
        # Only the rentals of aligned customers: the others have no features across the cut.
        keep = np.isin(ids, self.aligned_ids)
        rows = label_table.loc[keep].reset_index(drop=True)
        self.rows_dropped_unaligned = int((~keep).sum())
        self.positions = np.searchsorted(self.aligned_ids, ids[keep]).astype(np.int64)
        labels = pd.Categorical(rows[columns.label].astype("string"), categories=columns.classes)
        if (labels.codes < 0).any():
            raise SplitProtocolError(f"{name}: labels outside {columns.classes}")
        self.labels = labels.codes.astype(np.int64)
        times = rows[columns.time].to_numpy()
        self.test, self.split_rule = temporal_test_mask(times, ids[keep], plan.test_fraction)
        self.encoding = Encoding.fit(rows.loc[~self.test], columns)  # training rows only
        numeric, codes = self.encoding.transform(rows)
        self._numeric, self._codes = torch.from_numpy(numeric), torch.from_numpy(codes)
        self._y = torch.from_numpy(self.labels)
        self.train_rows = np.flatnonzero(~self.test)
        self.test_rows = np.flatnonzero(self.test)
        # Every aligned customer with a rental here is asked for activations (test ones included,
        # for prediction); gradients go back for those with training rentals only.
        self.request_positions = np.unique(self.positions)
        self.gradient_positions = np.unique(self.positions[self.train_rows])
        self.bottom = _seeded(
            derive_seed(plan.seed, "vertical", "label-bottom"),
            lambda: Bottom(2 * len(columns.numeric), self.encoding.cardinalities, plan),
        )
        self.partners: tuple[str, ...] = ()
        self.dims: dict[str, int] = {}
        self.activations: dict[str, torch.Tensor] = {}
        self.top: nn.Module | None = None
        self.epochs = 0
        self.releases = 0  # gradient rows each trained customer has had released, per holder
        self._generator = torch_generator(plan.seed, "vertical", "batches")
        self.noise = NoiseStream.of(plan.noise_seed, "vertical", "cut-gradients")

    @property
    def n_aligned(self) -> int:
        return len(self.aligned_ids)

    # -- protocol

    def setup_requests(self, partners: Sequence[str]) -> dict[str, tuple[str, Message]]:
        self.partners = tuple(partners)
        n = np.array(self.n_aligned, dtype=np.int64)
        return {p: ("setup", {"n_aligned": n}) for p in self.partners}

    def setup(self, replies: Mapping[str, Message]) -> None:
        self._same_parties(replies, "setup")
        for p in self.partners:
            what = f"{p} setup reply"
            reply = check_message(replies[p], what)
            if _scalar(reply, "n_aligned", what) != self.n_aligned:
                raise SplitProtocolError(f"{what}: the holder aligned another number of customers")
            dim = _scalar(reply, "activation_dim", what)
            if dim <= 0:
                raise SplitProtocolError(f"{what}: activation_dim must be positive")
            self.dims[p] = dim
            self.activations[p] = torch.zeros(self.n_aligned, dim)
        width = self.plan.activation_dim + sum(self.dims.values())
        self.top = _seeded(
            derive_seed(self.plan.seed, "vertical", "top"),
            lambda: top_model(width, len(self.columns.classes), self.plan),
        )
        params = [*self.bottom.parameters(), *self.top.parameters()]
        self.optimiser = torch.optim.AdamW(
            params, lr=self.plan.top_lr, weight_decay=self.plan.weight_decay
        )

    def forward_requests(self) -> dict[str, tuple[str, Message]]:
        return {p: ("forward", {"positions": self.request_positions}) for p in self.partners}

    def accept(self, replies: Mapping[str, Message], requested: np.ndarray | None = None) -> None:
        """Take the activations of a forward (or backward+forward) exchange, after checking that
        each reply covers exactly the positions requested, in order, with finite rows of the
        announced width."""
        requested = self.request_positions if requested is None else requested
        self._same_parties(replies, "forward")
        checked = {}
        for p in self.partners:
            what = f"{p} activations"
            reply = check_message(replies[p], what)
            got = _require(reply, "positions", what)
            if got.dtype != np.int64 or got.shape != requested.shape:
                raise SplitProtocolError(f"{what}: positions are not the {len(requested)} asked")
            outside = (got < 0) | (got >= self.n_aligned)
            if outside.any():
                raise SplitProtocolError(
                    f"{what}: activations for positions outside the intersection "
                    f"{got[outside][:5].tolist()}"
                )
            if not np.array_equal(got, requested):
                extra = np.setdiff1d(got, requested)
                raise SplitProtocolError(
                    f"{what}: activations for positions not requested {extra[:5].tolist()}"
                    if len(extra)
                    else f"{what}: positions differ from the request (order or duplicates)"
                )
            rows = check_rows(_require(reply, "activations", what), len(got), self.dims[p], what)
            checked[p] = (got, rows)
        for p, (got, rows) in checked.items():  # all checked before any is used
            self.activations[p][torch.from_numpy(got)] = torch.from_numpy(rows.astype(np.float32))

    def backward_requests(self) -> dict[str, tuple[str, Message]]:
        gradients = self.cut_gradients()
        return {
            p: (
                "backward",
                {
                    "positions": self.gradient_positions,
                    "gradients": gradients[p],
                    "next_positions": self.request_positions,
                },
            )
            for p in self.partners
        }

    def _same_parties(self, replies: Mapping[str, Message], what: str) -> None:
        if set(replies) != set(self.partners):
            raise SplitProtocolError(
                f"{what}: replies from {sorted(replies)}, expected {sorted(self.partners)}"
            )

    # -- learning

    def _logits(self, rows: torch.Tensor) -> torch.Tensor:
        assert self.top is not None, "setup first"
        index = torch.from_numpy(self.positions)[rows]
        parts = [self.bottom(self._numeric[rows], self._codes[rows])]
        parts += [self.activations[p][index] for p in self.partners]
        return self.top(torch.cat(parts, dim=1))

    def fit_local(self, epochs: int) -> float:
        """`epochs` passes of mini-batch steps on the top and own bottom model, activations fixed."""
        with torch.random.fork_rng(devices=[]):  # dropout draws from the global stream: seed it
            torch.manual_seed(derive_seed(self.plan.seed, "vertical", "dropout", self.epochs))
            return self._fit_local(epochs)

    def _fit_local(self, epochs: int) -> float:
        self.bottom.train()
        self.top.train()
        total, count = 0.0, 0
        for _ in range(epochs):
            order = torch.from_numpy(self.train_rows)[
                torch.randperm(len(self.train_rows), generator=self._generator)
            ]
            for batch in order.split(self.plan.batch_size):
                self.optimiser.zero_grad()
                loss = nn.functional.cross_entropy(self._logits(batch), self._y[batch])
                loss.backward()
                self.optimiser.step()
                total, count = total + loss.item() * len(batch), count + len(batch)
            self.epochs += 1
        return total / max(count, 1)

    def cut_gradients(self) -> dict[str, np.ndarray]:
        """Per holder, d(sum of training rentals' losses)/d(activation row) of each customer in
        `gradient_positions` (a customer's rentals add up), protected as the plan says."""
        self.bottom.eval()
        self.top.eval()
        leaves = {p: a.clone().requires_grad_(True) for p, a in self.activations.items()}
        saved, self.activations = self.activations, leaves
        try:
            for batch in torch.from_numpy(self.train_rows).split(8192):
                loss = nn.functional.cross_entropy(
                    self._logits(batch), self._y[batch], reduction="sum"
                )
                loss.backward()
        finally:
            self.activations = saved
        self.optimiser.zero_grad()
        index = torch.from_numpy(self.gradient_positions)
        out = {}
        for p, leaf in leaves.items():
            rows = leaf.grad[index].numpy()
            out[p] = protect_rows(
                rows, self.plan.gradient_clip, self.plan.gradient_noise, self.noise
            )
        self.releases += 1
        return out

    def probabilities(self, rows: np.ndarray) -> np.ndarray:
        self.bottom.eval()
        self.top.eval()
        with torch.no_grad():
            out = [
                torch.softmax(self._logits(b), dim=1) for b in torch.from_numpy(rows).split(8192)
            ]
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.columns.classes)))

    def evaluate(self) -> dict:
        return classification_metrics(
            self.probabilities(self.test_rows), self.labels[self.test_rows], self.columns.classes
        )


def classification_metrics(
    probabilities: np.ndarray, labels: np.ndarray, classes: Sequence[str]
) -> dict:
    """Macro AUC (mean one-vs-rest AUC over the classes), accuracy and per-class recall."""
    auc, per_class = macro_auc(probabilities, labels)
    predicted = probabilities.argmax(axis=1)
    recall = {
        c: float((predicted[labels == k] == k).mean()) if (labels == k).any() else float("nan")
        for k, c in enumerate(classes)
    }
    return {
        "macro_auc": auc,
        "auc": dict(zip(classes, per_class, strict=True)),
        "accuracy": float((predicted == labels).mean()) if len(labels) else float("nan"),
        "recall": recall,
        "test_rentals": len(labels),
    }


# ---------------------------------------------------------------- transports and the driver

Requests = dict[str, tuple[str, Message]]


class Transport(Protocol):
    names: tuple[str, ...]

    def exchange(self, requests: Requests) -> dict[str, Message]: ...


class LocalTransport:
    """Calls each holder's `handle` in this process. With `state_dir` and `rebuild` (name → a
    function that constructs that holder afresh), every message goes to a new holder that loads the
    state the previous one saved: what a process restarted per message does."""

    def __init__(
        self,
        feature_holders: Mapping[str, FeatureHolder],
        state_dir: str | Path | None = None,
        rebuild: Mapping[str, Callable[[], FeatureHolder]] | None = None,
    ) -> None:
        self.holders = dict(feature_holders)
        self.names = tuple(self.holders)
        self.state_dir = Path(state_dir) if state_dir else None
        self.rebuild = dict(rebuild or {})

    def exchange(self, requests: Requests) -> dict[str, Message]:
        replies = {}
        for name, (kind, message) in requests.items():
            if name not in self.holders:
                raise SplitProtocolError(f"no feature holder named {name!r}")
            holder = self.holders[name]
            folder = self.state_dir / name if self.state_dir else None
            if folder is not None and name in self.rebuild:
                holder = self.rebuild[name]()
                if (folder / "state.json").exists():
                    holder.load(folder)
            replies[name] = holder.handle(kind, message)
            if folder is not None:
                holder.save(folder)
            self.holders[name] = holder
        return replies


def message_bytes(message: Message) -> int:
    return sum(int(v.nbytes) for v in message.values())


@dataclass
class SplitResult:
    metrics: dict
    exchanges: int
    bytes_to_feature_holders: int
    bytes_to_label_holder: int
    seconds: float
    gradient_releases: int  # times each trained customer's gradient row went to each holder
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def train_split(
    label_holder: LabelHolder,
    transport: Transport,
    plan: Plan,
    progress: Callable[[dict], None] | None = None,
) -> SplitResult:
    """Train and evaluate: setup, one forward, `plan.rounds` backward+forward exchanges (the label
    holder training locally before each), then `final_epochs` on the last activations. With no
    feature holders (`transport.names` empty) the same loop trains the label holder alone."""
    start = time.perf_counter()
    sent = received = exchanges = 0

    def exchange(requests: Requests) -> dict[str, Message]:
        nonlocal sent, received, exchanges
        if not requests:
            return {}
        replies = transport.exchange(requests)
        exchanges += 1
        sent += sum(message_bytes(m) for _, m in requests.values())
        received += sum(message_bytes(m) for m in replies.values())
        return replies

    label_holder.setup(exchange(label_holder.setup_requests(transport.names)))
    label_holder.accept(exchange(label_holder.forward_requests()))
    history = []
    for round_ in range(plan.rounds):
        loss = label_holder.fit_local(plan.top_epochs)
        if label_holder.partners:
            label_holder.accept(exchange(label_holder.backward_requests()))
        entry = {"round": round_ + 1, "train_loss": loss, "exchanges": exchanges}
        history.append(entry)
        if progress:
            progress(entry)
    label_holder.fit_local(plan.final_epochs)
    metrics = label_holder.evaluate()
    metrics["seconds"] = time.perf_counter() - start
    return SplitResult(
        metrics=metrics,
        exchanges=exchanges,
        bytes_to_feature_holders=sent,
        bytes_to_label_holder=received,
        seconds=metrics["seconds"],
        gradient_releases=label_holder.releases,
        history=history,
    )
