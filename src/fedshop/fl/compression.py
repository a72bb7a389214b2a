"""Compressing what a client sends: wire codecs, and low-rank item-table compression as pipeline stages.

Two kinds of compression, at two places:

* Wire codecs (`SparseRows`, `Float16`, `StochasticInt8`, `TopK`, and `ErrorFeedback` around a lossy
  one) turn one client's message into real numpy arrays (`Encoded`), so that its size is a measured
  number of bytes; the server decodes each message before summing. They act on the message as it
  leaves the pipeline's client stages.
* `LowRankRows` (CoLR, Nguyen et al., arXiv 2401.03748) runs inside the aggregation pipeline: a client
  stage projects each item table's update onto a shared random basis, a server stage lifts the summed
  coefficients back. It is linear, so the sum — also a secure one — is taken over the small table.

Which combinations are valid:

* Secure aggregation (secagg / ckks / paillier) sums fixed-point vectors of its own encoding: the wire
  codecs do not apply under it (their decoded values would have to be summed in the clear, which is
  what it exists to prevent). `LowRankRows` does: the projection commutes with the sum.
* Record-level DP (the silo adds the noise itself before sending): any codec; compressing a released
  update is post-processing.
* User-level DP (`ClipUpdate` on the client, `GaussianNoise` on the server): a codec that is a
  contraction (`codec.contraction`: `SparseRows`, `TopK` with float32 values) and is used without
  error feedback keeps each message's norm ≤ C, so the sensitivity holds. For the others (float16 and
  int8 rounding can lengthen a message; error feedback adds last round's residual) the server must
  clip each decoded message to C again before summing: the integration re-applies `ClipUpdate(C)`
  on the server to every decoded message whose codec's `contraction` is False (a rule for the code
  that wires these codecs into a round; this module does not clip). `LowRankRows` is a
  contraction (orthonormal basis), up to float32 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import numpy as np
import torch

from fedshop.messages import Aggregate, ClientMessage, Tensors
from fedshop.seeding import RandomSource, torch_generator, uniform

_FLOAT16_MAX = 65504.0
INDEX_BYTES = 4  # int32 row or flat indices
HEADER_BYTES_PER_DIM = 8
_LEVELS = 127  # int8 codes in [-127, 127]: symmetric, so that 0 is exact and the rounding unbiased


@dataclass(frozen=True)
class Encoded:
    """One client's message as it travels: every array actually sent, and the tensors' shapes.

    `nbytes` is the measured size: the arrays' bytes plus a header of 8 bytes per dimension of each
    shape (a 10 000 × 64 table costs 16 header bytes). The arrays' names are not counted: the
    parameter names are fixed by the model, known to both ends, and which arrays a tensor has (rows +
    values, or dense) is one bit per tensor."""

    arrays: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]]

    @property
    def nbytes(self) -> int:
        header = HEADER_BYTES_PER_DIM * sum(len(shape) for shape in self.shapes.values())
        return sum(int(a.nbytes) for a in self.arrays.values()) + header


class Codec(Protocol):
    """Encodes one client's message to arrays and back.

    `lossless`: decode(encode(x)) == x. `contraction`: a decoded message is never longer in L2 than
    its input (what user-level DP needs, see the module's docstring). `decode` returns float32 tensors
    of the original shapes (`SparseRows` keeps float64 as float64), zeros where nothing was sent."""

    name: str
    lossless: bool
    contraction: bool

    def encode(self, tensors: Tensors, generator: RandomSource | None = None) -> Encoded: ...

    def decode(self, encoded: Encoded) -> Tensors: ...


# --- the row layout shared by SparseRows, Float16 and StochasticInt8 -------------------------------


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """A ≥2-D tensor as (first axis × the rest); a 0-D or 1-D one as a column of single entries."""
    if tensor.dim() >= 2:
        return tensor.reshape(tensor.shape[0], math.prod(tensor.shape[1:]))
    return tensor.reshape(-1, 1)


def touched_rows(rows: torch.Tensor) -> torch.Tensor:
    """Indices of the rows with any nonzero entry."""
    return rows.ne(0).any(1).nonzero().flatten()


def sparse_is_smaller(
    num_rows: int, kept: int, width: int, value_bytes: int, row_bytes: int = 0
) -> bool:
    """Whether the kept rows with their int32 indices cost less than every row sent densely
    (`row_bytes`: what each sent row costs besides its values, e.g. its int8 scale)."""
    row = width * value_bytes + row_bytes
    return kept * (INDEX_BYTES + row) < num_rows * row


def _put_rows(
    arrays: dict[str, np.ndarray],
    name: str,
    tensor: torch.Tensor,
    value_bytes: int,
    row_bytes: int = 0,
) -> torch.Tensor:
    """Record the layout of `tensor` in `arrays` (its int32 row indices when sparse is smaller) and
    return the rows to send (kept rows, or all of them)."""
    rows = as_rows(tensor)
    kept = touched_rows(rows)
    if sparse_is_smaller(len(rows), len(kept), rows.shape[1], value_bytes, row_bytes):
        arrays[f"{name}/rows"] = kept.numpy().astype(np.int32)
        return rows[kept]
    return rows


def _place_rows(encoded: Encoded, name: str, values: torch.Tensor) -> torch.Tensor:
    """Inverse of `_put_rows`: the decoded rows back in a zero tensor of the original shape."""
    shape = encoded.shapes[name]
    index = encoded.arrays.get(f"{name}/rows")
    if index is None:
        return values.reshape(shape)
    rows = as_rows(torch.zeros(shape, dtype=values.dtype))
    rows[torch.from_numpy(index.astype(np.int64))] = values
    return rows.reshape(shape)


def _float_dtype(tensor: torch.Tensor) -> np.dtype:
    return np.dtype(np.float64) if tensor.dtype == torch.float64 else np.dtype(np.float32)


@dataclass(frozen=True)
class SparseRows:
    """The uncompressed baseline: each tensor's touched rows (int32 indices + their values) when that
    is smaller than the dense tensor, else the dense tensor. A 1-D tensor's rows are its entries.
    Values go in the tensor's own float dtype (float32, or float64), so decoding is exact."""

    name: str = "none"
    lossless: bool = True
    contraction: bool = True

    def encode(self, tensors: Tensors, generator: RandomSource | None = None) -> Encoded:
        arrays: dict[str, np.ndarray] = {}
        for name, tensor in tensors.items():
            dtype = _float_dtype(tensor)
            sent = _put_rows(arrays, name, tensor.detach().cpu(), dtype.itemsize)
            arrays[f"{name}/values"] = sent.numpy().astype(dtype)
        return Encoded(arrays, {name: tuple(t.shape) for name, t in tensors.items()})

    def decode(self, encoded: Encoded) -> Tensors:
        return {
            name: _place_rows(encoded, name, torch.from_numpy(encoded.arrays[f"{name}/values"]))
            for name in encoded.shapes
        }


def to_float16(name: str, values: torch.Tensor) -> np.ndarray:
    """`values` as float16, refusing what float16 cannot hold rather than sending inf."""
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"'{name}' has non-finite values: float16 cannot send them")
    if values.numel() and float(values.abs().max()) > _FLOAT16_MAX:
        raise ValueError(
            f"'{name}' has values beyond float16's range (±{_FLOAT16_MAX:g}): scale or clip the "
            "update first, or use int8 (scaled per row)"
        )
    return values.detach().cpu().float().numpy().astype(np.float16)


