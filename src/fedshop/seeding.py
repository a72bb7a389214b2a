"""Randomness without global state: reproducible streams from the run seed, secret ones for privacy.

Every ordinary random stream (model initialisation, negatives, splits, partitions, which silos train
in a round) is derived from the run seed and a stable label (e.g. ("silo", 3, "train")), so adding a
silo or reordering work never changes another component's stream, and a run is reproducible from its
config and seed.

Privacy randomness is the exception. The run seed is public (config.toml, the report): noise drawn
from it could be subtracted by anyone who reads them, and the ε reported would mean nothing. DP noise,
and the Poisson sampling whose secrecy the accountant's amplification assumes, come from a
`NoiseStream` with a secret key, unless the user names a noise seed (then the run is not private).
"""

from __future__ import annotations

import hashlib
import math
import secrets
import zlib

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


def derive_seed(seed: int, *labels: str | int) -> int:
    key = [zlib.crc32(str(label).encode()) for label in labels]
    return int(
        np.random.SeedSequence(entropy=seed, spawn_key=key).generate_state(1, np.uint64)[0] >> 1
    )


def torch_generator(seed: int, *labels: str | int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *labels))


_KEY_BYTES = 32  # AES-256
_BLOCK = 16
_MANTISSA_BITS = (1 << 52) - 1
_EXPONENT_OF_ONE = 0x3FF0000000000000  # 1.0 as IEEE 754 binary64, mantissa 0


class NoiseStream:
    """Random numbers for privacy: the AES-256-CTR keystream of a 256-bit key, a cryptographically
    secure generator.

    Not a torch.Generator (Mersenne Twister) seeded from a secret: MT19937 is not a CSPRNG, its state
    follows from 624 consecutive outputs, and DP noise is published nearly as drawn (on rows nobody
    touched the noisy sum is the noise alone). A reader of the model could recover the state from
    those rows and subtract the rest of the noise, whatever the seed's entropy. AES-CTR outputs reveal
    nothing of the key or of other outputs.

    The state is (key, block counter), small enough to checkpoint: a restored stream continues where
    it stopped, so a retried or resumed round draws the same noise and releases nothing new."""

    def __init__(self, key: bytes, block: int = 0) -> None:
        if len(key) != _KEY_BYTES:
            raise ValueError(f"a noise stream's key has {_KEY_BYTES} bytes, not {len(key)}")
        self._key = key
        self._block = block

    @classmethod
    def secret(cls) -> NoiseStream:
        """A stream nobody can predict: 256 bits from the operating system's CSPRNG."""
        return cls(secrets.token_bytes(_KEY_BYTES))

    @classmethod
    def from_seed(cls, seed: int, *labels: str | int) -> NoiseStream:
        """A reproducible stream: the key is a hash of the seed and the labels (predictable by anyone
        who knows the seed)."""
        text = "\x1f".join(str(part) for part in ("fedshop-noise", seed, *labels))
        return cls(hashlib.sha256(text.encode()).digest())

    @classmethod
    def of(cls, noise_seed: int | None, *labels: str | int) -> NoiseStream:
        """Secret without a noise seed; from it (and `labels`) when one is given."""
        return cls.secret() if noise_seed is None else cls.from_seed(noise_seed, *labels)

    def _unit_doubles(self, count: int) -> torch.Tensor:
        """The next `count` 64-bit words of the keystream as doubles in [1, 2): 52 random mantissa
        bits under the exponent of 1.0 (exact, and cheaper than converting integers)."""
        size = count * 8
        blocks = math.ceil(size / _BLOCK)
        counter = self._block.to_bytes(_BLOCK, "big")
        encryptor = Cipher(algorithms.AES(self._key), modes.CTR(counter)).encryptor()
        stream = bytearray(blocks * _BLOCK + _BLOCK - 1)  # update_into wants a block of slack
        encryptor.update_into(bytes(blocks * _BLOCK), stream)
        self._block += blocks
        words = torch.frombuffer(stream, dtype=torch.int64, count=count)
        words &= _MANTISSA_BITS
        words |= _EXPONENT_OF_ONE
        return words.view(torch.float64)

    def uniform(self, count: int) -> torch.Tensor:
        """`count` draws from [0, 1), float64."""
        if count == 0:
            return torch.zeros(0, dtype=torch.float64)
        return self._unit_doubles(count).sub_(1.0)

    def normal(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """Standard normal draws of `shape` (Box–Muller in float64, then cast to `dtype`)."""
        count = math.prod(shape)
        pairs = math.ceil(count / 2)
        if pairs == 0:
            return torch.zeros(shape, dtype=dtype)
        doubles = self._unit_doubles(2 * pairs)
        radius = torch.log(2.0 - doubles[:pairs]).mul_(-2.0).sqrt_()  # 2 − x ∈ (0, 1]: log finite
        angle = doubles[pairs:].sub_(1.0).mul_(2.0 * math.pi)
        both = torch.empty(2 * pairs, dtype=torch.float64)
        torch.cos(angle, out=both[:pairs]).mul_(radius)
        torch.sin(angle, out=both[pairs:]).mul_(radius)
        return both[:count].reshape(shape).to(dtype)

    def get_state(self) -> torch.Tensor:
        """(key, counter) as bytes, where a torch.Generator's state would go in a checkpoint."""
        raw = self._key + self._block.to_bytes(_BLOCK, "big")
        return torch.tensor(list(raw), dtype=torch.uint8)

    def set_state(self, state: torch.Tensor) -> None:
        raw = bytes(state.to(torch.uint8).tolist())
        if len(raw) != _KEY_BYTES + _BLOCK:
            raise ValueError("not a noise stream's state")
        self._key, self._block = raw[:_KEY_BYTES], int.from_bytes(raw[_KEY_BYTES:], "big")


# Where privacy randomness is drawn: a NoiseStream, or a torch.Generator (predictable from its
# outputs: only where the noise need not be secret, such as tests).
RandomSource = torch.Generator | NoiseStream


def standard_normal(
    shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, source: RandomSource
) -> torch.Tensor:
    if isinstance(source, NoiseStream):
        return source.normal(shape, dtype)
    return torch.randn(shape, generator=source, dtype=dtype)


def uniform(count: int, source: RandomSource) -> torch.Tensor:
    if isinstance(source, NoiseStream):
        return source.uniform(count)
    return torch.rand(count, generator=source)
