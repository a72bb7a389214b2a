"""What every protection offers the aggregation pipeline: a sum of the clients' vectors that the
server computes without seeing any one of them.

The pipeline flattens each client's (clipped, weighted) update into one float64 vector; a
`SecureSum` returns the sum of those vectors and what the protection cost. Each protection keeps
its own trust model (see its module): SecAgg trusts no single party with an individual update;
CKKS and Paillier trust a key holder not to collude with the server.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from fedshop.errors import FedShopError


class ProtectionError(FedShopError):
    """A protected round cannot complete: a tampered or malformed message, too many dropouts, or an
    input outside the range the protection was set up for."""


@dataclass(frozen=True)
class ProtectionCost:
    """Measured cost of one protected sum.

    `client_seconds` is each client's own protocol work (quantising, masking or encrypting, key
    agreement); in a deployment clients work in parallel, so a round waits for the slowest one.
    `server_seconds` is the server's (or key holder's) work. Bytes count what each client sends.
    """

    kind: str
    client_seconds: list[float]
    server_seconds: float
    bytes_sent_per_client: list[int]
    details: dict = field(default_factory=dict)

    @property
    def latency_seconds(self) -> float:
        """Round time added in a deployment: the slowest client plus the server."""
        return max(self.client_seconds, default=0.0) + self.server_seconds

    @property
    def total_seconds(self) -> float:
        """All parties' work added up (what the one-process simulator waits for)."""
        return sum(self.client_seconds) + self.server_seconds

    @property
    def mean_bytes_per_client(self) -> float:
        sent = self.bytes_sent_per_client
        return float(np.mean(sent)) if sent else 0.0


@dataclass(frozen=True)
class SecureSumResult:
    total: np.ndarray  # float64: the sum of the contributing clients' vectors
    contributors: list[int]  # indices (into the input list) whose vectors are in the sum
    cost: ProtectionCost


class SecureSum(Protocol):
    kind: str

    def sum(self, vectors: Sequence[np.ndarray], bound: float) -> SecureSumResult:
        """Sum `vectors` (equal-length float arrays, every entry within ±`bound`) so that the server
        learns only the total. Raises `ProtectionError` for inputs it cannot protect."""
        ...


def check_inputs(vectors: Sequence[np.ndarray], bound: float) -> int:
    """Shared input checks; returns the vector length. A wrong shape or an entry out of range is a
    clear error, never a silent clip (that would change the model without anyone knowing)."""
    if not vectors:
        raise ProtectionError("no client vectors to aggregate")
    if not bound > 0 or not np.isfinite(bound):
        raise ProtectionError(
            f"the protection's value bound must be positive and finite; got {bound}"
        )
    length = None
    for index, vector in enumerate(vectors):
        if vector.ndim != 1:
            raise ProtectionError(f"client {index} sent a {vector.ndim}-d array; expected a vector")
        if length is None:
            length = vector.shape[0]
        elif vector.shape[0] != length:
            raise ProtectionError(
                f"client {index} sent {vector.shape[0]} values; the round expects {length}"
            )
        if not np.all(np.isfinite(vector)):
            raise ProtectionError(f"client {index} sent a non-finite value")
        peak = float(np.max(np.abs(vector))) if vector.size else 0.0
        if peak > bound:
            raise ProtectionError(
                f"client {index} sent a value of magnitude {peak:.4g}, beyond the protected range "
                f"±{bound:.4g}; raise [protection] bound (or clip updates with [privacy] clip)"
            )
    assert length is not None
    return length


def key_holder_round(
    vectors: Sequence[np.ndarray],
    encrypt: Callable[[np.ndarray], bytes],
    receive: Callable[[int, bytes], None],
    finish: Callable[[], bytes],
    decrypt: Callable[[bytes], np.ndarray],
    kind: str,
    details: dict,
) -> SecureSumResult:
    """One round of homomorphic aggregation (CKKS, Paillier), each party timed on its own: every silo
    encrypts and sends, the server adds each ciphertext as it arrives (so it holds one at a time),
    the key holder decrypts only the aggregate."""
    encrypt_seconds: list[float] = []
    sent: list[int] = []
    aggregate_seconds = 0.0
    for index, vector in enumerate(vectors):
        started = time.perf_counter()
        message = encrypt(np.asarray(vector, dtype=np.float64))
        encrypt_seconds.append(time.perf_counter() - started)
        sent.append(len(message))
        started = time.perf_counter()
        receive(index, message)
        aggregate_seconds += time.perf_counter() - started
    started = time.perf_counter()
    aggregate = finish()
    aggregate_seconds += time.perf_counter() - started
    started = time.perf_counter()
    total = decrypt(aggregate)
    decrypt_seconds = time.perf_counter() - started
    cost = ProtectionCost(
        kind=kind,
        client_seconds=encrypt_seconds,
        server_seconds=aggregate_seconds + decrypt_seconds,
        bytes_sent_per_client=sent,
        details={
            "encrypt_seconds": encrypt_seconds,
            "aggregate_seconds": aggregate_seconds,
            "decrypt_seconds": decrypt_seconds,
            "ciphertext_bytes_per_client": float(np.mean(sent)),
            "plaintext_bytes_per_client": len(vectors[0]) * 4,  # float32, as sent unprotected
            "aggregate_bytes": len(aggregate),
            **details,
        },
    )
    return SecureSumResult(total=total, contributors=list(range(len(vectors))), cost=cost)