@dataclass(frozen=True)
class Float16:
    """`SparseRows` with float16 values: half the bytes. Round-to-nearest, so for a value in float16's
    normal range (2^-14 ≤ |x| ≤ 65504) the error is at most |x|·2^-11; below it at most 2^-25.

    A value beyond ±65504 (or not finite) is a ValueError, never a silent inf: the caller should
    scale (or clip) first, or use `StochasticInt8`, which scales each row. (Per-tensor scaling would
    hide the problem: an update entry that large usually means a diverged run.)"""

    name: str = "float16"
    lossless: bool = False
    contraction: bool = False  # rounding to nearest can lengthen a message by up to 2^-11

    def encode(self, tensors: Tensors, generator: RandomSource | None = None) -> Encoded:
        arrays: dict[str, np.ndarray] = {}
        for name, tensor in tensors.items():
            sent = _put_rows(arrays, name, tensor.detach().cpu(), 2)
            arrays[f"{name}/values"] = to_float16(name, sent)
        return Encoded(arrays, {name: tuple(t.shape) for name, t in tensors.items()})

    def decode(self, encoded: Encoded) -> Tensors:
        return {
            name: _place_rows(
                encoded, name, torch.from_numpy(encoded.arrays[f"{name}/values"]).float()
            )
            for name in encoded.shapes
        }


