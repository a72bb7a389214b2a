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

from dataclasses import replace

import torch

from fedshop.config import RunConfig
from fedshop.fl.compression import (
    Codec,
    Encoded,
    ErrorFeedback,
    LowRankRows,
    SparseRows,
)
from fedshop.fl.compression import codec as make_codec
from fedshop.messages import AggregationPipeline, ClientMessage, Tensors
from fedshop.models.spec import get_model
from fedshop.privacy.noise import ClipUpdate
from fedshop.seeding import torch_generator

_INDEX_BYTES = 4
_HEADER_BYTES_PER_DIM = 8


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
        lossy_with_feedback = com.error_feedback and not base.lossless
        return cls(ErrorFeedback(base) if lossy_with_feedback else base, config.seed, reclip)

    @property
    def lossless(self) -> bool:
        return self.codec.lossless

    def send(self, client: int, round_number: int, message: ClientMessage) -> tuple[Encoded, int]:
        """The client's side: its message encoded, and its size in bytes."""
        generator = torch_generator(self.seed, "wire", client, round_number)
        if isinstance(self.codec, ErrorFeedback):
            encoded = self.codec.encode_for(client, message.tensors, generator)
        else:
            encoded = self.codec.encode(message.tensors, generator)
        return encoded, encoded.nbytes

    def receive(self, encoded: Encoded, message: ClientMessage) -> ClientMessage:
        """The server's side: the decoded tensors in place of the message's own (whose weight and
        counts travel alongside, as in a deployment's message)."""
        tensors = self.codec.decode(encoded)
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


def baseline_bytes(
    rows: torch.Tensor, shared: Tensors, item_tables: tuple[str, ...]
) -> torch.Tensor:
    """What each client's uncompressed message (`SparseRows`) takes, from how many rows of the item
    tables it changed (`rows`, one count per client), without building the messages: the vectorised
    simulator's clients send their touched rows and their whole dense weights."""
    sizes = torch.zeros(len(rows), dtype=torch.int64)
    for name, tensor in shared.items():
        header = _HEADER_BYTES_PER_DIM * tensor.dim()
        as_rows = (
            tensor.reshape(tensor.shape[0], -1) if tensor.dim() >= 2 else tensor.reshape(-1, 1)
        )
        n, width = as_rows.shape
        dense = n * width * 4
        if name in item_tables:
            sparse = rows * (_INDEX_BYTES + width * 4)
            cost = sparse.clamp(max=dense)  # SparseRows sends whichever is smaller
        else:
            cost = torch.full_like(rows, dense)
        sizes += cost + header
    return sizes


def with_low_rank(pipeline: AggregationPipeline, config: RunConfig) -> AggregationPipeline:
    """`pipeline` with `[communication] low_rank`'s projection of the item tables (CoLR): the
    client stage last, after the weighting and clipping, the lift first on the server (it commutes
    with the row means and with any secure sum). The silos and the server build the same."""
    rank = config.communication.low_rank
    if rank == 0:
        return pipeline
    spec = get_model(config.model.name)
    # Only the shapes are wanted: a two-item model shows which item tables are matrices.
    shapes = spec.init_model(2, config.model, torch.Generator().manual_seed(0))
    tables = {n: shapes[n].shape[1] for n in spec.item_tables if shapes[n].dim() == 2}
    stages = LowRankRows(tables, rank, config.seed)
    return replace(
        pipeline,
        client_stages=(*pipeline.client_stages, stages.client_stage),
        server_stages=(stages.server_stage, *pipeline.server_stages),
    )
