"""Homomorphic aggregation with CKKS (TenSEAL, on Microsoft SEAL) for the cross-silo setting.

Trust model
-----------
* A designated **key holder** (one of the silos, or a separate party) creates the CKKS context and
  its secret key. It hands out only the *public* context (`serialize(save_secret_key=False)`, without
  relinearisation or Galois keys: additions need neither).
* Each **silo** loads that public context (it holds no secret-key object), splits its packed update
  into chunks of `slot_count = poly_modulus_degree / 2` values, encrypts every chunk under the public
  key and sends the serialised ciphertexts.
* The **server** loads the same public context, adds the ciphertexts and sends the encrypted
  aggregate to the key holder. It holds no secret key and learns nothing from the ciphertexts.
* The key holder decrypts **only the aggregate** and releases it (to the server, which updates the
  model). It never sees an individual silo's ciphertext.

The server and the key holder must not collude: the key holder could decrypt any single silo's
ciphertext if the server handed it one. TenSEAL has no threshold decryption, so the key cannot be
split among silos; use SecAgg (`secagg.py`) when no party may be trusted this way. Parties are
honest-but-curious: nothing proves that a silo's ciphertexts hold values within ±bound (that would
take zero-knowledge range proofs), so a malicious silo can corrupt the sum, though not read it.

Releasing a CKKS decryption is itself a risk (Li & Micciancio, EUROCRYPT 2021): the server knows the
aggregate ciphertext (c0, c1), and an exact decryption reveals c0 + c1·s, from which two rounds give
the secret key s by linear algebra, and with it every silo's update. So the key holder *floods* what
it releases: it adds fresh Gaussian noise to every decrypted value (`flood_sigma`, the noise's standard
deviation in the coefficient domain, default 32 = ten times the 3.2 of SEAL's encryption error). The
server then learns c1·s plus fresh Gaussian noise: a ring-LWE sample, the assumption the scheme's
security already rests on. This is the heuristic mitigation used in practice (PALISADE/Lattigo);
provable IND-CPA^D security needs flooding 2^(statistical security) times larger than the decryption
noise, which at scale 2^40 would cost all useful precision. `flood_sigma=0` turns flooding off: only
safe when the decrypted sum stays with the key holder.

Parameters and cost
-------------------
Additions need no rescaling, so the default coefficient modulus is the smallest TenSEAL accepts: one
60-bit data prime plus the special prime ([60, 40], 100 bits; the HE standard allows 218 bits at
N = 8192 for 128-bit security). Encryption costs the same per prime whatever its size, and every extra
data prime adds about 25% to encryption and doubles the bytes, so one data prime is the fast choice.
With scale Δ = 2^40 the aggregate must stay within ±2^17 (a quarter of the data prime, divided by Δ)
and the error is ~1e-9 per value (below).

Measured on the 2-core development machine (shared with other jobs, so wall times are noisy), per
1,000,000 values and one silo: encryption takes 0.67 CPU-seconds in TenSEAL's worker threads (the
chunks are spread over `n_threads`) plus ~0.25 s of conversion and serialisation in the calling
thread (0.94 s wall here), and yields 32.1 MB of ciphertext (8x the float32 update); the server
loads and adds one silo's ciphertexts in ~0.05 s; the key holder decrypts 1M values in ~0.29 s.
Ten silos × 1M values, everything in one process: 10.2 s here, all of it CPU (6.7 CPU-s in the two
encryption threads), so about 6.7 s on two otherwise idle cores. Packing two values per complex
slot would halve the time and the bytes, but TenSEAL's tensors encode only real values (its raw
SEAL bindings can, single-threaded and serialising through files).

Precision (measured, N = 8192, scale Δ = 2^40)
---------------------------------------------
The error of a decrypted sum does not depend on the values: the fresh encryption noise, after SEAL
drops the special prime, is the rounding r0 + r1·s, which in each slot has standard deviation
N/(6·Δ) = 1.24e-9 (measured 1.245e-9 over 4M values; the same formula held within 1% for
N = 4096…16384 and other primes). Summing n silos multiplies it by √n (measured 2.50e-9 for n = 4,
3.9e-9 for n = 10, 5.0e-9 for n = 16). The tails are heavier than Gaussian: the error in a slot is
proportional to the secret key's value there, so some slots are always noisier (the noisiest slot of
each of 10 keys had 2.7 to 3.3 times the average standard deviation). Over 20M values and 10 keys the
largest error was 13.4 standard deviations (1.7e-8 for one silo); values beyond 12 were 5e-8 of all.
Flooding adds Gaussian noise of standard deviation flood_sigma·√(N/2)/Δ = 1.9e-9 by default.
`CkksSum.precision(bound, n)` states 30 standard deviations of the encryption noise (about 7 in the
noisiest slot of an unlucky key) plus 7 of the flooding noise: 5.0e-8 for one silo, 1.3e-7 for ten
at the defaults, about three times the largest error measured.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import tenseal as ts
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedshop.config import ProtectionConfig
from fedshop.secure.protocol import (
    ProtectionError,
    SecureSumResult,
    check_inputs,
    key_holder_round,
)

# Largest total coefficient modulus (bits) for 128-bit classical security with a ternary secret,
# from the Homomorphic Encryption Standard (Albrecht et al. 2018, table 1).
HE_STANDARD_MAX_BITS = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}

# Standard deviations of the encryption noise that `precision` allows (see the module docstring):
# the worst of 20M measured values was 13.4, and the noisiest slot of a key is ~3 times noisier than
# the average, so 30 (~7 Gaussian deviations in a slot 4.5 times noisier) covers billions of values.
_NOISE_STDS = 30.0
_FLOOD_STDS = 7.0  # Gaussian: a 7-sigma excursion has probability ~3e-12 per value
_TENSEAL_ERRORS = (ValueError, RuntimeError, TypeError)


def _secure_normal(count: int) -> np.ndarray:
    """Standard normal samples from a cryptographic source (AES-CTR keystream under a fresh random
    key, Box–Muller): the flooding noise must not be predictable by whoever sees the output."""
    pairs = (count + 1) // 2
    key = os.urandom(32)
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(16 * pairs))
    words = np.frombuffer(stream, dtype=np.uint64).reshape(2, pairs)
    # 53-bit uniforms in (0, 1]: the logarithm never sees zero.
    u1 = ((words[0] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53
    u2 = (words[1] >> np.uint64(11)).astype(np.float64) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * np.pi * u2
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]


@dataclass(frozen=True)
class CkksParams:
    """The CKKS parameters all parties share (public: they are part of the public context)."""

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale: float

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def max_sum(self) -> float:
        """Largest |aggregate| that decrypts correctly, with a factor-of-2 margin: a sum wraps
        around when a coefficient reaches half the data modulus; no coefficient exceeds Δ times the
        largest slot value, and each data prime of b bits is at least 2^(b-1)."""
        data_bits = sum(b - 1 for b in self.coeff_mod_bit_sizes[:-1])
        return 2.0 ** (data_bits - 2) / self.scale

    def noise_std(self, n_clients: int) -> float:
        """Standard deviation of the encryption noise in a sum of n silos' ciphertexts (measured to
        follow N/(6·Δ)·√n, see the module docstring)."""
        return self.poly_modulus_degree / (6.0 * self.scale) * math.sqrt(n_clients)

    def flood_std(self, flood_sigma: float) -> float:
        """Standard deviation, per released value, of coefficient-domain noise `flood_sigma`: a slot's
        real part sums N/2 coefficients' worth of variance."""
        return flood_sigma * math.sqrt(self.slots) / self.scale

    def validate(self) -> None:
        n, bits = self.poly_modulus_degree, self.coeff_mod_bit_sizes
        if n not in HE_STANDARD_MAX_BITS or n < 2048:
            raise ProtectionError(
                f"CKKS poly_modulus_degree must be a power of two from 2048 to 32768; got {n}"
            )
        if len(bits) < 2:
            raise ProtectionError(
                "CKKS coeff_mod_bit_sizes needs at least two primes (data primes, then the special "
                f"prime TenSEAL's key generation requires); got {list(bits)}"
            )
        if any(not 20 <= b <= 60 for b in bits):
            raise ProtectionError(
                f"CKKS primes must have 20 to 60 bits (SEAL's limit); got {list(bits)}"
            )
        if sum(bits) > HE_STANDARD_MAX_BITS[n]:
            raise ProtectionError(
                f"CKKS coefficient modulus of {sum(bits)} bits at poly_modulus_degree {n} is below "
                f"128-bit security (the HE standard allows {HE_STANDARD_MAX_BITS[n]} bits)"
            )
        if not (math.isfinite(self.scale) and self.scale > 1):
            raise ProtectionError(f"CKKS global_scale must be finite and above 1; got {self.scale}")
        if self.max_sum < 1:
            raise ProtectionError(
                f"CKKS global_scale 2^{math.log2(self.scale):.1f} leaves no room for values: the "
                f"data primes {list(bits[:-1])} hold sums up to only ±{self.max_sum:.3g}; lower "
                "the scale or add a data prime"
            )

    def check_fits(self, bound: float, n_clients: int) -> None:
        if n_clients * bound > self.max_sum:
            raise ProtectionError(
                f"a CKKS sum of {n_clients} silos' values within ±{bound:.4g} can reach "
                f"{n_clients * bound:.4g}, beyond the ±{self.max_sum:.4g} the data primes "
                f"{list(self.coeff_mod_bit_sizes[:-1])} hold at scale "
                f"2^{math.log2(self.scale):.1f}; lower global_scale, add a data prime to "
                "coeff_mod_bit_sizes, or lower [secure] bound"
            )


