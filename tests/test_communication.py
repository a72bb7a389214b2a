"""[communication]: the simulated clock (fl/timing.py), the wire (fl/wire.py), the config's refusals,
and cross-silo runs on the embedded Online Retail data that report their bytes, compress, and run
FedBuff with an audit log that still verifies."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedshop.config import CommunicationConfig, ConfigError, load_config
from fedshop.fl.aggregation import aggregation_pipeline
from fedshop.fl.compression import (
    ErrorFeedback,
    LowRankRows,
    SparseRows,
    StochasticInt8,
    shared_basis,
)
from fedshop.fl.timing import ClientClock, synchronous_round_seconds
from fedshop.fl.wire import Wire, baseline_bytes, with_low_rank
from fedshop.messages import ClientMessage
from fedshop.models.spec import get_model
from fedshop.privacy.noise import global_norm
from fedshop.storage.audit import AuditLog, Problem, Verified, verify_entries

QUICK = "configs/quick.toml"

# -- the clock --------------------------------------------------------------------------------------


def test_equal_speeds_give_equal_times_for_equal_work_by_the_formula():
    config = CommunicationConfig(seconds_per_example=0.004, uplink_mbps=2.0, downlink_mbps=16.0)
    clock = ClientClock.of(config, 50, seed=3)
    times = {clock.duration(c, 120.0, 3, 9_000, 50_000) for c in range(50)}
    assert len(times) == 1
    # 50 000 B at 16 Mbit/s, 120 × 3 examples at 4 ms, 9 000 B at 2 Mbit/s.
    by_hand = 50_000 / 2_000_000 + 120 * 3 * 0.004 + 9_000 / 250_000
    assert times.pop() == pytest.approx(by_hand, rel=1e-12)
    assert clock.duration(7, 0.0, 1, 0, 0) == 0.0
    assert clock.drop_outs(range(50)) == set()  # dropout 0: nobody


def test_lognormal_speeds_have_the_configured_spread_and_medians():
    n, sigma = 20_000, 0.7
    config = CommunicationConfig(
        client_speeds="lognormal", speed_sigma=sigma, seconds_per_example=0.01,
        uplink_mbps=8.0, downlink_mbps=40.0,
    )  # fmt: skip
    clock = ClientClock.of(config, n, seed=11)
    logs = {
        "compute": np.log(clock.seconds_per_example),
        "uplink": np.log(clock.uplink_bytes_per_second),
        "downlink": np.log(clock.downlink_bytes_per_second),
    }
    medians = {"compute": 0.01, "uplink": 1e6, "downlink": 5e6}  # bytes per second for the links
    for name, values in logs.items():
        # Standard errors at n = 20 000: σ/√(2n) ≈ 0.0035 for the spread, 1.25σ/√n ≈ 0.006 for
        # the median; the bounds are five of them.
        assert abs(values.std() - sigma) < 0.02, name
        assert abs(np.median(values) - math.log(medians[name])) < 0.035, name
    # Drawn independently: a slow phone's link is not tied to its compute.
    assert abs(np.corrcoef(logs["compute"], logs["uplink"])[0, 1]) < 0.04
    # The slow tail is the long one: one client in ten at least e^(1.28σ) slower than the median.
    slow = clock.seconds_per_example / 0.01
    assert np.mean(slow >= math.exp(1.2816 * sigma)) == pytest.approx(0.1, abs=0.01)


def test_dropouts_are_drawn_at_the_configured_rate():
    clock = ClientClock.of(CommunicationConfig(dropout=0.3), 10, seed=5)
    lost = sum(len(clock.drop_outs(range(1_000))) for _ in range(20))
    assert lost / 20_000 == pytest.approx(0.3, abs=0.015)  # 5 standard errors


def test_the_same_seed_gives_the_same_clock_and_dropouts():
    config = CommunicationConfig(client_speeds="lognormal", dropout=0.2)
    a, b, c = (ClientClock.of(config, 100, seed) for seed in (4, 4, 5))
    for field in ("seconds_per_example", "uplink_bytes_per_second", "downlink_bytes_per_second"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
        assert not np.array_equal(getattr(a, field), getattr(c, field))
    assert [a.drop_outs(range(100)) for _ in range(3)] == [
        b.drop_outs(range(100)) for _ in range(3)
    ]


def test_a_synchronous_round_ends_with_its_slowest_reporter_or_the_timeout():
    durations = {0: 1.0, 1: 5.0, 2: 3.0}
    fixed = ClientClock.of(CommunicationConfig(round_timeout=10.0), 3, seed=0)
    assert synchronous_round_seconds(fixed, durations, set()) == 5.0
    assert synchronous_round_seconds(fixed, durations, {1}) == 10.0
    # The timeout is a lower bound on a round with a dropout, not a cap on the slowest reporter.
    short = ClientClock.of(CommunicationConfig(round_timeout=2.0), 3, seed=0)
    assert synchronous_round_seconds(short, durations, {0}) == 5.0
    # round_timeout 0: three times the median duration (of all started, dropouts included).
    default = ClientClock.of(CommunicationConfig(), 3, seed=0)
    assert synchronous_round_seconds(default, durations, {1}) == pytest.approx(9.0)
    assert synchronous_round_seconds(default, durations, set()) == 5.0


# -- the wire ---------------------------------------------------------------------------------------


def mf_messages(n_items=60, dim=8, touched=((3, 9, 40), (0,), (), tuple(range(45)))):
    """Per-client messages of an MF model: the shared model's shape, nonzero only on each client's
    touched rows (item embedding and item bias alike), as a silo's update is."""
    config = load_config(overrides={"model.dim": dim})
    spec = get_model("mf-bpr")
    shared = spec.init_model(n_items, config.model, torch.Generator().manual_seed(0))
    messages = []
    for i, rows in enumerate(touched):
        generator = torch.Generator().manual_seed(100 + i)
        tensors = {}
        for name, tensor in shared.items():
            update = torch.zeros_like(tensor)
            update[list(rows)] = torch.randn(update[list(rows)].shape, generator=generator) + 0.1
            tensors[name] = update
        messages.append(ClientMessage(tensors, 1.0, float(10 + i), 3))
    return spec, shared, messages


