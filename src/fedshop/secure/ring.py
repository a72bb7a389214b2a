"""Fixed-point encoding of float updates into the ring Z_{2^bits} that secure aggregation sums in.

Masks only cancel exactly in a finite ring, so each client rounds its clipped update to a multiple of
1/scale and the server decodes the ring sum back to floats. The scale is chosen so that the sum of
`n_clients` values, each within ±bound, can never wrap around the ring: n · (bound · scale + ½) <
2^(bits-1). It is a power of two so that scaling is exact in floating point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedshop.secure.protocol import ProtectionError

RING_BITS = (32, 64)


@dataclass(frozen=True)
class FixedPointRing:
    bits: int
    scale: float  # ring units per 1.0
    bound: float  # every encoded value lies within ±bound
    n_clients: int  # the most values ever summed

    @classmethod
    def for_sum(cls, bound: float, n_clients: int, bits: int = 64) -> FixedPointRing:
        if bits not in RING_BITS:
            raise ProtectionError(f"ring bits must be one of {RING_BITS}; got {bits}")
        if n_clients < 1:
            raise ProtectionError("a secure sum needs at least one client")
        headroom = (2 ** (bits - 1) - 1) / n_clients - 0.5  # largest |value·scale| per client
        if headroom < 1:
            raise ProtectionError(f"{n_clients} clients do not fit a {bits}-bit ring")
        exponent = math.floor(math.log2(headroom / bound))
        # The 64-bit ring is far finer than float32 updates need: cap the scale so that
        # value·scale stays within float64's exact integers (2^53) and rounding stays exact.
        exponent = min(exponent, math.floor(math.log2(2.0**52 / bound)))
        scale = 2.0**exponent
        if scale * bound < 1:
            raise ProtectionError(
                f"a {bits}-bit ring cannot hold the sum of {n_clients} values within ±{bound:g} "
                "at a resolution finer than the values themselves; use ring_bits = 64 or a "
                "smaller bound"
            )
        return cls(bits=bits, scale=scale, bound=bound, n_clients=n_clients)

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return np.uint64 if self.bits == 64 else np.uint32

    @property
    def resolution(self) -> float:
        return 1.0 / self.scale

    def max_sum_error(self, n_clients: int | None = None) -> float:
        """Largest difference between the decoded ring sum and the float sum (rounding to nearest)."""
        return (n_clients or self.n_clients) * 0.5 / self.scale

    def encode(self, values: np.ndarray) -> np.ndarray:
        if values.size and float(np.max(np.abs(values))) > self.bound:
            raise ProtectionError(f"a value lies outside the ring's range ±{self.bound:g}")
        scaled = np.rint(np.asarray(values, dtype=np.float64) * self.scale).astype(np.int64)
        # Two's complement: a negative integer is its residue modulo 2^bits.
        return scaled.view(np.uint64).astype(self.dtype)

    def decode(self, total: np.ndarray) -> np.ndarray:
        signed = total.astype(self.dtype).view(np.int64 if self.bits == 64 else np.int32)
        return signed.astype(np.float64) / self.scale
