"""CKKS (TenSEAL) and Paillier (phe) aggregation: real encryption, no mocks.

Paillier runs with 1024-bit keys here to keep the file fast; 2048 is the default for real use.
"""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts
from phe.paillier import PaillierPrivateKey

from fedshop.secure.ckks import CkksSum
from fedshop.secure.paillier import PaillierSum
from fedshop.secure.protocol import ProtectionError


@pytest.fixture(scope="module")
def ckks() -> CkksSum:
    return CkksSum()


@pytest.fixture(scope="module")
def paillier() -> PaillierSum:
    return PaillierSum(key_bits=1024)


def _vectors(rng: np.random.Generator, n: int, length: int, bound: float) -> list[np.ndarray]:
    vectors = [rng.uniform(-bound, bound, length) for _ in range(n)]
    vectors[0][:3] = [bound, -bound, 0.0]  # the edges of the range must work too
    return vectors


# ---------------------------------------------------------------------------------------------
# CKKS
# ---------------------------------------------------------------------------------------------


def test_ckks_sum_matches_plain_sum_within_stated_precision(ckks: CkksSum):
    rng = np.random.default_rng(0)
    bound = 3.0
    length = 2 * ckks.slot_count + 123  # three chunks, the last one partly padding
    vectors = _vectors(rng, 4, length, bound)
    result = ckks.sum(vectors, bound)
    expected = np.sum(vectors, axis=0)
    assert result.total.dtype == np.float64
    assert result.total.shape == (length,)
    assert result.contributors == [0, 1, 2, 3]
    error = np.max(np.abs(result.total - expected))
    assert error <= ckks.precision(bound, 4)
    assert ckks.precision(bound, 4) < 1e-6  # the stated bound is a useful one
    assert result.cost.details["ciphertexts_per_client"] == 3


@pytest.mark.parametrize("length", [1, 10, 4096, 4097])
def test_ckks_short_vectors_and_exact_chunks(ckks: CkksSum, length: int):
    rng = np.random.default_rng(length)
    vectors = _vectors(rng, 2, length, 1.0) if length >= 3 else [rng.uniform(-1, 1, 1)] * 2
    result = ckks.sum(vectors, 1.0)
    assert np.max(np.abs(result.total - np.sum(vectors, axis=0))) <= ckks.precision(1.0, 2)


def test_ckks_keys_are_reused_across_rounds(ckks: CkksSum):
    rng = np.random.default_rng(1)
    ckks.sum(_vectors(rng, 2, 10, 1.0), 1.0)
    parties = ckks.parties()
    vectors = _vectors(rng, 2, 10, 1.0)
    second = ckks.sum(vectors, 1.0)
    assert ckks.parties() is parties
    assert second.cost.details["key_setup_seconds"] > 0
    assert np.max(np.abs(second.total - np.sum(vectors, axis=0))) <= ckks.precision(1.0, 2)


def test_ckks_server_and_silos_hold_no_secret_key(ckks: CkksSum):
    holder, silo, server = ckks.parties()
    for context in (silo.context, server.context):
        assert not context.is_private()
        assert not context.has_secret_key()
        with pytest.raises(ValueError, match="public"):
            context.secret_key()
    # A silo's ciphertext, as the server loads it, cannot be decrypted there.
    message = silo.encrypt(np.ones(5), chunks=1)
    on_server = ts.ckks_tensor_from(server.context, message)
    with pytest.raises(ValueError, match="secret"):
        on_server.decrypt()
    # What the key holder hands out carries no secret key either.
    assert not ts.context_from(holder.public_context()).is_private()


def test_ckks_key_holder_floods_what_it_releases():
    rng = np.random.default_rng(2)
    vector = rng.uniform(-1, 1, 100)
    for flood_sigma, differ in ((32.0, True), (0.0, False)):
        ckks = CkksSum(flood_sigma=flood_sigma)
        holder, silo, server = ckks.parties()
        server.start_round(1)
        server.receive(0, silo.encrypt(vector, chunks=1))
        aggregate = server.finish()
        first = holder.decrypt(aggregate, 100, 1, flood_sigma)
        second = holder.decrypt(aggregate, 100, 1, flood_sigma)
        assert (not np.array_equal(first, second)) is differ
        assert np.max(np.abs(first - vector)) <= ckks.precision(1.0, 1)


def test_ckks_bound_must_fit_the_data_modulus(ckks: CkksSum):
    assert ckks.params.max_sum == 2.0**17  # one 60-bit data prime at scale 2^40
    with pytest.raises(ProtectionError, match="global_scale"):
        ckks.sum([np.zeros(4), np.zeros(4)], bound=1e5)  # 2 × 1e5 > 2^17


@pytest.mark.parametrize(
    "options, message",
    [
        ({"coeff_mod_bit_sizes": (60,)}, "at least two primes"),
        ({"coeff_mod_bit_sizes": (60, 60, 60, 60)}, "128-bit security"),
        ({"global_scale": 2.0**58}, "no room"),
        ({"poly_modulus_degree": 5000}, "power of two"),
        ({"n_threads": 0}, "n_threads"),
    ],
)
def test_ckks_rejects_unsound_parameters(options: dict, message: str):
    with pytest.raises(ProtectionError, match=message):
        CkksSum(**options)