def test_baseline_bytes_is_what_sparse_rows_encodes():
    spec, shared, messages = mf_messages()
    assert set(shared) == set(spec.item_tables) == {"item_embedding", "item_bias"}
    counts = torch.tensor([3, 1, 0, 45])
    expected = [SparseRows().encode(m.tensors).nbytes for m in messages]
    assert baseline_bytes(counts, shared, spec.item_tables).tolist() == expected
    # By hand: 45 of 60 rows touched sends the 60-entry bias densely but the table sparsely.
    assert expected[3] == 45 * (4 + 8 * 4) + 16 + 60 * 4 + 8
    assert expected[2] == 16 + 8  # nothing touched: only the shapes' header
    # A dense tensor that is not an item table costs its whole size whatever was touched.
    dense = {**shared, "layer": torch.zeros(4, 5)}
    as_dense = baseline_bytes(counts, dense, spec.item_tables) - baseline_bytes(
        counts, shared, spec.item_tables
    )
    assert as_dense.tolist() == [4 * 5 * 4 + 16] * 4


def test_carry_with_codec_none_returns_the_very_same_message():
    _, _, messages = mf_messages()
    wire = Wire.of_run(load_config(overrides={"communication.codec": "none"}))
    for i, message in enumerate(messages):
        received, size = wire.carry(i, 1, message)
        assert received is message
        assert size == SparseRows().encode(message.tensors).nbytes
        encoded, sent = wire.send(i, 1, message)
        assert wire.open((message, encoded)) is message and sent == size