def stochastic_codes(
    rows: torch.Tensor, scales: torch.Tensor, source: RandomSource
) -> torch.Tensor:
    """int8 codes of `rows` (k × w) on the grid of steps scale/127 (one scale per row, k × 1),
    rounded down or up at random with the probabilities that make the code's mean exact:
    E[code · scale/127] = x."""
    y = rows.double() / scales.double().clamp_min(1e-300) * _LEVELS  # in [-127, 127]
    low = y.floor()
    up = uniform(y.numel(), source).reshape(y.shape).double() < (y - low)
    return (low + up.double()).clamp(-_LEVELS, _LEVELS).to(torch.int8)


@dataclass(frozen=True)
class StochasticInt8:
    """`SparseRows` layout with 8-bit codes: each sent row (per="row") or each whole tensor
    (per="tensor") is divided by its max-abs (a float32 scale) into int8 codes in [-127, 127], rounded
    stochastically and unbiasedly from `generator`. Per entry the error is at most scale/127 (one
    step of the grid), and the scale costs 4 bytes per sent row (per="row") or per tensor.

    A ≥2-D tensor's rows are its first-axis slices; a 0-D or 1-D tensor (a bias) always gets one
    scale, whatever `per` says (a scale per entry would cost more than float32). Untouched rows stay
    absent. Needs a random source: rounding from an unseeded stream would make runs irreproducible."""

    per: Literal["row", "tensor"] = "row"
    lossless: bool = False
    contraction: bool = False  # rounding up can lengthen a message

    def __post_init__(self) -> None:
        if self.per not in ("row", "tensor"):
            raise ValueError(f"per must be 'row' or 'tensor', not {self.per!r}")

    @property
    def name(self) -> str:
        return f"int8-{self.per}"

    def encode(self, tensors: Tensors, generator: RandomSource | None = None) -> Encoded:
        if generator is None:
            raise ValueError("stochastic rounding needs a generator (a seeded torch.Generator)")
        arrays: dict[str, np.ndarray] = {}
        for name, tensor in tensors.items():
            tensor = tensor.detach().cpu().float()
            per_row = self.per == "row" and tensor.dim() >= 2
            sent = _put_rows(arrays, name, tensor, 1, row_bytes=4 if per_row else 0)
            if per_row:
                scales = sent.abs().amax(1, keepdim=True) if len(sent) else sent[:, :1]
            else:
                scale = tensor.abs().max() if tensor.numel() else torch.tensor(0.0)
                scales = scale.reshape(1, 1)
            arrays[f"{name}/codes"] = stochastic_codes(sent, scales, generator).numpy()
            arrays[f"{name}/scales"] = scales.flatten().numpy().astype(np.float32)
        return Encoded(arrays, {name: tuple(t.shape) for name, t in tensors.items()})

    def decode(self, encoded: Encoded) -> Tensors:
        decoded = {}
        for name in encoded.shapes:
            codes = torch.from_numpy(encoded.arrays[f"{name}/codes"]).float()
            scales = torch.from_numpy(encoded.arrays[f"{name}/scales"]).reshape(-1, 1)
            decoded[name] = _place_rows(encoded, name, codes * (scales / _LEVELS))
        return decoded


# --- top-k -------------------------------------------------------------------------------------------


def top_k_mask(tensors: Tensors, fraction: float, keep: int | None = None) -> Tensors:
    """Which entries to keep: the ceil(fraction × nonzeros) largest in magnitude over all the tensors
    together (one global threshold; ties broken by torch.topk), or the `keep` largest. Exactly that
    many are kept (fewer if there are fewer nonzeros)."""
    if not tensors:
        return {}
    flat = torch.cat([t.detach().reshape(-1).abs().float().cpu() for t in tensors.values()])
    nonzeros = int(flat.ne(0).sum())
    k = min(nonzeros, keep if keep is not None else math.ceil(fraction * nonzeros))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    if k:
        keep[torch.topk(flat, k).indices] = True
    masks, start = {}, 0
    for name, tensor in tensors.items():
        masks[name] = keep[start : start + tensor.numel()].reshape(tensor.shape)
        start += tensor.numel()
    return masks


