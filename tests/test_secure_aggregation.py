"""Secure aggregation: exact sums, dropout recovery, tamper and shape rejection, masked inputs that
look uniform whatever the input. Real X25519, AES and Shamir from the libraries; no mocks."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedshop.secure import shamir
from fedshop.secure.protocol import ProtectionError
from fedshop.secure.ring import FixedPointRing
from fedshop.secure.secagg import (
    RoundSetup,
    SecAggClient,
    SecAggServer,
    SecAggSum,
    SharePackage,
    blobs_from_json,
    blobs_to_json,
    default_neighbours,
    secagg_plus_graph,
)


def _vectors(n: int, length: int, bound: float = 1.0, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-bound, bound, length) for _ in range(n)]


@pytest.mark.parametrize("bits", [32, 64])
def test_secure_sum_equals_plain_sum_within_quantisation(bits):
    vectors = _vectors(12, 3_000)
    result = SecAggSum(ring_bits=bits).sum(vectors, bound=1.0)
    ring = FixedPointRing.for_sum(1.0, 12, bits)
    assert result.contributors == list(range(12))
    error = np.abs(result.total - np.sum(vectors, axis=0)).max()
    assert error <= ring.max_sum_error() + 1e-12
    assert result.cost.bytes_sent_per_client[0] >= 3_000 * bits // 8
    assert len(result.cost.client_seconds) == 12 and result.cost.server_seconds > 0


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(2, 9),
    length=st.integers(1, 40),
    bound=st.floats(1e-3, 1e4),
    seed=st.integers(0, 2**16),
)
def test_secure_sum_property(n, length, bound, seed):
    vectors = _vectors(n, length, bound, seed)
    result = SecAggSum(ring_bits=32).sum(vectors, bound)
    ring = FixedPointRing.for_sum(bound, n, 32)
    assert np.abs(result.total - np.sum(vectors, axis=0)).max() <= ring.max_sum_error() * 1.0001


def test_ring_never_wraps_at_the_extremes():
    for bits in (32, 64):
        n = 50
        ring = FixedPointRing.for_sum(2.5, n, bits)
        top = [np.full(4, 2.5)] * n
        bottom = [np.full(4, -2.5)] * n
        for vectors, expected in ((top, 125.0), (bottom, -125.0)):
            total = np.zeros(4, dtype=ring.dtype)
            for v in vectors:
                total += ring.encode(v)
            assert np.allclose(ring.decode(total), expected, atol=ring.max_sum_error())


def test_thirty_percent_dropouts_after_sharing_leave_the_exact_sum_of_survivors():
    vectors = _vectors(10, 500, seed=1)
    dropped = {1, 4, 8}
    result = SecAggSum(drop_after_shares=dropped).sum(vectors, 1.0)
    assert result.contributors == [i for i in range(10) if i not in dropped]
    expected = np.sum([vectors[i] for i in result.contributors], axis=0)
    assert np.abs(result.total - expected).max() < 1e-9
    assert result.cost.details["dropped_after_shares"] == 3


def test_secagg_plus_neighbourhoods_with_dropouts():
    n = 60
    vectors = _vectors(n, 200, seed=2)
    dropped = set(random.Random(3).sample(range(n), 18))  # 30 %
    secagg = SecAggSum(neighbours=30, drop_after_shares=dropped, rng=random.Random(5))
    result = secagg.sum(vectors, 1.0)
    assert result.cost.details["neighbours"] == 30
    expected = np.sum([vectors[i] for i in result.contributors], axis=0)
    assert len(result.contributors) == n - 18
    assert np.abs(result.total - expected).max() < 1e-9


@pytest.mark.parametrize("dropped", [0, 1, 2])
def test_three_clients_survive_any_one_dropping_after_sharing(dropped):
    """k = 2, t = 2: each survivor's own share of its self-mask seed and its surviving
    neighbour's make two, so a three-silo federation loses a round to no single dropout."""
    vectors = _vectors(3, 50, seed=6)
    result = SecAggSum(drop_after_shares={dropped}).sum(vectors, 1.0)
    assert result.cost.details["threshold"] == 2 and result.cost.details["neighbours"] == 2
    assert result.contributors == [i for i in range(3) if i != dropped]
    expected = np.sum([vectors[i] for i in result.contributors], axis=0)
    assert np.abs(result.total - expected).max() < 1e-9


def test_a_server_that_splits_a_clients_holders_gets_too_few_of_either_secret():
    """The server tells client 1 that client 0 survived and client 2 that it dropped: it collects
    one share of 0's self-mask seed and one of its mask key, t = 2 needed for either."""
    server, clients = _after_key_sharing(3, 16)
    routed = server.routed_shares()
    for c in clients:
        server.collect_masked(c.index, c.masked_input(np.zeros(16), routed[c.index]))
    answers = [clients[1].unmask([0, 1, 2], []), clients[2].unmask([1, 2], [0])]
    # Client 0 itself is never asked: what the server holds of its secrets, by kind.
    kinds = [blob[2:3] for answer in answers for owner, blob in answer.items() if owner == 0]
    assert sorted(kinds) == [b"b", b"s"] and server.setup.threshold == 2