def test_topk_with_error_feedback_keeps_each_clients_residual():
    _, _, messages = mf_messages()
    config = load_config(
        overrides={"communication.codec": "topk", "communication.topk_fraction": 0.3}
    )
    wire = Wire.of_run(config)
    assert isinstance(wire.codec, ErrorFeedback) and not wire.lossless
    received = {}
    for i in (0, 1, 3):
        received[i], size = wire.carry(i, 1, messages[i])
        assert size < SparseRows().encode(messages[i].tensors).nbytes
        # The message as the server has it plus what the client kept is the client's update.
        residual = wire.codec.residual(i)
        for name, sent in messages[i].tensors.items():
            assert torch.allclose(received[i].tensors[name] + residual[name], sent, atol=1e-6)
        assert (received[i].weight, received[i].num_examples) == (1.0, messages[i].num_examples)
    assert set(wire.codec.residuals) == {0, 1, 3}
    # Client 0's next message carries its own residual, not client 3's.
    before = {k: v.clone() for k, v in wire.codec.residual(0).items()}
    again, _ = wire.carry(0, 2, messages[0])
    after = wire.codec.residual(0)
    for name, sent in messages[0].tensors.items():
        assert torch.allclose(again.tensors[name] + after[name], sent + before[name], atol=1e-6)
    assert Wire.of_run(replace_error_feedback(config, False)).codec.name == "topk"
    # int8's rounding is unbiased: it goes without a residual, whatever error_feedback says.
    int8 = load_config(overrides={"communication.codec": "int8-row"})
    assert Wire.of_run(int8).codec.name == "int8-row"


def replace_error_feedback(config, on: bool):
    return replace(config, communication=replace(config.communication, error_feedback=on))


def test_reclip_bounds_a_decoded_message_that_rounding_lengthened():
    _, _, messages = mf_messages()
    bound = 0.5
    wire = Wire(ErrorFeedback(StochasticInt8("row")), seed=1, reclip=bound)
    assert wire.reclip is not None
    for i, message in enumerate(messages):
        if global_norm(message.tensors) == 0:
            continue
        clipped = replace(message, tensors={
            k: v * (bound / float(global_norm(message.tensors))) for k, v in message.tensors.items()
        })  # fmt: skip
        for round_number in range(1, 4):  # error feedback adds old residual: longer than C
            received, _ = wire.carry(i, round_number, clipped)
            assert float(global_norm(received.tensors)) <= bound * (1 + 1e-6)
    # A contraction without feedback needs no re-clip.
    assert Wire(SparseRows(), reclip=bound).reclip is None


def test_with_low_rank_adds_the_projection_last_and_the_lift_first_and_sums_to_the_projected_mean():
    _, _, messages = mf_messages(dim=16)
    config = load_config(overrides={"model.dim": 16, "communication.low_rank": 4})
    base = aggregation_pipeline(config.federated.aggregation)
    pipeline = with_low_rank(base, config)
    assert pipeline.client_stages[:-1] == base.client_stages
    assert pipeline.server_stages[1:] == base.server_stages
    project, lift = pipeline.client_stages[-1], pipeline.server_stages[0]
    assert (
        isinstance(project.__self__, LowRankRows) and project.__func__ is LowRankRows.client_stage
    )
    assert isinstance(lift.__self__, LowRankRows) and lift.__func__ is LowRankRows.server_stage
    assert dict(project.__self__.tables) == {"item_embedding": 16}  # the bias is not a matrix
    assert with_low_rank(base, replace(config, communication=CommunicationConfig())) is base

    staged = [pipeline.on_client(m) for m in messages]
    assert all(s.tensors["item_embedding"].shape == (60, 4) for s in staged)
    mean = pipeline.aggregate(staged)
    plain = base.aggregate([base.on_client(m) for m in messages])
    basis = shared_basis(config.seed, "item_embedding", 4, 16).float()
    projected = plain["item_embedding"] @ basis.T @ basis
    assert torch.allclose(mean["item_embedding"], projected, atol=1e-5)
    assert torch.allclose(mean["item_bias"], plain["item_bias"], atol=1e-6)
    assert not torch.allclose(projected, plain["item_embedding"], atol=1e-3)  # it did project


# -- the config -------------------------------------------------------------------------------------

