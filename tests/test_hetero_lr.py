"""Vertical logistic regression with Paillier-encrypted gradients (`fedshop.vertical.hetero_lr`).

Small keys (1024 bits) and a few hundred RentTheRunway rows keep these fast; the benchmark
(`benchmarks/hetero_lr.py`) measures 2048-bit keys on thousands of rows.
"""

from __future__ import annotations

import numpy as np
import pytest
from phe.paillier import PaillierPublicKey

from fedshop.errors import FedShopError
from fedshop.secure.paillier import unpack_ciphertexts
from fedshop.vertical.hetero_lr import (
    HeteroLRConfig,
    auc,
    predict_one_vs_rest,
    renttherunway_columns,
    renttherunway_rows,
    train_encrypted,
    train_one_vs_rest,
    train_plaintext,
)

FAST = HeteroLRConfig(key_bits=1024, epochs=2, batch_size=64, learning_rate=1.0, l2=0.01)


@pytest.fixture(scope="module")
def rentals(data_dir):
    return renttherunway_rows(data_dir)


def split_columns(frame):
    return renttherunway_columns(frame, categories=6)


def largest_difference(a, b) -> float:
    pairs = zip([a.w_guest, *a.w_hosts], [b.w_guest, *b.w_hosts], strict=True)
    return max(float(np.max(np.abs(x - y))) for x, y in pairs)


def test_encrypted_run_matches_plaintext(rentals):
    X_guest, X_host, y = split_columns(rentals.iloc[:300])
    encrypted = train_encrypted(X_guest, [X_host], y, FAST)
    plaintext = train_plaintext(X_guest, [X_host], y, FAST)
    # Fixed point at 2^-23 (features) and 2^-32 (residuals): the weights agree far below 1e-6.
    assert largest_difference(encrypted, plaintext) < 1e-6
    assert np.allclose(encrypted.losses, plaintext.losses, atol=1e-6)
    assert plaintext.losses[1] < plaintext.losses[0]
    assert set(encrypted.bytes_per_epoch) == {
        "guest→host",
        "host→guest",
        "guest→arbiter",
        "host→arbiter",
        "arbiter→guest",
        "arbiter→host",
    }


def test_two_hosts_match_plaintext(rentals):
    X_guest, X_host, y = split_columns(rentals.iloc[:200])
    config = HeteroLRConfig(key_bits=1024, epochs=1, batch_size=100, learning_rate=1.0)
    hosts = [X_host[:, :2], X_host[:, 2:]]
    encrypted = train_encrypted(X_guest, hosts, y, config)
    assert largest_difference(encrypted, train_plaintext(X_guest, hosts, y, config)) < 1e-6
    assert encrypted.losses == [None]  # as FATE: no loss with several hosts


def test_hosts_receive_only_ciphertexts_and_masked_values(rentals):
    X_guest, X_host, y = split_columns(rentals.iloc[:128])
    config = HeteroLRConfig(key_bits=1024, epochs=1, batch_size=64)
    transcript = []
    train_encrypted(X_guest, [X_host], y, config, transcript=transcript)
    key = next(m for _, to, m in transcript if to == "host0" and m["kind"] == "public_key")
    public = PaillierPublicKey(int.from_bytes(key["n"], "big"))
    n, nsquare = public.n, public.nsquare
    sent_by_host = {
        m["batch"]: m
        for sender, _, m in transcript
        if sender == "host0" and m["kind"] == "host_part"
    }
    received = [m for _, to, m in transcript if to == "host0"]
    assert {m["kind"] for m in received} == {
        "public_key",
        "batch",
        "residual",
        "masked_gradient_decrypted",
    }
    for message in received:
        for name, value in message.items():
            # Nothing but ciphertext or residue bytes, integer row indices, and bookkeeping.
            if isinstance(value, np.ndarray):
                assert name == "rows" and value.dtype.kind == "i"
            else:
                assert isinstance(value, bytes | str | int | bool | tuple), (name, type(value))
        if message["kind"] == "residual":
            rows = len(X_host) // 2
            d = unpack_ciphertexts(message["d"], public, rows, "the guest")
            z = unpack_ciphertexts(sent_by_host[message["batch"]]["z"], public, rows, "host")
            for c_d, c_z in zip(d, z, strict=True):
                # Without the guest's re-randomisation, [[d]]/[[z]] = 1 + n·(guest's part) mod n²,
                # which the host could read off: labels included.
                assert (c_d * pow(c_z, -1, nsquare) % nsquare) % n != 1
        if message["kind"] == "masked_gradient_decrypted":
            width = (n.bit_length() + 7) // 8
            values = [
                int.from_bytes(message["values"][i : i + width], "big")
                for i in range(0, len(message["values"]), width)
            ]
            # True gradients are below 2^80 in fixed point; masked ones are uniform mod n.
            assert all(2**100 < v < n - 2**100 for v in values)


def test_auc_above_chance_on_held_out_rows(rentals):
    X_guest, X_host, y = split_columns(rentals.iloc[:1400])
    train, test = slice(0, 400), slice(400, 1400)
    config = HeteroLRConfig(key_bits=1024, epochs=6, batch_size=64, learning_rate=1.0)
    result = train_encrypted(X_guest[train], [X_host[train]], y[train], config)
    held_out = auc(result.scores(X_guest[test], [X_host[test]]), y[test])
    assert held_out > 0.5


def test_mismatched_or_bad_inputs_raise():
    rng = np.random.default_rng(0)
    X_guest, X_host = rng.normal(size=(20, 3)), rng.normal(size=(20, 2))
    y = (rng.random(20) < 0.5).astype(float)
    config = HeteroLRConfig(key_bits=512, epochs=1)
    with pytest.raises(FedShopError, match="rows must be aligned"):
        train_encrypted(X_guest, [X_host[:19]], y, config)
    with pytest.raises(FedShopError, match="rows must be aligned"):
        train_plaintext(X_guest[:19], [X_host], y, config)
    with pytest.raises(FedShopError, match="at least one host"):
        train_plaintext(X_guest, [], y, config)
    with pytest.raises(FedShopError, match="0 or 1"):
        train_plaintext(X_guest, [X_host], y * 2, config)
    with pytest.raises(FedShopError, match="NaN"):
        train_plaintext(X_guest, [np.where(X_host > 1, np.nan, X_host)], y, config)
    with pytest.raises(FedShopError):
        HeteroLRConfig(batch_size=0)


def test_one_vs_rest_covers_the_three_fits(rentals):
    X_guest, X_host, _ = split_columns(rentals.iloc[:600])
    labels = rentals["fit"].iloc[:600].to_numpy()
    config = HeteroLRConfig(epochs=3, batch_size=64, learning_rate=1.0)
    models = train_one_vs_rest(X_guest, [X_host], labels, config, encrypted=False)
    assert set(models) == {"fit", "small", "large"}
    predicted = predict_one_vs_rest(models, X_guest, [X_host])
    assert set(predicted) <= {"fit", "small", "large"}
    # The majority class wins most rows, as it should with a linear model on these features.
    assert np.mean(predicted == labels) > 0.5
