"""Shamir secret sharing (Shamir 1979) over the prime field GF(2^255 − 19), for SecAgg's seeds.

Why not pycryptodome's `Shamir`: it works in GF(2^128) with multiplication written bit by bit in
Python, about 8 ms to rebuild one seed from 15 shares, and a SecAgg server rebuilds one seed per
client per round (0.8 s of a 100-client round). Here the field is a prime one, so Python's native
integers do the arithmetic, and the Lagrange coefficients depend only on which share indices came
back, so a round computes them once for all clients (almost every client's survivors are the same
positions). Rebuilding a seed is then t multiplications.

This is secret *sharing*, not a cipher: any t shares determine the polynomial, any t − 1 are
uniformly distributed whatever the secret (information-theoretic, no assumption). The prime is the
Curve25519 field prime, well known and larger than any 16- or 31-byte secret.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Sequence

PRIME = 2**255 - 19
SHARE_BYTES = 32


class ShareError(ValueError):
    """Shares that cannot be combined: too few, repeated indices, or values outside the field."""


def split(secret: bytes, threshold: int, n_shares: int) -> list[bytes]:
    """`n_shares` shares of `secret`; share x (1-based) is the list's item x − 1, 32 bytes each.
    Any `threshold` of them rebuild the secret; fewer reveal nothing about it."""
    if not 1 <= threshold <= n_shares:
        raise ShareError(f"threshold {threshold} must be between 1 and the number of shares")
    if len(secret) >= SHARE_BYTES:
        raise ShareError(f"a secret must be shorter than {SHARE_BYTES} bytes")
    # The polynomial's constant term is the secret; the others are uniform in the field.
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, n_shares + 1):
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares.append(y.to_bytes(SHARE_BYTES, "big"))
    return shares


def combine(shares: Sequence[tuple[int, bytes]], secret_bytes: int) -> bytes:
    """The secret of `secret_bytes` bytes from (x, share) pairs: exactly the threshold number of
    them, or more when all lie on one polynomial of lower degree. Inconsistent or tampered shares
    give a wrong value; callers check it against a commitment."""
    if not shares:
        raise ShareError("no shares to combine")
    xs = tuple(x for x, _ in shares)
    if len(set(xs)) != len(xs) or min(xs) < 1 or max(xs) >= PRIME:
        raise ShareError(f"share indices {sorted(xs)} must be distinct and positive")
    value = 0
    for weight, (_, share) in zip(lagrange_at_zero(xs), shares, strict=True):
        y = int.from_bytes(share, "big")
        if len(share) != SHARE_BYTES or y >= PRIME:
            raise ShareError("a share is not an element of the field")
        value += weight * y
    value %= PRIME
    if value >= 1 << (8 * secret_bytes):
        raise ShareError("the shares do not combine to a secret of the expected size")
    return value.to_bytes(secret_bytes, "big")


@functools.lru_cache(maxsize=256)
def lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """The weights w_i with p(0) = Σ w_i·p(x_i) for any polynomial p of degree < len(xs)."""
    weights = []
    for i, xi in enumerate(xs):
        numerator, denominator = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - xi) % PRIME
        weights.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return tuple(weights)