REFUSED = [
    ({"communication.codec": "gzip"}, "[communication] codec"),
    ({"communication.schedule": "async"}, "[communication] schedule"),
    ({"communication.client_speeds": "pareto"}, "[communication] client_speeds"),
    ({"communication.topk_fraction": 0.0}, "[communication] topk_fraction"),
    ({"communication.topk_fraction": 1.5}, "[communication] topk_fraction"),
    ({"communication.low_rank": -1}, "[communication] low_rank"),
    ({"communication.buffer_size": 0}, "[communication] buffer_size"),
    ({"communication.concurrency": -1}, "[communication] concurrency"),
    ({"communication.staleness_exponent": -0.5}, "[communication] staleness_exponent"),
    ({"communication.seconds_per_example": 0.0}, "[communication] seconds_per_example"),
    ({"communication.uplink_mbps": 0.0}, "[communication] uplink_mbps"),
    ({"communication.downlink_mbps": -1.0}, "[communication] downlink_mbps"),
    ({"communication.speed_sigma": -0.1}, "[communication] speed_sigma"),
    ({"communication.dropout": 1.0}, "[communication] dropout"),
    ({"communication.dropout": -0.1}, "[communication] dropout"),
    ({"communication.round_timeout": -1.0}, "[communication] round_timeout"),
    # Combinations (RunConfig._validate_communication).
    ({"communication.codec": "int8-row", "protection.kind": "secagg"}, "[communication] codec"),
    ({"communication.codec": "float16", "protection.kind": "paillier"}, "[communication] codec"),
    ({"communication.low_rank": 9, "model.dim": 8}, "[communication] low_rank"),
    ({"communication.schedule": "fedbuff", "protection.kind": "secagg"}, "[protection]"),
    (
        {"communication.schedule": "fedbuff", "privacy.mode": "record", "privacy.epsilon": 8.0},
        "[privacy]",
    ),
    ({"communication.schedule": "fedbuff", "federated.robust": "median"}, "[federated] robust"),
    ({"communication.schedule": "fedbuff", "attack.kind": "sign-flip"}, "[attack]"),
    (
        {
            "communication.schedule": "fedbuff",
            "communication.buffer_size": 5,
            "communication.concurrency": 3,
        },
        "[communication] concurrency",
    ),
    (
        {
            "communication.schedule": "fedbuff",
            "communication.buffer_size": 5,
            "federated.silos_per_round": 3,
        },
        "buffer_size",
    ),
    # Only recommendation runs communicate through these settings.
    (
        {"task": "fit", "data.dataset": "renttherunway", "communication.codec": "float16"},
        "[communication]",
    ),
    ({"task": "demand", "communication.schedule": "fedbuff"}, "[communication]"),
]


@pytest.mark.parametrize(("overrides", "key"), REFUSED, ids=lambda v: str(v)[:60])
def test_each_refusal_names_its_key(overrides, key):
    with pytest.raises(ConfigError) as refused:
        load_config(overrides=overrides)
    assert key in str(refused.value)
    if key in ("[protection]", "[privacy]", "[federated] robust", "[attack]"):
        assert '[communication] schedule = "fedbuff"' in str(refused.value)


def test_what_is_allowed_loads():
    load_config(overrides={"communication.low_rank": 4, "protection.kind": "secagg"})
    load_config(overrides={"communication.codec": "int8-row", "privacy.mode": "record",
                           "privacy.epsilon": 8.0})  # fmt: skip
    load_config(overrides={"task": "demand"})
    config = load_config(overrides={"communication.schedule": "fedbuff",
                                    "communication.buffer_size": 5,
                                    "communication.concurrency": 5})  # fmt: skip
    assert config.communication.buffer_size == 5
    CommunicationConfig().validate()


# -- end to end on the embedded data ------------------------------------------------------------------


@pytest.fixture(scope="module")
def retail_quick():
    from fedshop.data.datasets import load_dataset

    config = load_config(QUICK, overrides={"contribution.method": "none"})
    return load_dataset(config.data)


RUNS = {
    "none": {},
    "int8": {"communication.codec": "int8-row"},
    "low-rank": {"communication.low_rank": 4},
    "fedbuff": {
        "communication.schedule": "fedbuff",
        "communication.buffer_size": 5,
        "communication.client_speeds": "lognormal",
        "federated.rounds": 4,
    },
}


