"""Compression: every codec's equivalence or error bound, measured sizes checked by hand, and the
low-rank stages' commuting with the (pipeline's) sum."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedshop.fl.aggregation import ROW_WEIGHT_PREFIX, with_row_means
from fedshop.fl.compression import (
    Encoded,
    ErrorFeedback,
    Float16,
    LowRankRows,
    SparseRows,
    StochasticInt8,
    TopK,
    as_rows,
    codec,
    shared_basis,
)
from fedshop.messages import AggregationPipeline, ClientMessage, weight_by_examples
from fedshop.privacy.noise import ClipUpdate, global_norm


def row_table(n, d, touched, seed=0, scale=1.0):
    """An n × d update that is zero except on the rows in `touched`."""
    generator = torch.Generator().manual_seed(seed)
    table = torch.zeros(n, d)
    table[list(touched)] = scale * torch.randn(len(touched), d, generator=generator)
    return table


def message_tensors(seed=0):
    """A small model's update: an item table touched on 3 rows, an item bias on 2, a dense layer."""
    bias = torch.zeros(100)
    bias[[4, 50]] = torch.tensor([0.5, -2.0])
    generator = torch.Generator().manual_seed(seed + 1)
    return {
        "items": row_table(100, 8, [3, 17, 90], seed),
        "item_bias": bias,
        "dense": torch.randn(3, 3, generator=generator),
    }


@st.composite
def updates(draw):
    """Row tables with random touched rows, sparse 1-D tensors, a scalar, float32 or float64."""
    n = draw(st.integers(1, 12))
    d = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 10_000))
    touched = draw(st.sets(st.integers(0, n - 1)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    generator = torch.Generator().manual_seed(seed)
    vector = torch.randn(n, generator=generator)
    vector[torch.rand(n, generator=generator) < draw(st.floats(0, 1))] = 0
    return {
        "table": row_table(n, d, touched, seed).to(dtype),
        "vector": vector.to(dtype),
        "scalar": torch.tensor(draw(st.floats(-5, 5)), dtype=dtype),
        "empty": torch.zeros(0, d),
    }


# --- the wire size -----------------------------------------------------------------------------------


def test_encoded_size_is_the_arrays_bytes_plus_eight_bytes_per_shape_dimension():
    encoded = Encoded(
        {"a": np.zeros(3, np.int32), "b": np.zeros((3, 4), np.float16)},
        {"a": (10, 4), "s": ()},
    )
    assert encoded.nbytes == 12 + 24 + 8 * 2


# --- SparseRows ----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(updates())
def test_sparse_rows_round_trip_is_exact(tensors):
    sparse = SparseRows()
    decoded = sparse.decode(sparse.encode(tensors))
    assert decoded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert decoded[name].dtype == tensor.dtype and decoded[name].shape == tensor.shape
        assert torch.equal(decoded[name], tensor)


def test_sparse_rows_sends_touched_rows_and_picks_the_smaller_layout():
    tensors = message_tensors()
    encoded = SparseRows().encode(tensors)
    np.testing.assert_array_equal(encoded.arrays["items/rows"], [3, 17, 90])
    np.testing.assert_array_equal(encoded.arrays["item_bias/rows"], [4, 50])
    assert "dense/rows" not in encoded.arrays  # every row touched: indices would only add bytes
    items = 3 * 4 + 3 * 8 * 4 + 2 * 8  # row indices, float32 rows, header (100, 8)
    bias = 2 * 4 + 2 * 4 + 8
    dense = 9 * 4 + 2 * 8
    assert encoded.nbytes == items + bias + dense
    assert encoded.nbytes < 4 * sum(t.numel() for t in tensors.values())


def test_sparse_rows_sends_a_mostly_nonzero_vector_densely():
    vector = torch.arange(1.0, 11.0)
    vector[0] = 0  # 9 of 10 nonzero: 9 · (4 + 4) > 10 · 4
    encoded = SparseRows().encode({"v": vector})
    assert set(encoded.arrays) == {"v/values"} and encoded.nbytes == 40 + 8


# --- Float16 -------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.floats(-65504, 65504, allow_nan=False, allow_infinity=False, width=32),
        min_size=1,
        max_size=30,
    )
)
def test_float16_error_is_within_half_an_ulp(values):
    x = torch.tensor(values, dtype=torch.float32).reshape(-1, 1)
    decoded = Float16().decode(Float16().encode({"x": x}))["x"]
    error = (decoded - x).abs()
    normal = x.abs() >= 2.0**-14
    assert bool((error[normal] <= x.abs()[normal] * 2.0**-11).all())
    assert bool((error[~normal] <= 2.0**-25).all())  # subnormal range: an absolute bound