# ---------------------------------------------------------------------------------------------
# The three parties
# ---------------------------------------------------------------------------------------------


class CkksKeyHolder:
    """Creates the keys, hands out the public context, decrypts aggregates (and nothing else)."""

    def __init__(self, params: CkksParams, n_threads: int) -> None:
        self.params = params
        try:
            context = ts.context(
                ts.SCHEME_TYPE.CKKS,
                params.poly_modulus_degree,
                coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
                n_threads=n_threads,
            )
        except _TENSEAL_ERRORS as error:
            raise ProtectionError(f"TenSEAL rejected the CKKS parameters: {error}") from None
        context.global_scale = params.scale
        self._context = context

    def public_context(self) -> bytes:
        """What silos and the server receive: parameters and public key, no secret key."""
        return self._context.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=False,
        )

    def decrypt(self, aggregate: bytes, length: int, chunks: int, flood_sigma: float) -> np.ndarray:
        """The aggregate's first `length` values, flooded before release (module docstring)."""
        try:
            tensor = ts.ckks_tensor_from(self._context, aggregate)
            values = np.asarray(tensor.decrypt().raw, dtype=np.float64)
        except _TENSEAL_ERRORS as error:
            raise ProtectionError(f"the encrypted aggregate does not decrypt: {error}") from None
        if values.size != self.params.slots * chunks:
            raise ProtectionError(
                f"the encrypted aggregate holds {values.size} values; the round expects "
                f"{self.params.slots * chunks}"
            )
        # Decrypted column j is chunk j: undo the (slots, chunks) layout the silos encrypted.
        total = values.reshape(self.params.slots, chunks).T.reshape(-1)[:length].copy()
        if flood_sigma > 0:
            total += self.params.flood_std(flood_sigma) * _secure_normal(length)
        return total