def test_dropouts_before_sharing_are_simply_left_out():
    vectors = _vectors(8, 100, seed=4)
    result = SecAggSum(drop_before_shares={0, 3}).sum(vectors, 1.0)
    expected = np.sum([vectors[i] for i in range(8) if i not in (0, 3)], axis=0)
    assert np.abs(result.total - expected).max() < 1e-9
    assert result.cost.details["dropped_before_shares"] == 2


def test_too_many_dropouts_fail_with_a_clear_error():
    vectors = _vectors(10, 50)
    with pytest.raises(ProtectionError, match=r"shares of client \d+'s .* came back"):
        SecAggSum(drop_after_shares={0, 1, 2, 3, 4, 5}).sum(vectors, 1.0)


def test_neighbourhood_graph_is_symmetric_and_regular():
    graph = secagg_plus_graph(40, 10, random.Random(0))
    for i, near in graph.items():
        assert len(near) == 10 and i not in near
        assert all(i in graph[j] for j in near)
    assert default_neighbours(100) < 99 and default_neighbours(10) == 9


# ---- driving the protocol step by step, with a party misbehaving -----------------------------


def _after_key_sharing(n: int, length: int) -> tuple[SecAggServer, list[SecAggClient]]:
    """Steps 1–2 by hand: keys advertised, shares sent to the server."""
    setup = SecAggSum().setup_for(n, length, 1.0)
    server = SecAggServer(setup)
    clients = [SecAggClient(i, setup) for i in range(n)]
    for c in clients:
        server.collect_keys(c.index, c.advertise())
    for c in clients:
        server.collect_shares(c.index, c.share_keys(server.keys_for(c.index)))
    return server, clients


def _run_until_masked(n=6, length=64, tamper=None):
    """Steps 1–3 by hand; `tamper(server)` may alter what the server routes."""
    vectors = _vectors(n, length, seed=7)
    server, clients = _after_key_sharing(n, length)
    if tamper:
        tamper(server)
    for c in clients:
        server.collect_masked(c.index, c.masked_input(vectors[c.index], server.shares_for(c.index)))
    return vectors, server, clients


def test_tampered_share_in_transit_is_rejected():
    def flip_a_bit(server):
        blob = bytearray(server.packages[2].ciphertexts[3])
        blob[20] ^= 1
        server.packages[2].ciphertexts[3] = bytes(blob)

    with pytest.raises(ProtectionError, match="share from client 2 failed authentication"):
        _run_until_masked(tamper=flip_a_bit)


def test_tampered_share_at_unmasking_is_rejected():
    _, server, clients = _run_until_masked()
    survivors, dropped = server.roster()
    answers = {c.index: c.unmask(survivors, dropped) for c in clients}
    # Every holder of client 0's shares lies about it: the rebuilt seed misses its commitment.
    for answer in answers.values():
        if 0 in answer:
            blob = bytearray(answer[0])
            blob[-1] ^= 0x55
            answer[0] = bytes(blob)
    with pytest.raises(ProtectionError, match="client 0 does not match its commitment"):
        server.finish(answers)


def test_wrong_shapes_and_out_of_range_inputs_are_rejected():
    with pytest.raises(ProtectionError, match="sent 5 values; the round expects 4"):
        SecAggSum().sum([np.zeros(4), np.zeros(4), np.zeros(5)], 1.0)
    with pytest.raises(ProtectionError, match="beyond the protected range"):
        SecAggSum().sum([np.zeros(4), np.full(4, 3.0)], 1.0)
    with pytest.raises(ProtectionError, match="non-finite"):
        SecAggSum().sum([np.zeros(4), np.array([0, np.nan, 0, 0])], 1.0)
    _, server, _ = _run_until_masked()
    with pytest.raises(ProtectionError, match="masked input of shape"):
        server.collect_masked(1, np.zeros(63, dtype=np.uint64))


def test_a_client_never_reveals_both_secrets_of_a_neighbour():
    _, server, clients = _run_until_masked()
    with pytest.raises(ProtectionError, match="both survived and dropped"):
        clients[0].unmask([1, 2], [2])
    clients[1].unmask(*server.roster())
    with pytest.raises(ProtectionError, match="already answered"):
        clients[1].unmask([0], [2])