@pytest.fixture(scope="module")
def runs(retail_quick):
    from fedshop.fl.in_process import run_cross_silo

    done = {}

    def run(name):
        if name not in done:
            overrides = {"contribution.method": "none", "federated.rounds": 2, **RUNS[name]}
            config = load_config(QUICK, overrides=overrides)
            done[name] = (config, run_cross_silo(retail_quick, config))
        return done[name]

    return run


def test_every_round_reports_encoded_bytes_per_silo_and_a_clock_by_the_slowest(runs, retail_quick):
    config, run = runs("none")
    names = [c.name for c in run.clients]
    model = 4 * sum(v.numel() for v in run.server.shared.values())
    clock = 0.0
    for record in run.history:
        traffic = record.traffic
        assert traffic["source"] == "encoded"
        assert set(traffic["parties"]) == set(names)
        assert all(p["sent"] > 0 and p["received"] == model for p in traffic["parties"].values())
        assert traffic["sent"] == sum(p["sent"] for p in traffic["parties"].values())
        assert traffic["received"] == model * len(names)
        # Synchronous, equal speeds: the round lasts as long as its slowest silo takes.
        com = config.communication
        slowest = max(
            model / (com.downlink_mbps * 1e6 / 8)
            + retail_quick.silo(i).n_train * config.federated.local_epochs * com.seconds_per_example
            + traffic["parties"][name]["sent"] / (com.uplink_mbps * 1e6 / 8)
            for i, name in enumerate(names)
        )
        clock += slowest
        assert record.clock == pytest.approx(clock, rel=1e-9)


def test_int8_and_low_rank_send_fewer_bytes_than_none(runs):
    _, plain = runs("none")
    _, int8 = runs("int8")
    _, low = runs("low-rank")
    big = max(plain.clients, key=lambda c: c.data.n_train).name
    first = plain.history[0].traffic
    for other in (int8, low):
        assert other.history[0].traffic["sent"] < first["sent"]
        assert other.history[0].traffic["received"] == first["received"]
        for name, party in other.history[0].traffic["parties"].items():
            assert party["sent"] < first["parties"][name]["sent"]
    assert 3 * int8.history[0].traffic["parties"][big]["sent"] <= first["parties"][big]["sent"]


def test_fedbuff_runs_with_stale_updates_and_a_clock_that_moves_on(runs):
    _, run = runs("fedbuff")
    assert len(run.history) == 4
    clocks = [r.clock for r in run.history]
    assert all(b > a for a, b in itertools.pairwise(clocks)) and clocks[0] > 0
    assert all(len(r.clients) == 5 for r in run.history)
    rounds = [e["body"] for e in run.audit.log.entries if e["kind"] == "round"]
    trained_on = [
        (body["round"], int(p), r) for body in rounds for p, r in body.get("trained_on", {}).items()
    ]
    assert any(r < number for number, _, r in trained_on)  # some update was stale
    for number, party, started in trained_on:
        assert 1 <= started <= number and party in next(
            b["participants"] for b in rounds if b["round"] == number
        )
    for record in run.history:  # each contributor's bytes; the model went to those who started
        assert all(
            record.traffic["parties"][run.clients[c].name]["sent"] > 0 for c in record.clients
        )


def closed(log: AuditLog, entries: list[dict]) -> list[dict]:
    """The entries re-signed by the run's server key (as whoever holds it could), and closed."""
    copy = AuditLog(log.server)
    for entry in entries:
        copy.append(entry["kind"], entry["body"])
    copy.close()
    return copy.entries