def test_float16_halves_the_value_bytes_and_keeps_the_layout():
    tensors = message_tensors()
    encoded = Float16().encode(tensors)
    np.testing.assert_array_equal(encoded.arrays["items/rows"], [3, 17, 90])
    assert encoded.arrays["items/values"].dtype == np.float16
    items = 3 * 4 + 3 * 8 * 2 + 16
    bias = 2 * 4 + 2 * 2 + 8
    dense = 9 * 2 + 16
    assert encoded.nbytes == items + bias + dense


@pytest.mark.parametrize("bad", [70000.0, -1e6, math.inf, math.nan])
def test_float16_refuses_values_it_cannot_hold(bad):
    with pytest.raises(ValueError, match="float16"):
        Float16().encode({"x": torch.tensor([1.0, bad])})


# --- StochasticInt8 ------------------------------------------------------------------------------


def test_int8_rounding_is_unbiased():
    x = message_tensors()
    x = {"items": x["items"], "item_bias": x["item_bias"]}
    for per in ("row", "tensor"):
        int8 = StochasticInt8(per)
        generator = torch.Generator().manual_seed(7)
        draws = 800
        total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in x.items()}
        for _ in range(draws):
            decoded = int8.decode(int8.encode(x, generator))
            for k in x:
                total[k] += decoded[k].double()
        for k, value in x.items():
            rows = value.reshape(len(value), -1) if value.dim() > 1 else value.reshape(1, -1)
            step = rows.abs().amax(1, keepdim=True) if per == "row" else rows.abs().max()
            step = (step / 127).double().expand_as(rows).reshape(value.shape)
            # Each code is one of two neighbours a step apart: std ≤ step/2, so the mean of `draws`
            # is within 5 standard errors of x on every entry (for a random seed some entry misses with
            # probability < 1e-4; this seed is fixed).
            bound = 5 * step / (2 * math.sqrt(draws)) + 1e-7
            assert bool(((total[k] / draws - value.double()).abs() <= bound).all()), (per, k)


@settings(max_examples=40, deadline=None)
@given(updates(), st.sampled_from(["row", "tensor"]), st.integers(0, 1000))
def test_int8_error_is_below_one_step_and_zero_rows_stay_absent(tensors, per, seed):
    tensors = {k: v.float() for k, v in tensors.items()}
    int8 = StochasticInt8(per)
    encoded = int8.encode(tensors, torch.Generator().manual_seed(seed))
    decoded = int8.decode(encoded)
    for name, x in tensors.items():
        codes = encoded.arrays[f"{name}/codes"]
        assert codes.dtype == np.int8 and np.abs(codes.astype(int)).max(initial=0) <= 127
        if per == "row" and x.dim() >= 2:
            scale = x.abs().amax(1, keepdim=True) if len(x) else x[:, :1]
        else:
            scale = x.abs().max() if x.numel() else torch.tensor(0.0)
        assert bool(((decoded[name] - x).abs() <= scale / 127 * (1 + 1e-6) + 1e-12).all())
        # An untouched row is neither sent nor made nonzero.
        rows, decoded_rows = as_rows(x), as_rows(decoded[name])
        untouched = rows.eq(0).all(1)
        assert bool(decoded_rows[untouched].eq(0).all())
        if f"{name}/rows" in encoded.arrays:
            kept = torch.from_numpy(encoded.arrays[f"{name}/rows"].astype(np.int64))
            assert not bool(untouched[kept].any())


def test_int8_sizes_per_row_and_per_tensor():
    tensors = message_tensors()
    generator = torch.Generator().manual_seed(0)
    per_row = StochasticInt8("row").encode(tensors, generator)
    per_tensor = StochasticInt8("tensor").encode(tensors, generator)
    # items: 3 row indices, 3 × 8 codes, and 3 scales (per row) or 1 (per tensor), header (100, 8).
    # item_bias: sparse costs 2 · (4 + 1) < 100 bytes: 2 indices, 2 codes, one scale (1-D: always
    # one), header. dense: every row touched, 9 codes dense, 3 scales or 1, header (3, 3).
    assert per_row.nbytes == (12 + 24 + 12 + 16) + (8 + 2 + 4 + 8) + (9 + 12 + 16)
    assert per_tensor.nbytes == (12 + 24 + 4 + 16) + (8 + 2 + 4 + 8) + (9 + 4 + 16)