@dataclass(frozen=True)
class TopK:
    """Top-k sparsification: the ceil(fraction × nonzeros) largest-magnitude entries of the whole
    message, each tensor's as int32 flat indices + values (float32, or float16 with
    value_codec="float16"). The rest are zeros. With float32 values a contraction (entries are kept
    or dropped, never changed). Wrap it in `ErrorFeedback` so the dropped mass is sent later."""

    fraction: float
    value_codec: Literal["float32", "float16"] = "float32"
    lossless: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"top-k fraction must be in (0, 1], not {self.fraction}")
        if self.value_codec not in ("float32", "float16"):
            raise ValueError(
                f"value_codec must be 'float32' or 'float16', not {self.value_codec!r}"
            )

    @property
    def name(self) -> str:
        return "topk"

    @property
    def contraction(self) -> bool:
        return self.value_codec == "float32"

    def budget(self, tensors: Tensors) -> int:
        """How many entries `fraction` keeps of `tensors`: under error feedback the count is taken
        from the fresh update, so an old residual's rows do not swell every later message."""
        return math.ceil(self.fraction * sum(int(t.ne(0).sum()) for t in tensors.values()))

    def encode(
        self, tensors: Tensors, generator: RandomSource | None = None, keep: int | None = None
    ) -> Encoded:
        masks = top_k_mask(tensors, self.fraction, keep)
        arrays: dict[str, np.ndarray] = {}
        for name, tensor in tensors.items():
            flat = tensor.detach().cpu().float().reshape(-1)
            index = masks[name].reshape(-1).nonzero().flatten()
            if not len(index):
                continue  # nothing kept: the shape in the header says "all zero"
            arrays[f"{name}/index"] = index.numpy().astype(np.int32)
            values = flat[index]
            half = self.value_codec == "float16"
            arrays[f"{name}/values"] = to_float16(name, values) if half else values.numpy()
        return Encoded(arrays, {name: tuple(t.shape) for name, t in tensors.items()})

    def decode(self, encoded: Encoded) -> Tensors:
        decoded = {}
        for name, shape in encoded.shapes.items():
            flat = torch.zeros(math.prod(shape), dtype=torch.float32)
            if f"{name}/index" in encoded.arrays:
                index = torch.from_numpy(encoded.arrays[f"{name}/index"].astype(np.int64))
                flat[index] = torch.from_numpy(encoded.arrays[f"{name}/values"]).float()
            decoded[name] = flat.reshape(shape)
        return decoded


# --- error feedback ----------------------------------------------------------------------------------


def encode_corrected(
    codec: Codec, corrected: Tensors, fresh: Tensors, generator: RandomSource | None
) -> Encoded:
    """Encode an update with the residual added; a top-k budget is the fresh update's."""
    if isinstance(codec, TopK):
        return codec.encode(corrected, generator, keep=codec.budget(fresh))
    return codec.encode(corrected, generator)


@dataclass
class ErrorFeedback:
    """A lossy codec with error feedback (Seide et al. 2014; Karimireddy et al. 2019): what a round's
    compression dropped is added to the client's next update, so nothing is lost for good:

        sent_t = C(x_t + e_{t-1}),   e_t = x_t + e_{t-1} − sent_t,   Σ_t sent_t + e_T = Σ_t x_t.

    The residual belongs to the client and lives on the client: this object keeps one per client id
    for in-process runs; in a deployment each party's process holds its own object (and only its own
    residual). The residual is never sent. Not a contraction: a message carries old residual too."""

    codec: Codec
    residuals: dict[int, Tensors] = field(default_factory=dict)
    lossless: bool = False
    contraction: bool = False

    @property
    def name(self) -> str:
        return f"{self.codec.name}+ef"

    def residual(self, client: int) -> Tensors:
        """The client's residual (empty before its first message)."""
        return self.residuals.get(client, {})

    def encode_for(
        self, client: int, tensors: Tensors, generator: RandomSource | None = None
    ) -> Encoded:
        previous = self.residual(client)
        corrected = {
            name: t.detach().cpu().float() + previous.get(name, torch.zeros(t.shape))
            for name, t in tensors.items()
        }
        encoded = encode_corrected(self.codec, corrected, tensors, generator)
        decoded = self.codec.decode(encoded)
        self.residuals[client] = {name: corrected[name] - decoded[name] for name in corrected}
        return encoded

    def decode(self, encoded: Encoded) -> Tensors:
        return self.codec.decode(encoded)


# --- by name -------------------------------------------------------------------------------------


CODECS: dict[str, Callable[..., Codec]] = {
    "none": SparseRows,
    "float16": Float16,
    "int8-row": lambda: StochasticInt8("row"),
    "int8-tensor": lambda: StochasticInt8("tensor"),
    "topk": TopK,  # options: fraction (required), value_codec
}