def test_a_fedbuff_runs_audit_log_verifies_and_a_forged_trained_on_does_not(runs):
    _, run = runs("fedbuff")
    log = run.audit.log
    entries = [dict(e) for e in log.entries]
    verified = verify_entries(closed(log, entries))
    assert isinstance(verified, Verified), verified
    assert verified.rounds == 4

    index, party = next(
        (i, p)
        for i, e in enumerate(entries)
        if e["kind"] == "round"
        for p, r in e["body"].get("trained_on", {}).items()
        if r < e["body"]["round"]
    )
    name = run.clients[int(party)].name
    # Even the server, re-signing the whole chain, cannot say a silo trained on another model than
    # the one it signed: its acknowledgement does not verify.
    number, real = entries[index]["body"]["round"], entries[index]["body"]["trained_on"][party]
    for forged_round in (r for r in range(1, number + 1) if r != real):
        body = json_copy(entries[index]["body"])
        body["trained_on"][party] = forged_round
        forged = [*entries[:index], {**entries[index], "body": body}, *entries[index + 1 :]]
        problem = verify_entries(closed(log, forged))
        assert problem == Problem(
            index, f"{name}'s acknowledgement does not verify (or is missing)"
        )
    # Dropping trained_on altogether (claiming everyone trained on this round's model) fails too.
    body = json_copy(entries[index]["body"])
    del body["trained_on"]
    forged = [*entries[:index], {**entries[index], "body": body}, *entries[index + 1 :]]
    assert isinstance(verify_entries(closed(log, forged)), Problem)
    # And an edit without re-signing is caught by the chain itself.
    edited = json_copy(closed(log, entries))
    edited[index]["body"]["trained_on"][party] = entries[index]["body"]["round"]
    assert verify_entries(edited) == Problem(index, "its hash does not match its content (edited)")


def json_copy(value):
    return json.loads(json.dumps(value))


def test_fedbuff_concurrency_defaults_to_silos_per_round(retail_quick):
    from fedshop.fl.in_process import build_federation, silo_schedule

    config = load_config(QUICK, overrides={
        "contribution.method": "none", "communication.schedule": "fedbuff",
        "communication.buffer_size": 3, "federated.silos_per_round": 4,
    })  # fmt: skip
    clients = build_federation(retail_quick, config).clients
    assert len(clients) > 4
    assert silo_schedule(config, clients)[1] == 4


# -- cross-device: shoppers' touched-row messages -----------------------------------------------------


def mf_shared(n_items=60, dim=8):
    spec = get_model("mf-bpr")
    config = load_config(overrides={"model.dim": dim})
    return spec, spec.init_model(n_items, config.model, torch.Generator().manual_seed(1))


def row_update(items, shared, seed):
    from fedshop.fl.wire import RowUpdate

    g = torch.Generator().manual_seed(seed)
    items = torch.tensor(sorted(items))
    tensors = {k: torch.randn((len(items), *v.shape[1:]), generator=g) for k, v in shared.items()}
    return RowUpdate(items, tensors)


def test_a_shoppers_uncompressed_row_message_costs_what_baseline_bytes_says():
    from fedshop.fl.wire import RowWire

    spec, shared = mf_shared()
    wire = RowWire(Wire(), spec.item_tables)
    for items in ((3, 9, 40), (0,), tuple(range(0, 60, 7))):
        parcel, size = wire.send(0, 1, row_update(items, shared, len(items)))
        assert size == int(baseline_bytes(torch.tensor([len(items)]), shared, spec.item_tables)[0])
        received = wire.open(parcel)
        assert torch.equal(received.items, torch.tensor(sorted(items)))


def test_row_error_feedback_sends_everything_in_the_end_on_changing_rows():
    """Σ decoded + the residual left = Σ updates, per catalogue row, though each round's update
    touches other rows; two shoppers' residuals stay apart."""
    from fedshop.fl.compression import TopK
    from fedshop.fl.wire import RowWire

    spec, shared = mf_shared()
    wire = RowWire(Wire(ErrorFeedback(TopK(0.2))), spec.item_tables)
    sent = {k: torch.zeros_like(v) for k, v in shared.items()}
    given = {k: torch.zeros_like(v) for k, v in shared.items()}
    for round_number, items in enumerate(((1, 2, 3), (3, 4), (10, 2, 50), (7,)), start=1):
        update = row_update(items, shared, round_number)
        for k, v in update.tensors.items():
            given[k].index_add_(0, update.items, v)
        parcel, _ = wire.send(5, round_number, update)
        received = wire.open(parcel)
        for k, v in received.tensors.items():
            sent[k].index_add_(0, received.items, v)
        wire.send(6, round_number, row_update((0, 59), shared, 99))
    left = wire.residuals[5]
    for k in shared:
        total = sent[k].clone().index_add_(0, left.items, left.tensors[k])
        assert torch.allclose(total, given[k], atol=1e-5)
    assert set(wire.residuals) == {5, 6}
    assert set(wire.residuals[6].items.tolist()) <= {0, 59}