def _tensor_shape(chunks: int) -> list[int]:
    """The shape TenSEAL reports for a silo's encrypted batch (see `CkksSilo.encrypt`)."""
    return [chunks] if chunks > 1 else []


def _load_public(public_context: bytes, n_threads: int, who: str) -> ts.Context:
    context = ts.context_from(public_context, n_threads=n_threads)
    if context.is_private() or context.has_secret_key():
        raise ProtectionError(f"the CKKS context sent to the {who} carries a secret key")
    return context


class CkksSilo:
    """A silo's side: encrypts its update under the public key. Holds no secret key."""

    def __init__(self, public_context: bytes, n_threads: int, params: CkksParams) -> None:
        self.context = _load_public(public_context, n_threads, "silos")
        self.params = params

    def encrypt(self, vector: np.ndarray, chunks: int) -> bytes:
        """Serialised ciphertexts of the zero-padded vector, `chunks` ciphertexts of `slots` values:
        column j of the (slots, chunks) batch is chunk j, so TenSEAL encrypts one ciphertext per
        chunk, spread over its worker threads."""
        slots = self.params.slots
        padded = np.zeros(chunks * slots, dtype=np.float64)
        padded[: vector.shape[0]] = vector
        # One chunk goes as a flat vector: TenSEAL 0.3.18 mis-encrypts a (slots, 1) batch (every
        # slot decrypts to the first value).
        batch = ts.plain_tensor(padded.reshape(chunks, slots).T if chunks > 1 else padded)
        encrypted = ts.ckks_tensor(self.context, batch, scale=self.params.scale, batch=True)
        return encrypted.serialize()


class CkksServer:
    """Adds silos' ciphertexts. Holds only the public context: it cannot decrypt anything."""

    def __init__(self, public_context: bytes, n_threads: int, params: CkksParams) -> None:
        self.context = _load_public(public_context, n_threads, "server")
        self.params = params
        self._total: ts.CKKSTensor | None = None
        self._chunks = 0

    def start_round(self, chunks: int) -> None:
        self._total, self._chunks = None, chunks

    def receive(self, index: int, message: bytes) -> None:
        try:
            tensor = ts.ckks_tensor_from(self.context, message)
        except _TENSEAL_ERRORS as error:
            raise ProtectionError(
                f"silo {index} sent ciphertexts that do not load: {error}"
            ) from None
        expected = _tensor_shape(self._chunks)
        if tensor.shape != expected:
            raise ProtectionError(
                f"silo {index} sent ciphertexts of shape {tensor.shape}; the round expects "
                f"{expected}"
            )
        if tensor.scale() != self.params.scale:
            raise ProtectionError(
                f"silo {index} encrypted at scale {tensor.scale():.4g}; the round uses "
                f"{self.params.scale:.4g}"
            )
        if self._total is None:
            self._total = tensor
            return
        try:
            self._total += tensor
        except _TENSEAL_ERRORS as error:
            raise ProtectionError(
                f"silo {index}'s ciphertexts do not add to the others': {error}"
            ) from None

    def finish(self) -> bytes:
        """The encrypted aggregate, serialised for the key holder."""
        if self._total is None:
            raise ProtectionError("no silo sent ciphertexts; nothing to aggregate")
        message = self._total.serialize()
        self._total = None
        return message