def codec(name: str, **options: object) -> Codec:
    """The codec a config names: "none" (SparseRows), "float16", "int8-row", "int8-tensor" or "topk"
    (with fraction=…, optionally value_codec="float16"). Wrap in `ErrorFeedback` for error feedback."""
    if name not in CODECS:
        raise ValueError(f"codec must be one of {', '.join(CODECS)}; got {name!r}")
    return CODECS[name](**options)


# --- low-rank item tables (CoLR) ---------------------------------------------------------------------


def shared_basis(
    seed: int, name: str, rank: int, dim: int, round_number: int | None = None
) -> torch.Tensor:
    """B (rank × dim, float64) with orthonormal rows, from the public seed: the same on every client
    and the server. QR of a Gaussian matrix, signs fixed so that the result does not depend on the
    QR routine's sign convention."""
    if not 1 <= rank <= dim:
        raise ValueError(f"the rank of '{name}' must be between 1 and its width {dim}, not {rank}")
    labels: tuple[str | int, ...] = ("compression", "basis", name)
    if round_number is not None:  # CoLR's per-round B^(t)
        labels = (*labels, round_number)
    gaussian = torch.randn(dim, rank, generator=torch_generator(seed, *labels), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(r))
    return (q * torch.where(signs == 0, torch.ones_like(signs), signs)).T.contiguous()


def project_rows(update: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """U (n × d) → U Bᵀ (n × r): a zero row stays exactly zero. Computed in float64."""
    return (update.double() @ basis.T).to(update.dtype)


def lift_rows(coefficients: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """C (n × r) → C B (n × d). ‖C B‖ = ‖C‖ since B's rows are orthonormal."""
    return (coefficients.double() @ basis).to(coefficients.dtype)


@dataclass(frozen=True)
class LowRankRows:
    """CoLR-style low-rank compression of item-table updates, as a pair of pipeline stages.

    `tables` maps each compressed table's name to its width d (the server needs d to lift the n × r
    coefficients it receives). A client stage replaces the update U (n × d) with U Bᵀ (n × r), B a
    shared basis with orthonormal rows drawn from the public `seed`; a server stage replaces the summed
    coefficients C with C B. B is shared, so Σ_i (U_i Bᵀ) B = (Σ_i U_i Bᵀ) B: the projection commutes
    with the sum — also a secure one, which then sums the small table — and with row scaling (so
    `with_row_means` composes). Other tensors, the `__row_weight__/` columns included, pass untouched.
    The client sends r/d of the table's floats; the server receives what U Bᵀ B would give, the
    orthogonal projection of U onto B's row space (a contraction).

    Honest difference from the paper: CoLR trains the coefficients A with B frozen during local
    training, so the local model moves only within B's span; here local training is unchanged and its
    update is projected onto the same shared subspace afterwards (what is lost is the part of U
    outside it, not retrained around). The paper draws a new B^(t) each round: `for_round(t)` does
    that; with `round_number=None` one fixed B serves the whole run and confines the tables' movement to one
    r-dimensional subspace."""

    tables: Mapping[str, int]
    rank: int
    seed: int
    round_number: int | None = None

    def __post_init__(self) -> None:
        for name, dim in self.tables.items():
            if not 1 <= self.rank <= dim:
                raise ValueError(
                    f"the rank ({self.rank}) must be between 1 and the width of '{name}' ({dim})"
                )

    def for_round(self, round_number: int) -> LowRankRows:
        """The same stages with round `round_number`'s basis (CoLR's B^(t))."""
        return replace(self, round_number=round_number)

    def basis(self, name: str) -> torch.Tensor:
        return shared_basis(self.seed, name, self.rank, self.tables[name], self.round_number)

    def client_stage(self, message: ClientMessage) -> ClientMessage:
        """Project each named table (after the weighting and clipping stages, or before: it is
        linear and keeps norms ≤)."""
        tensors = dict(message.tensors)
        for name, dim in self.tables.items():
            update = tensors[name]
            if update.dim() != 2 or update.shape[1] != dim:
                raise ValueError(f"'{name}' should be n × {dim}, not {tuple(update.shape)}")
            tensors[name] = project_rows(update, self.basis(name).to(update.device))
        return replace(message, tensors=tensors)

    def server_stage(self, aggregate: Aggregate) -> Aggregate:
        """Lift the summed coefficients back to the tables' width."""
        tensors = dict(aggregate.tensors)
        for name in self.tables:
            tensors[name] = lift_rows(tensors[name], self.basis(name).to(tensors[name].device))
        return replace(aggregate, tensors=tensors)
