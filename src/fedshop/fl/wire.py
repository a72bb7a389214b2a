"""How a client's staged message crosses to the server in the simulator, and what it costs.

Each client encodes its message (after the pipeline's client stages) with the run's codec
(`[communication] codec`, `fl/compression.py`); the encoded size is the bytes it sent, and the server
decodes it before the sum. With error feedback the codec's residual stays with its client. Under
user-level DP the server clips each decoded message to the clipping bound again when the codec may
lengthen it (rounding, or an old residual added), so the noise's sensitivity still holds.

Under a protection (secure aggregation, CKKS, Paillier) the protection's own encoding is what travels;
its measured bytes per client replace the codec's (config allows only codec "none" there).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fedshop.config import RunConfig
from fedshop.fl.compression import (
    HEADER_BYTES_PER_DIM,
    INDEX_BYTES,
    Codec,
    Encoded,
    ErrorFeedback,
    LowRankRows,
    SparseRows,
    encode_corrected,
)
from fedshop.fl.compression import codec as make_codec
from fedshop.messages import AggregationPipeline, ClientMessage, Tensors
from fedshop.models.spec import get_model
from fedshop.privacy.noise import ClipUpdate
from fedshop.seeding import torch_generator


class Wire:
    def __init__(
        self, codec: Codec | ErrorFeedback | None = None, seed: int = 0, reclip: float | None = None
    ) -> None:
        self.codec = codec if codec is not None else SparseRows()
        self.seed = seed  # the codecs' stochastic rounding: reproducible, it is not privacy noise
        # User-level DP's bound, applied again to decoded messages a codec may have lengthened.
        self.reclip = ClipUpdate(reclip) if reclip and not self.codec.contraction else None

    @classmethod
    def of_run(cls, config: RunConfig, reclip: float | None = None) -> Wire:
        com = config.communication
        options = {"fraction": com.topk_fraction} if com.codec == "topk" else {}
        base = make_codec(com.codec, **options)
        # Top-k is biased (it always drops the small entries): what it drops is kept and sent
        # later. int8's stochastic rounding is unbiased and float16's error tiny, and a residual
        # would keep every row ever touched in every later message: they go without.
        feedback = com.error_feedback and com.codec == "topk"
        return cls(ErrorFeedback(base) if feedback else base, config.seed, reclip)

    @property
    def lossless(self) -> bool:
        return self.codec.lossless

    def send(self, client: int, round_number: int, message: ClientMessage) -> tuple[Encoded, int]:
        """The client's side: its message encoded, and its size in bytes. Bookkeeping columns
        ("__…": FedNova's step counts, row weights) are counts, not update: they travel exact."""
        generator = torch_generator(self.seed, "wire", client, round_number)
        update = {k: v for k, v in message.tensors.items() if not k.startswith("__")}
        counts = {k: v for k, v in message.tensors.items() if k.startswith("__")}
        if isinstance(self.codec, ErrorFeedback):
            encoded = self.codec.encode_for(client, update, generator)
        else:
            encoded = self.codec.encode(update, generator)
        if counts:
            exact = SparseRows().encode(counts)
            encoded = Encoded(
                {**encoded.arrays, **exact.arrays}, {**encoded.shapes, **exact.shapes}
            )
        return encoded, encoded.nbytes

    def receive(self, encoded: Encoded, message: ClientMessage) -> ClientMessage:
        """The server's side: the decoded tensors in place of the message's own (whose weight and
        counts travel alongside, as in a deployment's message)."""
        counts = [name for name in encoded.shapes if name.startswith("__")]
        tensors = self.codec.decode(_only(encoded, [n for n in encoded.shapes if n not in counts]))
        tensors.update(SparseRows().decode(_only(encoded, counts)))
        if message.tensors:  # back where and as the client had them
            tensors = {
                k: v.to(device=message.tensors[k].device, dtype=message.tensors[k].dtype)
                for k, v in tensors.items()
            }
        received = replace(message, tensors=tensors)
        return self.reclip(received) if self.reclip is not None else received

    def open(self, parcel: tuple[ClientMessage, Encoded]) -> ClientMessage:
        """A parcel of `send`'s (the staged message and its encoding) as the server receives it."""
        message, encoded = parcel
        if self.lossless and message.tensors:  # decoding would give the very same tensors
            return message
        return self.receive(encoded, message)

    def carry(
        self, client: int, round_number: int, message: ClientMessage
    ) -> tuple[ClientMessage, int]:
        """Send and receive at once: the message as the server gets it, and its bytes."""
        encoded, size = self.send(client, round_number, message)
        return self.open((message, encoded)), size


def _only(encoded: Encoded, names: list[str]) -> Encoded:
    """The part of `encoded` that carries the tensors `names` (its arrays are "name/…")."""
    wanted = set(names)
    arrays = {k: v for k, v in encoded.arrays.items() if k.rsplit("/", 1)[0] in wanted}
    return Encoded(arrays, {n: encoded.shapes[n] for n in names})


def baseline_bytes(
    rows: torch.Tensor, shared: Tensors, item_tables: tuple[str, ...]
) -> torch.Tensor:
    """What each client's uncompressed message (`SparseRows`) takes, from how many rows of the item
    tables it changed (`rows`, one count per client), without building the messages: the vectorised
    simulator's clients send their touched rows and their whole dense weights."""
    sizes = torch.zeros(len(rows), dtype=torch.int64)
    for name, tensor in shared.items():
        header = HEADER_BYTES_PER_DIM * tensor.dim()
        as_rows = (
            tensor.reshape(tensor.shape[0], -1) if tensor.dim() >= 2 else tensor.reshape(-1, 1)
        )
        n, width = as_rows.shape
        dense = n * width * 4
        if name in item_tables:
            sparse = rows * (INDEX_BYTES + width * 4)
            cost = sparse.clamp(max=dense)  # SparseRows sends whichever is smaller
        else:
            cost = torch.full_like(rows, dense)
        sizes += cost + header
    return sizes


def low_rank_stages(config: RunConfig) -> LowRankRows | None:
    """`[communication] low_rank`'s projection of the model's item tables (None when off)."""
    rank = config.communication.low_rank
    if rank == 0:
        return None
    spec = get_model(config.model.name)
    # Only the shapes are wanted: a two-item model shows which item tables are matrices.
    shapes = spec.init_model(2, config.model, torch.Generator().manual_seed(0))
    tables = {n: shapes[n].shape[1] for n in spec.item_tables if shapes[n].dim() == 2}
    return LowRankRows(tables, rank, config.seed)


def with_low_rank(pipeline: AggregationPipeline, config: RunConfig) -> AggregationPipeline:
    """`pipeline` with `[communication] low_rank`'s projection of the item tables (CoLR): the
    client stage last, after the weighting and clipping, the lift first on the server (it commutes
    with the row means and with any secure sum). The silos and the server build the same."""
    stages = low_rank_stages(config)
    if stages is None:
        return pipeline
    return replace(
        pipeline,
        client_stages=(*pipeline.client_stages, stages.client_stage),
        server_stages=(stages.server_stage, *pipeline.server_stages),
    )


@dataclass
class RowUpdate:
    """A shopper's update as the vectorised simulator holds it: only the catalogue rows it touched
    (`items`), one row per item in each item table, and the other tensors whole. Encoded as it is, it
    is what `SparseRows` would send (row indices + rows), without a dense copy of the catalogue."""

    items: torch.Tensor  # (R,) catalogue rows, sorted, unique
    tensors: Tensors  # item tables: (R, …); other shared tensors: whole


class RowWire:
    """`Wire` for `RowUpdate`s: each shopper's touched rows encoded by the run's codec, its
    residual (error feedback) kept per shopper on the rows it left behind; each item table's row
    indices cost 4 bytes a row."""

    def __init__(self, wire: Wire, item_tables: tuple[str, ...]) -> None:
        self.wire = wire
        self.item_tables = item_tables
        feedback = isinstance(wire.codec, ErrorFeedback)
        self.codec = wire.codec.codec if feedback else wire.codec
        self.residuals: dict[int, RowUpdate] | None = {} if feedback else None

    def send(self, client: int, round_number: int, update: RowUpdate) -> tuple[tuple, int]:
        """The parcel (encoding and its rows) and its size in bytes."""
        fresh = update.tensors
        if self.residuals is not None and client in self.residuals:
            update = self._plus(update, self.residuals[client])
        generator = torch_generator(self.wire.seed, "wire", client, round_number)
        encoded = encode_corrected(self.codec, update.tensors, fresh, generator)
        if self.residuals is not None:
            decoded = self.codec.decode(encoded)
            left = {k: update.tensors[k] - decoded[k].to(update.tensors[k]) for k in decoded}
            self.residuals[client] = RowUpdate(update.items, left)
        # Each item table's rows are named by their int32 indices, as `SparseRows` sends them.
        indices = INDEX_BYTES * len(update.items) * len(self.item_tables)
        return (encoded, update.items), encoded.nbytes + indices

    def open(self, parcel: tuple) -> RowUpdate:
        encoded, items = parcel
        update = RowUpdate(items, self.codec.decode(encoded))
        if self.wire.reclip is not None:
            message = self.wire.reclip(ClientMessage(update.tensors, 1.0, 1.0, 1))
            update = RowUpdate(items, message.tensors)
        return update

    def _plus(self, update: RowUpdate, residual: RowUpdate) -> RowUpdate:
        """The update with the residual added, on the union of their rows."""
        items, where = torch.unique(torch.cat([update.items, residual.items]), return_inverse=True)
        ours, theirs = where[: len(update.items)], where[len(update.items) :]
        tensors = {}
        for name, value in update.tensors.items():
            extra = residual.tensors[name].to(value)
            if name in self.item_tables:
                rows = value.new_zeros((len(items), *value.shape[1:]))
                rows[ours] += value
                rows[theirs] += extra
                tensors[name] = rows
            else:
                tensors[name] = value + extra
        return RowUpdate(items, tensors)


@dataclass(frozen=True)
class RowProjection:
    """`[communication] low_rank` for the vectorised shoppers: their touched rows (or a sum of
    them, the projection being linear) projected onto the shared basis; the pipeline's server stage
    (`with_low_rank`) lifts the sum back."""

    stages: LowRankRows

    @classmethod
    def of_run(cls, config: RunConfig) -> RowProjection | None:
        stages = low_rank_stages(config)
        return cls(stages) if stages is not None else None

    def project(self, update: RowUpdate) -> RowUpdate:
        message = ClientMessage(update.tensors, 1.0, 1.0, 1)
        return RowUpdate(update.items, self.stages.client_stage(message).tensors)

    def project_message(self, message: ClientMessage) -> ClientMessage:
        return self.stages.client_stage(message)

    def shapes(self, tensors: Tensors) -> Tensors:
        """Zeros of the projected shapes."""
        return {
            k: v.new_zeros((v.shape[0], self.stages.rank)) if k in self.stages.tables else v
            for k, v in tensors.items()
        }
