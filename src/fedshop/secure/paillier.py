"""Homomorphic aggregation with Paillier (`phe`): exact sums, for small models only.

Trust model (as for CKKS, `ckks.py`)
------------------------------------
* A designated **key holder** (one of the silos, or a separate party) generates the key pair and
  hands out only the public key (the modulus n, as bytes).
* Each **silo** rebuilds the public key from those bytes (it holds no private key), encodes its update
  in fixed point, encrypts it and sends the ciphertexts as bytes.
* The **server** multiplies ciphertexts (Paillier addition, phe's `EncryptedNumber` +) and sends the
  encrypted aggregate to the key holder. It cannot decrypt anything.
* The key holder decrypts **only the aggregate** and releases it.

The server and the key holder must not collude: the key holder could decrypt any one silo's
ciphertext if the server handed it one. `phe` has no threshold decryption. Unlike CKKS, a Paillier
decryption is exact, so releasing the sum leaks nothing about the key. Parties are
honest-but-curious: nothing proves that a silo's ciphertexts hold values within ±bound (that would
take zero-knowledge range proofs), so a malicious silo can corrupt the sum, though not read it.

Keys are generated once per `PaillierSum` (once per training run) and reused by every round; their
one-off cost is reported as `details["key_setup_seconds"]`, outside the per-round times.

Fixed point and precision
-------------------------
With `precision_bits = p`, a value x within ±bound becomes round(x·2^p/bound) + 2^p, an integer in
[0, 2^(p+1)] (the offset makes negative values non-negative). The resolution is bound·2^-p: at the
default p = 48, 3.6e-15 for bound 1 and 1.5e-11 for [protection] bound = 4096, finer than float32
resolves an update entry of 1e-3. The decrypted sum of n silos is exact up to the rounding:
|error| ≤ n·0.5·bound·2^-p per value, plus the float64 rounding of the result
(`PaillierSum.precision`). p is at most 52: the inputs are float64.

Packing
-------
A 2048-bit plaintext holds far more than one such integer, so `packing` (the default) puts several in
one plaintext, each in a slot wide enough that the sum of n silos cannot carry into the next:
slot_bits = bit length of n·2^(p+1), 53 bits for ten silos at p = 48, hence 38 values per ciphertext
(55 at p = 32). Packing changes only the encoding, not the encryption, so it keeps Paillier's
security; it divides the encryption time and the bytes by the number of values per ciphertext.
`packing=False` encrypts one value per ciphertext (the textbook cost).

Cost (stated plainly)
---------------------
Every ciphertext costs one exponentiation modulo n² (a 4096-bit modulus for 2048-bit keys). Measured
on the 2-core development machine with phe 1.5.0: **92 ms per 2048-bit encryption** in pure Python,
10.7 ms with gmpy2 installed (phe uses it when present); decryption 26 ms (3.1 ms with gmpy2); a
ciphertext is 512 bytes. One value per ciphertext, 1M parameters would take 26 hours per silo in pure
Python (3 hours with gmpy2) and 512 MB. Packed (38 values per ciphertext, ten silos, p = 48): 2.4 ms
per value, so about 40 minutes and 13.5 MB per silo per 1M parameters in pure Python (4.7 minutes
with gmpy2), plus the key holder's decryption (~11 minutes; 1.4 with gmpy2). CKKS (`ckks.py`)
encrypts 1M values in about a second, so Paillier is for small models; `max_values` (default 20,000
values per silo: ~50 s per silo in pure Python) refuses longer vectors with the estimated time,
measured when the keys are made.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from phe import paillier
from phe.paillier import EncryptedNumber, PaillierPublicKey

from fedshop.config import ProtectionConfig
from fedshop.secure.protocol import (
    ProtectionError,
    SecureSumResult,
    check_inputs,
    key_holder_round,
)

# Packed plaintexts stay below 2^(key_bits - 3) < n/3: phe's integer encoding treats larger
# plaintexts as negative numbers or overflow (phe's max_int is n // 3 - 1).
_HEADROOM_BITS = 3
_CALIBRATION_ENCRYPTIONS = 3


@dataclass(frozen=True)
class PaillierLayout:
    """How one round's vectors map to plaintexts; every party derives the same layout."""

    scale: float  # 2^p / bound: one fixed-point step is 1/scale
    offset: int  # 2^p: shifts [-2^p, 2^p] to [0, 2^(p+1)]
    slot_bits: int  # width of one packed value: holds the sum of n_clients encoded values
    per_ciphertext: int
    length: int
    n_clients: int

    @classmethod
    def for_round(
        cls,
        *,
        bound: float,
        n_clients: int,
        length: int,
        precision_bits: int,
        key_bits: int,
        packing: bool,
    ) -> PaillierLayout:
        offset = 1 << precision_bits
        slot_bits = (n_clients * 2 * offset).bit_length()
        usable = key_bits - _HEADROOM_BITS
        if slot_bits > usable:
            raise ProtectionError(
                f"a {key_bits}-bit Paillier key cannot hold the sum of {n_clients} silos' values "
                f"at {precision_bits} bits of precision; lower precision_bits"
            )
        return cls(
            scale=offset / bound,
            offset=offset,
            slot_bits=slot_bits,
            per_ciphertext=usable // slot_bits if packing else 1,
            length=length,
            n_clients=n_clients,
        )

    @property
    def ciphertexts(self) -> int:
        return max(1, -(-self.length // self.per_ciphertext))

    def encode(self, vector: np.ndarray) -> list[int]:
        """Packed plaintexts: slot j of plaintext i holds value i·per_ciphertext + j."""
        # |x·scale| ≤ 2^p (inputs are checked against the bound), so int64 is exact for p ≤ 52.
        encoded = np.rint(vector * self.scale).astype(np.int64) + self.offset
        padded = encoded.tolist() + [0] * (self.ciphertexts * self.per_ciphertext - self.length)
        plaintexts = []
        for start in range(0, len(padded), self.per_ciphertext):
            packed = 0
            for value in reversed(padded[start : start + self.per_ciphertext]):
                packed = (packed << self.slot_bits) | value
            plaintexts.append(packed)
        return plaintexts

    def decode(self, sums: Sequence[int]) -> np.ndarray:
        """The float sum from the decrypted packed sums: unpack, remove n offsets, unscale."""
        mask = (1 << self.slot_bits) - 1
        shift = self.n_clients * self.offset
        values = [
            float(((packed >> (self.slot_bits * j)) & mask) - shift)
            for packed in sums
            for j in range(self.per_ciphertext)
        ]
        return np.array(values[: self.length], dtype=np.float64) / self.scale


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:,.1f} h"


def _ciphertext_bytes(public_key: PaillierPublicKey) -> int:
    return (public_key.nsquare.bit_length() + 7) // 8


def _pack(ciphertexts: Sequence[int], width: int) -> bytes:
    return b"".join(c.to_bytes(width, "big") for c in ciphertexts)


def _unpack(message: bytes, public_key: PaillierPublicKey, count: int, who: str) -> list[int]:
    width = _ciphertext_bytes(public_key)
    if len(message) != count * width:
        raise ProtectionError(
            f"{who} sent {len(message)} bytes; the round expects {count} ciphertexts of {width}"
        )
    ciphertexts = [
        int.from_bytes(message[i : i + width], "big") for i in range(0, len(message), width)
    ]
    if any(not 0 < c < public_key.nsquare for c in ciphertexts):
        raise ProtectionError(f"{who} sent a ciphertext outside [1, n²)")
    return ciphertexts


def pack_ciphertexts(ciphertexts: Sequence[int], public_key: PaillierPublicKey) -> bytes:
    """Raw ciphertexts as one message, each as wide as n² (the format every party here reads)."""
    return _pack(ciphertexts, _ciphertext_bytes(public_key))


def unpack_ciphertexts(
    message: bytes, public_key: PaillierPublicKey, count: int, who: str
) -> list[int]:
    """The raw ciphertexts in a `pack_ciphertexts` message; a wrong length or a value outside
    [1, n²) raises `ProtectionError` naming `who` sent it."""
    return _unpack(message, public_key, count, who)


# ---------------------------------------------------------------------------------------------
# The three parties
# ---------------------------------------------------------------------------------------------


class PaillierKeyHolder:
    """Generates the key pair, hands out the public key, decrypts aggregates (and nothing else)."""

    def __init__(self, key_bits: int) -> None:
        public, self._private = paillier.generate_paillier_keypair(n_length=key_bits)
        self._public = public

    def public_key(self) -> bytes:
        """The modulus n: all a silo or the server needs (g = n + 1 in phe)."""
        n = self._public.n
        return n.to_bytes((n.bit_length() + 7) // 8, "big")

    def decrypt(self, aggregate: bytes, layout: PaillierLayout) -> np.ndarray:
        ciphertexts = _unpack(aggregate, self._public, layout.ciphertexts, "the server")
        try:
            sums = [
                self._private.decrypt(EncryptedNumber(self._public, c, exponent=0))
                for c in ciphertexts
            ]
        except (OverflowError, ValueError) as error:
            # Only a silo that encrypted out-of-range plaintexts can make the sum overflow.
            raise ProtectionError(f"the Paillier aggregate does not decode: {error}") from None
        return layout.decode(sums)

    def decrypt_residues(self, message: bytes, count: int, who: str) -> list[int]:
        """The plaintexts of `count` packed ciphertexts as residues in [0, n), undecoded: for
        protocols whose plaintexts are masked with a uniform value mod n (vertical logistic
        regression), which phe's signed decoding would reject as overflow."""
        ciphertexts = _unpack(message, self._public, count, who)
        return [self._private.raw_decrypt(c) for c in ciphertexts]


class PaillierSilo:
    """A silo's side: fixed-point encodes and encrypts its update. Holds no private key."""

    def __init__(self, public_key: bytes) -> None:
        self.public_key = PaillierPublicKey(int.from_bytes(public_key, "big"))

    def encrypt(self, vector: np.ndarray, layout: PaillierLayout) -> bytes:
        # encrypt() draws a fresh r < n from the OS and multiplies by r^n mod n² (the slow part).
        ciphertexts = [self.public_key.encrypt(m).ciphertext() for m in layout.encode(vector)]
        return _pack(ciphertexts, _ciphertext_bytes(self.public_key))


class PaillierServer:
    """Adds silos' ciphertexts with phe's `EncryptedNumber` addition. Cannot decrypt."""

    def __init__(self, public_key: bytes) -> None:
        self.public_key = PaillierPublicKey(int.from_bytes(public_key, "big"))
        self._totals: list[EncryptedNumber] | None = None
        self._layout: PaillierLayout | None = None

    def start_round(self, layout: PaillierLayout) -> None:
        self._totals, self._layout = None, layout

    def receive(self, index: int, message: bytes) -> None:
        assert self._layout is not None, "start_round first"
        ciphertexts = _unpack(message, self.public_key, self._layout.ciphertexts, f"silo {index}")
        numbers = [EncryptedNumber(self.public_key, c, exponent=0) for c in ciphertexts]
        if self._totals is None:
            self._totals = numbers
        else:
            self._totals = [
                total + number for total, number in zip(self._totals, numbers, strict=True)
            ]

    def finish(self) -> bytes:
        if self._totals is None:
            raise ProtectionError("no silo sent ciphertexts; nothing to aggregate")
        # be_secure=False: a product of freshly randomised ciphertexts is already randomised, and
        # re-randomising would cost one more exponentiation per ciphertext.
        ciphertexts = [total.ciphertext(be_secure=False) for total in self._totals]
        self._totals = None
        return _pack(ciphertexts, _ciphertext_bytes(self.public_key))


# ---------------------------------------------------------------------------------------------
# The in-process driver
# ---------------------------------------------------------------------------------------------


@dataclass
class PaillierSum:
    """`SecureSum` by Paillier: all parties in this process, each party's work timed separately.

    The key pair is made on the first round and kept for later ones (`new_keys()` rotates it).
    """

    key_bits: int = 2048
    precision_bits: int = 48  # resolution bound·2^-precision_bits (see the module docstring)
    packing: bool = True
    max_values: int = 20_000  # per silo; longer vectors raise with the estimated time
    kind: str = "paillier"
    _parties: tuple[PaillierKeyHolder, PaillierSilo, PaillierServer] | None = field(
        default=None, init=False, repr=False
    )
    _setup: dict = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_config(cls, config: ProtectionConfig) -> PaillierSum:
        return cls(key_bits=config.paillier_key_bits)

    def __post_init__(self) -> None:
        if self.key_bits < 512 or self.key_bits % 8:
            raise ProtectionError(
                f"Paillier key_bits must be a multiple of 8 and at least 512 (2048 for real "
                f"use); got {self.key_bits}"
            )
        if not 1 <= self.precision_bits <= 52:
            raise ProtectionError(
                f"Paillier precision_bits must be 1 to 52 (a float64 holds 53); got "
                f"{self.precision_bits}"
            )
        if self.max_values < 1:
            raise ProtectionError(f"Paillier max_values must be positive; got {self.max_values}")

    def precision(self, bound: float, n_clients: int) -> float:
        """Absolute error bound per value of a decrypted sum: n half-steps of fixed-point rounding,
        plus double-precision rounding of the result (relative 2^-52, generous)."""
        return n_clients * bound * (2.0 ** -(self.precision_bits + 1) + 2.0**-52)

    def layout(self, bound: float, n_clients: int, length: int) -> PaillierLayout:
        return PaillierLayout.for_round(
            bound=bound,
            n_clients=n_clients,
            length=length,
            precision_bits=self.precision_bits,
            key_bits=self.key_bits,
            packing=self.packing,
        )

    def new_keys(self) -> None:
        """Forget the key pair; the next round generates a fresh one."""
        self._parties, self._setup = None, {}

    def parties(self) -> tuple[PaillierKeyHolder, PaillierSilo, PaillierServer]:
        """The key holder, the silos' public key and the server, made on first use; also times a
        few encryptions here, for the `max_values` estimate."""
        if self._parties is None:
            started = time.perf_counter()
            holder = PaillierKeyHolder(self.key_bits)
            public = holder.public_key()
            silo, server = PaillierSilo(public), PaillierServer(public)
            setup_seconds = time.perf_counter() - started
            started = time.perf_counter()
            for _ in range(_CALIBRATION_ENCRYPTIONS):
                silo.public_key.encrypt(int.from_bytes(os.urandom(8), "big"))
            per_ciphertext = (time.perf_counter() - started) / _CALIBRATION_ENCRYPTIONS
            self._parties = (holder, silo, server)
            self._setup = {
                "key_setup_seconds": setup_seconds,
                "seconds_per_ciphertext": per_ciphertext,
            }
        return self._parties

    def estimated_seconds_per_silo(self, bound: float, n_clients: int, length: int) -> float:
        """Encryption time one silo would spend on `length` values, from the measured rate."""
        self.parties()
        layout = self.layout(bound, n_clients, length)
        return layout.ciphertexts * self._setup["seconds_per_ciphertext"]

    def sum(self, vectors: Sequence[np.ndarray], bound: float) -> SecureSumResult:
        length = check_inputs(vectors, bound)
        n = len(vectors)
        layout = self.layout(bound, n, length)
        if length > self.max_values:
            seconds = self.estimated_seconds_per_silo(bound, n, length)
            raise ProtectionError(
                f"Paillier would encrypt {length:,} values per silo as {layout.ciphertexts:,} "
                f"ciphertexts ({layout.per_ciphertext} values each), about {_duration(seconds)} per "
                f"silo at {1e3 * self._setup['seconds_per_ciphertext']:.1f} ms per "
                f"{self.key_bits}-bit encryption measured here; use kind 'ckks' or 'secagg' "
                f"for models this size, or raise max_values (now {self.max_values:,})"
            )
        holder, silo, server = self.parties()

        server.start_round(layout)
        result = key_holder_round(
            vectors,
            encrypt=lambda vector: silo.encrypt(vector, layout),
            receive=server.receive,
            finish=server.finish,
            decrypt=lambda aggregate: holder.decrypt(aggregate, layout),
            kind=self.kind,
            details={
                "ciphertexts_per_client": layout.ciphertexts,
                "values_per_ciphertext": layout.per_ciphertext,
                "slot_bits": layout.slot_bits,
                "key_bits": self.key_bits,
                "resolution": 1.0 / layout.scale,
                "precision": self.precision(bound, n),
                **self._setup,
            },
        )
        encrypt_seconds = result.cost.client_seconds
        result.cost.details["encrypt_ms_per_value"] = (
            1e3 * float(np.mean(encrypt_seconds)) / max(length, 1)
        )
        return result