def test_a_masked_input_looks_uniform_whatever_the_input():
    """The server's view of one client: the same distribution for an all-zero and an all-extreme
    update (two-sample KS on the ring values), uniform (χ² on the top byte), uncorrelated."""
    length = 20_000
    views = {}
    for name, value in (("zero", 0.0), ("extreme", 1.0)):
        server, clients = _after_key_sharing(3, length)
        views[name] = clients[0].masked_input(np.full(length, value), server.shares_for(0))
    scale = float(2**64)
    zero, extreme = (views[k].astype(np.float64) / scale for k in ("zero", "extreme"))
    # The keys are fresh randomness, so the p-values vary from run to run: a threshold of 1e-6
    # keeps false alarms negligible, and an unmasked or biased view scores far below it.
    assert stats.ks_2samp(zero, extreme).pvalue > 1e-6
    for view in (zero, extreme):
        assert stats.kstest(view, "uniform").pvalue > 1e-6
        top_byte = np.floor(view * 256).astype(int)
        assert stats.chisquare(np.bincount(top_byte, minlength=256)).pvalue > 1e-6
    signal = np.random.default_rng(0).uniform(-1, 1, length)
    server, pair = _after_key_sharing(2, length)
    masked = pair[0].masked_input(signal, server.shares_for(0)).astype(np.float64)
    assert abs(stats.pearsonr(signal, masked).statistic) < 0.05


@settings(max_examples=25, deadline=None)
@given(
    secret=st.binary(min_size=16, max_size=16),
    threshold=st.integers(1, 8),
    extra=st.integers(0, 6),
    pick=st.randoms(use_true_random=False),
)
def test_any_threshold_shares_rebuild_the_secret(secret, threshold, extra, pick):
    shares = shamir.split(secret, threshold, threshold + extra)
    chosen = pick.sample(range(1, threshold + extra + 1), threshold)
    assert shamir.combine([(x, shares[x - 1]) for x in chosen], 16) == secret


def test_fewer_than_threshold_shares_look_uniform():
    # With t = 2 one share is secret + a·x for a uniform a: its value is uniform whatever the
    # secret, so an all-zero and an all-ones secret give shares with the same distribution.
    low = [shamir.split(bytes(16), 2, 3)[0][-1] % 16 for _ in range(2_000)]
    high = [shamir.split(b"\xff" * 16, 2, 3)[0][-1] % 16 for _ in range(2_000)]
    table = np.array([np.bincount(low, minlength=16), np.bincount(high, minlength=16)])
    assert stats.chi2_contingency(table).pvalue > 1e-3
    assert stats.chisquare(table[0]).pvalue > 1e-3


def test_bad_shares_are_refused():
    shares = shamir.split(b"k" * 16, 3, 5)
    with pytest.raises(shamir.ShareError, match="distinct"):
        shamir.combine([(1, shares[0]), (1, shares[0]), (2, shares[1])], 16)
    with pytest.raises(shamir.ShareError, match="field"):
        shamir.combine([(1, b"\xff" * 32), (2, shares[1]), (3, shares[2])], 16)
    altered = bytearray(shares[0])
    altered[-1] ^= 1
    rebuilt = [(1, bytes(altered)), (2, shares[1]), (3, shares[2])]
    # A small change to a share gives a wrong seed (the SecAgg server's commitment check catches
    # it); a share replaced by another field element almost surely gives no 16-byte seed at all.
    assert shamir.combine(rebuilt, 16) != b"k" * 16
    with pytest.raises(shamir.ShareError, match="expected size"):
        shamir.combine([(1, shares[3]), (2, shares[1]), (3, shares[2])], 16)
    with pytest.raises(shamir.ShareError, match="threshold"):
        shamir.split(b"k" * 16, 6, 5)


def test_a_client_resumed_from_its_secrets_finishes_the_round():
    """A deployed client is a new process at every step: resumed from `secrets()` (and the setup
    from its text) at each step, the round still sums exactly."""
    n, length = 4, 32
    vectors = _vectors(n, length, seed=5)
    setup = SecAggSum().setup_for(n, length, 1.0)
    again = RoundSetup.from_json(setup.to_json())
    assert again == setup
    server = SecAggServer(setup)
    kept = {}
    for i in range(n):
        client = SecAggClient(i, setup)
        server.collect_keys(i, client.advertise())
        kept[i] = client.secrets()

    def step(i, work):
        client = SecAggClient.resume(i, RoundSetup.from_json(setup.to_json()), kept[i])
        out = work(client)
        kept[i] = client.secrets()
        return out

    for i in range(n):
        package = step(i, lambda c, i=i: c.share_keys(server.keys_for(i)))
        server.collect_shares(i, SharePackage.from_json(package.to_json()))
    for i in range(n):
        shares = blobs_from_json(blobs_to_json(server.shares_for(i)))
        server.collect_masked(i, step(i, lambda c, i=i, s=shares: c.masked_input(vectors[i], s)))
    survivors, dropped = server.roster()
    answers = {i: step(i, lambda c: c.unmask(survivors, dropped)) for i in survivors}
    total = server.finish(answers)
    assert np.abs(total - np.sum(vectors, axis=0)).max() <= setup.ring.max_sum_error()
    # The resumed state remembers what was answered: never a second masked input or unmasking.
    with pytest.raises(ProtectionError, match="already sent"):
        step(0, lambda c: c.masked_input(vectors[0], {}))
    with pytest.raises(ProtectionError, match="already answered"):
        step(0, lambda c: c.unmask(survivors, dropped))