def test_int8_layout_counts_the_per_row_scales():
    # A 10 × 1 table touched on 2 rows, per row: 2 · (4 + 1 + 4) = 18 bytes sparse < 10 · (1 + 4)
    # dense (without the scales in the count, 2 · (4 + 1) = 10 = 10 · 1 would have chosen dense).
    table = torch.zeros(10, 1)
    table[[2, 7]] = torch.tensor([[0.5], [-1.0]])
    encoded = StochasticInt8("row").encode({"t": table}, torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(encoded.arrays["t/rows"], [2, 7])
    assert encoded.nbytes == 18 + 16


def test_int8_needs_a_generator_and_a_known_granularity():
    with pytest.raises(ValueError, match="generator"):
        StochasticInt8().encode(message_tensors())
    with pytest.raises(ValueError, match="per"):
        StochasticInt8("column")


# --- TopK ----------------------------------------------------------------------------------------


def test_top_k_keeps_exactly_the_largest_entries_of_the_whole_message():
    tensors = {
        "a": torch.tensor([[0.0, 5.0], [-0.5, 0.0]]),
        "b": torch.tensor([0.0, -4.0, 0.1, 3.0, 0.2]),
    }
    # 6 nonzeros, fraction 0.5 → 3 kept: 5, −4, 3, from both tensors under one threshold.
    top = TopK(0.5)
    encoded = top.encode(tensors)
    decoded = top.decode(encoded)
    assert torch.equal(decoded["a"], torch.tensor([[0.0, 5.0], [0.0, 0.0]]))
    assert torch.equal(decoded["b"], torch.tensor([0.0, -4.0, 0.0, 3.0, 0.0]))
    np.testing.assert_array_equal(encoded.arrays["a/index"], [1])
    np.testing.assert_array_equal(encoded.arrays["b/index"], [1, 3])
    # int32 index + float32 value per kept entry; headers (2, 2) and (5,).
    assert encoded.nbytes == 3 * (4 + 4) + 8 * 3
    half = TopK(0.5, value_codec="float16").encode(tensors)
    assert half.nbytes == 3 * (4 + 2) + 8 * 3
    # ceil: 0.01 of 6 nonzeros still keeps one entry; a message with no nonzeros sends no entries.
    assert TopK(0.01).encode(tensors).nbytes == 8 + 8 * 3
    assert TopK(0.5).encode({"z": torch.zeros(4)}).nbytes == 8


@settings(max_examples=40, deadline=None)
@given(updates(), st.floats(0.01, 1.0))
def test_top_k_is_a_contraction_keeping_a_ceil_fraction_of_entries(tensors, fraction):
    tensors = {k: v.float() for k, v in tensors.items()}
    decoded = TopK(fraction).decode(TopK(fraction).encode(tensors))
    nonzeros = sum(int(t.ne(0).sum()) for t in tensors.values())
    kept = [(decoded[k] != 0) for k in tensors]
    assert sum(int(m.sum()) for m in kept) == math.ceil(fraction * nonzeros)
    for name, x in tensors.items():  # kept entries are exact, the others zero
        assert bool(((decoded[name] == x) | (decoded[name] == 0)).all())
    assert global_norm(decoded) <= global_norm(tensors) + 1e-9
    # The smallest kept magnitude is at least the largest dropped one (one global threshold).
    flat_x = torch.cat([x.reshape(-1) for x in tensors.values()])
    flat_d = torch.cat([decoded[k].reshape(-1) for k in tensors])
    dropped = flat_x[flat_d == 0]
    if bool(flat_d.ne(0).any()) and dropped.numel():
        assert float(flat_d[flat_d != 0].abs().min()) >= float(dropped.abs().max())


def test_top_k_checks_its_options():
    for fraction in (0.0, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            TopK(fraction)
    assert TopK(0.1).contraction and not TopK(0.1, "float16").contraction


# --- error feedback ------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", [TopK(0.2), StochasticInt8("row"), Float16()])
def test_error_feedback_loses_nothing_and_keeps_each_clients_residual(inner):
    feedback = ErrorFeedback(inner)
    generator = torch.Generator().manual_seed(3)
    inputs = {0: [], 1: []}
    sent = {0: [], 1: []}
    for t in range(6):
        for client in (0, 1):
            update = message_tensors(seed=10 * t + client)
            inputs[client].append(update)
            sent[client].append(feedback.decode(feedback.encode_for(client, update, generator)))
    for client in (0, 1):
        residual = feedback.residual(client)
        for name in inputs[client][0]:
            total_in = sum(u[name] for u in inputs[client])
            total_out = sum(s[name] for s in sent[client]) + residual[name]
            assert torch.allclose(total_out, total_in, atol=1e-5), (client, name)
    # Each client's residual follows only its own updates (the identity above holds per client);
    # for a deterministic codec, client 1 replayed alone ends with the same residual.
    if isinstance(inner, TopK):
        alone = ErrorFeedback(inner)
        for update in inputs[1]:
            alone.encode_for(1, update)
        for name in inputs[1][0]:
            assert torch.equal(alone.residual(1)[name], feedback.residual(1)[name])
    assert not torch.equal(feedback.residual(0)["items"], feedback.residual(1)["items"])


def test_error_feedback_sends_dropped_mass_later():
    # One entry too small for top-1 in round 1 is sent in round 2, once its residual has grown.
    feedback = ErrorFeedback(TopK(0.5))
    first = feedback.decode(feedback.encode_for(0, {"x": torch.tensor([1.0, 0.6])}))
    second = feedback.decode(feedback.encode_for(0, {"x": torch.tensor([1.0, 0.6])}))
    assert torch.equal(first["x"], torch.tensor([1.0, 0.0]))
    assert torch.equal(second["x"], torch.tensor([0.0, 1.2]))
    assert torch.allclose(feedback.residual(0)["x"], torch.tensor([1.0, 0.0]))


# --- by name -------------------------------------------------------------------------------------


def test_codecs_by_name():
    assert isinstance(codec("none"), SparseRows)
    assert isinstance(codec("float16"), Float16)
    assert codec("int8-row") == StochasticInt8("row")
    assert codec("int8-tensor") == StochasticInt8("tensor")
    assert codec("topk", fraction=0.1, value_codec="float16") == TopK(0.1, "float16")
    assert [codec(n).name for n in ("none", "float16", "int8-row", "int8-tensor")] == [
        "none",
        "float16",
        "int8-row",
        "int8-tensor",
    ]
    with pytest.raises(ValueError, match="codec must be one of"):
        codec("zip")


# --- low-rank item tables ----------------------------------------------------------------------------


def client_message(seed, n_examples, touched):
    generator = torch.Generator().manual_seed(seed)
    return ClientMessage(
        {"items": row_table(30, 8, touched, seed), "dense": torch.randn(4, generator=generator)},
        weight=1.0,
        num_examples=n_examples,
        local_steps=1,
    )


def test_shared_basis_is_orthonormal_public_and_checked():
    basis = shared_basis(5, "items", 3, 8)
    assert basis.shape == (3, 8)
    assert torch.allclose(basis @ basis.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.equal(basis, shared_basis(5, "items", 3, 8))  # every party draws the same B
    assert not torch.equal(basis, shared_basis(6, "items", 3, 8))
    assert not torch.equal(basis, shared_basis(5, "items", 3, 8, round_number=1))
    with pytest.raises(ValueError, match="rank"):
        shared_basis(5, "items", 9, 8)
    with pytest.raises(ValueError, match="rank"):
        LowRankRows({"items": 8}, rank=9, seed=0)


def test_projection_commutes_with_the_sum_and_reproduces_its_subspace():
    low_rank = LowRankRows({"items": 8}, rank=3, seed=1)
    messages = [client_message(s, 1, touched) for s, touched in enumerate([[1, 2], [2, 9], [20]])]
    projected = [low_rank.client_stage(m) for m in messages]
    assert projected[0].tensors["items"].shape == (30, 3)  # what is sent and summed: n × r
    assert torch.equal(projected[0].tensors["dense"], messages[0].tensors["dense"])
    # Zero rows stay exactly zero (the message still names only the rows it touched).
    assert torch.equal(
        projected[0].tensors["items"].ne(0).any(1), messages[0].tensors["items"].ne(0).any(1)
    )
    summed = AggregationPipeline(client_stages=()).summation(projected)
    lifted_sum = low_rank.server_stage(summed).tensors["items"]
    sum_of_lifted = sum(
        low_rank.server_stage(AggregationPipeline(client_stages=()).summation([p])).tensors["items"]
        for p in projected
    )
    assert torch.allclose(lifted_sum, sum_of_lifted, atol=1e-6)
    # A message already in B's row space comes back unchanged.
    inside = torch.randn(30, 3, dtype=torch.float64) @ low_rank.basis("items")
    message = ClientMessage({"items": inside.float()}, 1.0, 1, 1)
    back = low_rank.server_stage(
        AggregationPipeline(client_stages=()).summation([low_rank.client_stage(message)])
    )
    assert torch.allclose(back.tensors["items"], inside.float(), atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 8))
def test_projection_is_a_contraction(seed, rank):
    low_rank = LowRankRows({"items": 8}, rank=rank, seed=seed)
    update = torch.randn(30, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    basis = low_rank.basis("items")
    coefficients = update @ basis.T
    lifted = coefficients @ basis
    assert float(lifted.norm()) <= float(update.norm()) * (1 + 1e-12)
    assert math.isclose(float(lifted.norm()), float(coefficients.norm()), rel_tol=1e-12)
    # Clipping then projecting keeps the clip (float32 rounding aside), so DP's sensitivity holds.
    clipped = ClipUpdate(1.0)(ClientMessage({"items": update.float()}, 1.0, 1, 1))
    assert global_norm(low_rank.client_stage(clipped).tensors) <= 1.0 + 1e-6


def test_pipeline_with_projection_is_the_weighted_mean_of_projected_updates():
    low_rank = LowRankRows({"items": 8}, rank=4, seed=2)
    pipeline = AggregationPipeline(
        client_stages=(weight_by_examples, LowRankRows({"items": 8}, 4, 2).client_stage),
        server_stages=(LowRankRows({"items": 8}, 4, 2).server_stage,),
    )
    messages = [client_message(s, n, t) for s, n, t in [(0, 10, [1, 2]), (1, 30, [2, 5])]]
    mean = pipeline.aggregate([pipeline.on_client(m) for m in messages])
    basis = low_rank.basis("items").float()
    expected = sum(m.num_examples * (m.tensors["items"] @ basis.T @ basis) for m in messages) / 40
    assert torch.allclose(mean["items"], expected, atol=1e-6)
    expected_dense = sum(m.num_examples * m.tensors["dense"] for m in messages) / 40
    assert torch.allclose(mean["dense"], expected_dense, atol=1e-6)
    assert pipeline.on_client(messages[0]).tensors["items"].shape == (30, 4)


def test_projection_composes_with_row_means():
    low_rank = LowRankRows({"items": 8}, rank=4, seed=3)
    pipeline = with_row_means(
        AggregationPipeline(
            client_stages=(weight_by_examples, low_rank.client_stage),
            server_stages=(low_rank.server_stage,),
        ),
        ("items",),
    )
    messages = [client_message(s, n, t) for s, n, t in [(0, 10, [1, 2]), (1, 30, [2, 5])]]
    sent = [pipeline.on_client(m) for m in messages]
    # The row-weight column is the client's weight on its touched rows, not projected.
    column = sent[0].tensors[ROW_WEIGHT_PREFIX + "items"]
    assert column.shape == (30, 1) and set(column.flatten().tolist()) == {0.0, 10.0}
    mean = pipeline.aggregate(sent)
    basis = low_rank.basis("items").float()
    lifted = [m.tensors["items"] @ basis.T @ basis for m in messages]
    expected = torch.zeros(30, 8)
    expected[1] = lifted[0][1]  # only client 0 touched row 1
    expected[5] = lifted[1][5]  # only client 1 touched row 5
    expected[2] = (10 * lifted[0][2] + 30 * lifted[1][2]) / 40
    assert torch.allclose(mean["items"], expected, atol=1e-6)


def test_projection_checks_the_table_width():
    low_rank = LowRankRows({"items": 8}, rank=2, seed=0)
    with pytest.raises(ValueError, match="n × 8"):
        low_rank.client_stage(ClientMessage({"items": torch.zeros(5, 6)}, 1.0, 1, 1))
    later = low_rank.for_round(4)
    assert later.round_number == 4 and not torch.equal(
        later.basis("items"), low_rank.basis("items")
    )