def test_low_rank_on_a_shoppers_rows_or_on_their_sum_is_the_same():
    """The vectorised round projects the sum of the shoppers' rows; each shopper projecting its
    own rows (FedBuff, codecs) gives the same sum: the projection is linear."""
    from fedshop.fl.wire import RowProjection

    _, shared = mf_shared(dim=8)
    config = load_config(overrides={"model.dim": 8, "communication.low_rank": 3})
    projection = RowProjection.of_run(config)
    updates = [row_update(items, shared, i) for i, items in enumerate(((1, 2), (2, 30), (59,)))]
    each = projection.shapes({k: torch.zeros_like(v) for k, v in shared.items()})
    whole = {k: torch.zeros_like(v) for k, v in shared.items()}
    for update in updates:
        projected = projection.project(update)
        for k in shared:
            each[k].index_add_(0, update.items, projected.tensors[k])
            whole[k].index_add_(0, update.items, update.tensors[k])
    summed = projection.project_message(ClientMessage(whole, 1.0, 1.0, 1)).tensors
    for k in shared:
        assert torch.allclose(each[k], summed[k], atol=1e-5)
    assert each["item_embedding"].shape == (60, 3)


@pytest.fixture(scope="module")
def shopper_runs(retail_quick):
    from fedshop.fl.cross_device import run_cross_device

    done = {}

    def run(name):
        if name not in done:
            overrides = {
                "federated.mode": "cross-device", "federated.clients_per_round": 100,
                "federated.rounds": 2, "federated.personalise_epochs": 0, **RUNS[name],
            }  # fmt: skip
            overrides["federated.rounds"] = max(overrides["federated.rounds"], 2)
            if name == "fedbuff":
                overrides["communication.buffer_size"] = 25
            config = load_config(QUICK, overrides=overrides)
            done[name] = (config, run_cross_device(retail_quick, config))
        return done[name]

    return run


def test_shoppers_report_their_bytes_and_compression_cuts_them(shopper_runs):
    sent = {}
    for name in ("none", "int8", "low-rank"):
        _, run = shopper_runs(name)
        for record in run.history:
            assert record.traffic["source"] == "encoded"
            assert record.traffic["received"] == 100 * 4 * sum(
                v.numel() for v in run.shared.values()
            )
            assert "parties" not in record.traffic  # 100 shoppers: totals only
        sent[name] = sum(r.traffic["sent"] for r in run.history)
    assert sent["int8"] < sent["none"] / 2.5
    assert sent["low-rank"] < sent["none"] / 2.5  # dim 16 → rank 4


def test_fedbuff_shoppers_step_on_the_first_arrivals(shopper_runs):
    _, run = shopper_runs("fedbuff")
    assert all(len(r.clients) == 25 for r in run.history)
    clocks = [r.clock for r in run.history]
    assert clocks == sorted(clocks) and clocks[0] > 0
    assert any(s > 0 for r in run.history for s in (r.staleness or {}).values())
    assert math.isfinite(run.history[-1].metrics["hr@10"])


def test_topk_keeps_a_budget_of_the_fresh_update_under_error_feedback():
    """The residual's rows do not swell later messages: each keeps ceil(fraction × the fresh
    update's nonzeros) entries, however many rows the residual has reached."""
    from fedshop.fl.compression import TopK

    feedback = ErrorFeedback(TopK(0.1))
    g = torch.Generator().manual_seed(3)
    for _ in range(6):
        update = torch.zeros(50, 4)
        rows = torch.randperm(50, generator=g)[:5]
        update[rows] = torch.randn(5, 4, generator=g)
        encoded = feedback.encode_for(0, {"table": update})
        assert len(encoded.arrays["table/index"]) == math.ceil(0.1 * 20)
    assert int(feedback.residual(0)["table"].ne(0).any(1).sum()) > 5  # it has spread