# ---------------------------------------------------------------------------------------------
# The in-process driver
# ---------------------------------------------------------------------------------------------


@dataclass
class CkksSum:
    """`SecureSum` by CKKS: all parties in this process, each party's work timed separately.

    Keys are made once, on the first round, and reused by later rounds (a deployment runs the key
    setup once per training run); `details["key_setup_seconds"]` reports that one-off cost.
    In this process one public-context object stands for every silo's identical copy.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: Sequence[int] = (60, 40)
    global_scale: float = 2.0**40
    n_threads: int | None = None  # TenSEAL worker threads; None: os.cpu_count()
    flood_sigma: float = 32.0  # noise the key holder adds before release; 0: none (see module doc)
    kind: str = "ckks"
    params: CkksParams = field(init=False, repr=False)
    _parties: tuple[CkksKeyHolder, CkksSilo, CkksServer] | None = field(
        default=None, init=False, repr=False
    )
    _setup: dict = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_config(cls, config: ProtectionConfig) -> CkksSum:
        return cls()

    def __post_init__(self) -> None:
        self.params = CkksParams(
            int(self.poly_modulus_degree),
            tuple(int(b) for b in self.coeff_mod_bit_sizes),
            float(self.global_scale),
        )
        self.params.validate()
        if self.n_threads is None:
            self.n_threads = os.cpu_count() or 1
        if self.n_threads < 1:
            raise ProtectionError(f"CKKS n_threads must be at least 1; got {self.n_threads}")
        if not (math.isfinite(self.flood_sigma) and self.flood_sigma >= 0):
            raise ProtectionError(f"CKKS flood_sigma must be ≥ 0; got {self.flood_sigma}")

    @property
    def slot_count(self) -> int:
        return self.params.slots

    def precision(self, bound: float, n_clients: int) -> float:
        """Absolute error bound on every value of a decrypted sum of `n_clients` silos' vectors
        within ±`bound`: 30 standard deviations of the encryption noise, 7 of the flooding noise,
        and double-precision rounding of the decoded values (never seen in measurements; 2^-45
        relative is generous). Derivation and measurements: module docstring."""
        return (
            _NOISE_STDS * self.params.noise_std(n_clients)
            + _FLOOD_STDS * self.params.flood_std(self.flood_sigma)
            + n_clients * bound * 2.0**-45
        )

    def parties(self) -> tuple[CkksKeyHolder, CkksSilo, CkksServer]:
        """The key holder, the silos' public context and the server, made on first use."""
        if self._parties is None:
            started = time.perf_counter()
            holder = CkksKeyHolder(self.params, self.n_threads)
            public = holder.public_context()
            silo = CkksSilo(public, self.n_threads, self.params)
            server = CkksServer(public, self.n_threads, self.params)
            self._parties = (holder, silo, server)
            self._setup = {
                "key_setup_seconds": time.perf_counter() - started,
                "public_context_bytes": len(public),
            }
        return self._parties

    def sum(self, vectors: Sequence[np.ndarray], bound: float) -> SecureSumResult:
        length = check_inputs(vectors, bound)
        n = len(vectors)
        self.params.check_fits(bound, n)
        holder, silo, server = self.parties()
        chunks = max(1, -(-length // self.params.slots))

        server.start_round(chunks)
        return key_holder_round(
            vectors,
            encrypt=lambda vector: silo.encrypt(vector, chunks),
            receive=server.receive,
            finish=server.finish,
            decrypt=lambda aggregate: holder.decrypt(aggregate, length, chunks, self.flood_sigma),
            kind=self.kind,
            details={
                "slots": self.params.slots,
                "ciphertexts_per_client": chunks,
                "poly_modulus_degree": self.params.poly_modulus_degree,
                "coeff_mod_bit_sizes": list(self.params.coeff_mod_bit_sizes),
                "scale_bits": math.log2(self.params.scale),
                "flood_sigma": self.flood_sigma,
                "precision": self.precision(bound, n),
                "n_threads": self.n_threads,
                **self._setup,
            },
        )