def test_ckks_server_rejects_malformed_ciphertexts(ckks: CkksSum):
    _, silo, server = ckks.parties()
    message = silo.encrypt(np.ones(5), chunks=1)
    server.start_round(1)
    with pytest.raises(ProtectionError, match="do not load"):
        server.receive(0, message[:-20])
    server.start_round(2)
    with pytest.raises(ProtectionError, match="expects"):
        server.receive(0, message)


# ---------------------------------------------------------------------------------------------
# Paillier
# ---------------------------------------------------------------------------------------------


def test_paillier_sum_is_exact_up_to_fixed_point(paillier: PaillierSum):
    rng = np.random.default_rng(3)
    bound, n, length = 2.0, 3, 70  # 70 values: the last packed ciphertext is partly padding
    vectors = _vectors(rng, n, length, bound)
    result = paillier.sum(vectors, bound)
    scale = 2.0**paillier.precision_bits / bound
    # Exact: the sum of each silo's rounded fixed-point integers, unscaled once.
    rounded = np.sum([np.rint(v * scale).astype(np.int64) for v in vectors], axis=0)
    np.testing.assert_array_equal(result.total, rounded / scale)
    error = np.max(np.abs(result.total - np.sum(vectors, axis=0)))
    assert error <= paillier.precision(bound, n)
    assert paillier.precision(bound, n) == pytest.approx(n * 0.5 / scale, rel=1e-6)
    assert np.any(result.total < 0)  # negative sums come back negative
    assert result.contributors == [0, 1, 2]
    assert result.cost.details["values_per_ciphertext"] > 1


def test_paillier_without_packing_gives_the_same_sum(paillier: PaillierSum):
    rng = np.random.default_rng(4)
    vectors = _vectors(rng, 2, 6, 1.0)
    unpacked = PaillierSum(key_bits=1024, packing=False)
    plain = unpacked.sum(vectors, 1.0)
    packed = paillier.sum(vectors, 1.0)
    assert plain.cost.details["values_per_ciphertext"] == 1
    assert plain.cost.details["ciphertexts_per_client"] == 6
    np.testing.assert_array_equal(plain.total, packed.total)


def test_paillier_max_values_guard_points_to_ckks_and_secagg(paillier: PaillierSum):
    guarded = PaillierSum(key_bits=1024, max_values=50)
    with pytest.raises(ProtectionError, match=r"(?s)ckks.*secagg.*max_values") as raised:
        guarded.sum([np.zeros(51), np.zeros(51)], 1.0)
    assert "ms per 1024-bit encryption" in str(raised.value)


def test_paillier_silos_and_server_hold_no_private_key(paillier: PaillierSum):
    holder, silo, server = paillier.parties()
    for party in (silo, server):
        assert not any(isinstance(v, PaillierPrivateKey) for v in vars(party).values())
        assert party.public_key.n == int.from_bytes(holder.public_key(), "big")


def test_paillier_server_rejects_malformed_ciphertexts(paillier: PaillierSum):
    _, silo, server = paillier.parties()
    layout = paillier.layout(1.0, 2, 10)
    message = silo.encrypt(np.zeros(10), layout)
    server.start_round(layout)
    with pytest.raises(ProtectionError, match="bytes"):
        server.receive(0, message[:-1])
    out_of_range = (server.public_key.nsquare + 5).to_bytes(len(message), "big")
    with pytest.raises(ProtectionError, match="outside"):
        server.receive(0, out_of_range)


def test_paillier_rejects_unsound_parameters():
    with pytest.raises(ProtectionError, match="precision_bits"):
        PaillierSum(precision_bits=60)
    with pytest.raises(ProtectionError, match="key_bits"):
        PaillierSum(key_bits=256)


# ---------------------------------------------------------------------------------------------
# Both
# ---------------------------------------------------------------------------------------------


@pytest.fixture(params=["ckks", "paillier"])
def protection(request, ckks: CkksSum, paillier: PaillierSum):
    return {"ckks": ckks, "paillier": paillier}[request.param]


@pytest.mark.parametrize(
    "vectors, message",
    [
        ([np.array([0.5, 1.5]), np.zeros(2)], "beyond the protected range"),
        ([np.zeros((2, 2)), np.zeros((2, 2))], "expected a vector"),
        ([np.zeros(3), np.zeros(4)], "expects 3"),
        ([np.array([0.0, np.nan]), np.zeros(2)], "non-finite"),
        ([np.array([0.0, np.inf]), np.zeros(2)], "non-finite"),
        ([], "no client vectors"),
    ],
)
def test_bad_inputs_raise(protection, vectors: list[np.ndarray], message: str):
    with pytest.raises(ProtectionError, match=message):
        protection.sum(vectors, bound=1.0)


def test_costs_are_measured_per_party(protection):
    rng = np.random.default_rng(5)
    n, length = 3, 40
    result = protection.sum(_vectors(rng, n, length, 1.0), 1.0)
    cost = result.cost
    assert cost.kind == protection.kind
    assert len(cost.client_seconds) == len(cost.bytes_sent_per_client) == n
    assert all(s > 0 for s in cost.client_seconds)
    assert all(b > 0 for b in cost.bytes_sent_per_client)
    details = cost.details
    assert details["encrypt_seconds"] == cost.client_seconds
    assert details["aggregate_seconds"] > 0 and details["decrypt_seconds"] > 0
    assert cost.server_seconds == pytest.approx(
        details["aggregate_seconds"] + details["decrypt_seconds"]
    )
    # Ciphertexts cost more than the float32 update they protect.
    assert details["ciphertext_bytes_per_client"] > details["plaintext_bytes_per_client"] == 160
