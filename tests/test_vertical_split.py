"""Split learning on RentTheRunway: the party split, the messages across the cut, the attacks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest

from fedshop.data.renttherunway import load_renttherunway, parse_official
from fedshop.errors import DataError
from fedshop.vertical.leakage import (
    RecordingTransport,
    label_dp_epsilon,
    label_leakage,
    single_label_customers,
)
from fedshop.vertical.scenario import (
    PARTNER_COLUMNS,
    PLATFORM_COLUMNS,
    PartyTable,
    renttherunway_scenario,
    split_features,
)
from fedshop.vertical.simulate import NoPartners, subsample
from fedshop.vertical.split_learning import (
    FeatureHolder,
    LabelHolder,
    LocalTransport,
    Plan,
    SplitProtocolError,
    train_split,
)

SMALL = Plan(rounds=3, batch_size=512, activation_dim=8, hidden=32, final_epochs=1)


@pytest.fixture(scope="module")
def rtr(data_dir):
    return load_renttherunway(data_dir)


@pytest.fixture(scope="module")
def scenario(rtr):
    return renttherunway_scenario(rtr, seed=3)


@pytest.fixture(scope="module")
def small(rtr):
    """A few thousand customers: enough rentals for the protocol tests, fast."""
    scenario = renttherunway_scenario(subsample(rtr, 4000, seed=1), seed=1)
    return scenario, scenario.aligned_ids()


def parties(scenario, aligned, plan):
    holders = {
        t.name: FeatureHolder(t.frame, t.columns, aligned, plan, name=t.name)
        for t in scenario.features
    }
    label = LabelHolder(scenario.label.frame, scenario.label.columns, aligned, plan)
    return holders, label


def test_the_loader_counts_what_it_keeps(rtr):
    assert rtr.counts["rows_read"] == 192_544 == rtr.counts["rows_kept"]
    assert rtr.rentals["fit"].value_counts().to_dict() == {
        "fit": 142_058,
        "small": 25_779,
        "large": 24_707,
    }
    assert rtr.rentals["user_id"].nunique() == 105_571


def test_without_the_file_the_error_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError, match=r"cseweb\.ucsd\.edu"):
        load_renttherunway(tmp_path)
    with pytest.raises(DataError, match="FEDSHOP_DATA_DIR"):
        load_renttherunway(None)


def test_the_official_json_is_parsed_into_the_same_columns():
    record = {
        "fit": "fit", "user_id": "420272", "bust size": "34d", "item_id": "2260466",
        "weight": "137lbs", "rating": "10", "rented for": "vacation", "body type": "hourglass",
        "category": "romper", "height": "5' 8\"", "size": 14, "age": "28",
        "review_date": "April 20, 2016",
    }  # fmt: skip
    row = parse_official([record]).iloc[0]
    assert (row["height_in"], row["weight_lbs"], row["bust_size_num"]) == (68, 137, 34)
    assert row["bust_size_letter"] == "d" and str(row["review_date"].date()) == "2016-04-20"


def test_each_party_file_holds_only_its_customers_and_columns(scenario, tmp_path):
    paths = scenario.save(tmp_path)
    platform, partner = PartyTable.load(paths["platform"]), PartyTable.load(paths["partner"])
    assert set(pq.read_schema(paths["platform"]).names) == set(PLATFORM_COLUMNS.all)
    assert set(pq.read_schema(paths["partner"]).names) == set(PARTNER_COLUMNS.all)
    assert "fit" not in partner.frame and "height_in" not in platform.frame
    info = scenario.info
    a_b_c = info["customers_A"] + info["customers_B"] + info["customers_C"]
    assert a_b_c == info["customers"] == 105_571
    only_platform = np.setdiff1d(platform.ids, partner.ids)
    only_partner = np.setdiff1d(partner.ids, platform.ids)
    both = np.intersect1d(platform.ids, partner.ids)
    # A's rentals are absent from the partner's file, C's profiles from the platform's.
    assert len(only_platform) == info["customers_A"] and len(both) == info["customers_B"]
    assert len(only_partner) == info["customers_C"] - info["partner_dropped_without_measurements"]
    assert len(partner.frame) == partner.frame["user_id"].nunique()
    np.testing.assert_array_equal(scenario.aligned_ids(), both)


def test_the_partner_splits_over_two_holders(scenario):
    two = split_features(scenario)
    assert [t.name for t in two.features] == ["body", "profile"]
    assert set(two.features[0].columns.inputs).isdisjoint(two.features[1].columns.inputs)
    np.testing.assert_array_equal(two.aligned_ids(), scenario.aligned_ids())


def test_the_test_rentals_are_the_latest(small):
    scenario, aligned = small
    _, label = parties(scenario, aligned, SMALL)
    times = scenario.label.frame.loc[
        scenario.label.frame["user_id"].isin(aligned), "review_date"
    ].to_numpy()
    assert label.test.sum() == int(np.ceil(0.2 * len(times)))
    assert times[label.test].min() >= times[~label.test].max()


def test_state_round_trips_through_files(small, tmp_path):
    """A holder restarted per message (state saved and loaded) trains exactly as one that lives."""
    scenario, aligned = small
    table = scenario.features[0]
    results = []
    for restart in (False, True):
        holders, label = parties(scenario, aligned, SMALL)
        rebuild = {
            table.name: lambda: FeatureHolder(
                table.frame, table.columns, aligned, SMALL, name=table.name
            )
        }
        transport = LocalTransport(
            holders, tmp_path / str(restart) if restart else None, rebuild if restart else None
        )
        result = train_split(label, transport, SMALL)
        activations = transport.holders[table.name].handle(
            "predict", {"positions": label.request_positions}
        )["activations"]
        results.append((result.metrics["macro_auc"], activations))
    assert results[0][0] == results[1][0]
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_feature_holders_refuse_bad_requests(small):
    scenario, aligned = small
    holders, _ = parties(scenario, aligned, SMALL)
    holder = holders["partner"]
    n = len(aligned)
    with pytest.raises(SplitProtocolError, match="outside the intersection"):
        holder.handle("forward", {"positions": np.array([0, n], dtype=np.int64)})
    with pytest.raises(SplitProtocolError, match="int64"):
        holder.handle("forward", {"positions": np.array([0, 1], dtype=np.int32)})
    with pytest.raises(SplitProtocolError, match="repeated"):
        holder.handle("forward", {"positions": np.array([2, 2], dtype=np.int64)})
    with pytest.raises(SplitProtocolError, match="not numeric"):
        holder.handle("forward", {"positions": np.array(["a"], dtype=object)})
    holder.handle("forward", {"positions": np.arange(5, dtype=np.int64)})
    with pytest.raises(SplitProtocolError, match="not served"):
        gradients = np.zeros((2, SMALL.activation_dim), dtype=np.float32)
        holder.handle("backward", {"positions": np.array([4, 5]), "gradients": gradients})
    with pytest.raises(SplitProtocolError, match="shape"):
        gradients = np.zeros((2, 3), dtype=np.float32)
        holder.handle("backward", {"positions": np.array([3, 4]), "gradients": gradients})
    with pytest.raises(SplitProtocolError, match="aligned"):
        holder.handle("setup", {"n_aligned": np.array(n + 1)})


def test_the_label_holder_refuses_bad_activations(small):
    scenario, aligned = small
    holders, label = parties(scenario, aligned, SMALL)
    requests = label.setup_requests(list(holders))
    label.setup({p: holders[p].handle(kind, m) for p, (kind, m) in requests.items()})
    asked = label.request_positions
    good = holders["partner"].handle("forward", {"positions": asked})
    label.accept({"partner": good})

    def reply(positions, activations):
        return {"partner": {"positions": positions, "activations": activations}}

    rows = good["activations"]
    outside = asked.copy()
    outside[0] = len(aligned)
    with pytest.raises(SplitProtocolError, match="outside the intersection"):
        label.accept(reply(outside, rows))
    unasked = asked.copy()
    unasked[0] = np.setdiff1d(np.arange(len(aligned)), asked)[0] if len(asked) < len(aligned) else 0
    if len(asked) < len(aligned):
        with pytest.raises(SplitProtocolError, match="not requested"):
            label.accept(reply(unasked, rows))
    with pytest.raises(SplitProtocolError, match="not the"):
        label.accept(reply(asked[:-1], rows[:-1]))
    nan = rows.copy()
    nan[3, 1] = np.nan
    with pytest.raises(SplitProtocolError, match="non-finite"):
        label.accept(reply(asked, nan))
    with pytest.raises(SplitProtocolError, match="shape"):
        label.accept(reply(asked, rows[:, :-1]))
    with pytest.raises(SplitProtocolError, match="replies from"):
        label.accept({})


def test_label_protection_defeats_the_norm_attack(small):
    scenario, aligned = small
    found = {}
    for name, plan in {
        "plain": SMALL,
        "protected": replace(SMALL, gradient_clip=0.5, gradient_noise=4.0, noise_seed=1),
    }.items():
        holders, label = parties(scenario, aligned, plan)
        transport = RecordingTransport(LocalTransport(holders))
        train_split(label, transport, plan)
        truth = single_label_customers(
            label.positions[label.train_rows], label.labels[label.train_rows]
        )
        _, _, positions, gradients = transport.gradients[-1]
        found[name] = label_leakage(positions, gradients, truth, label.columns.classes)
    assert found["plain"]["norm_auc_not_fit"] > 0.9
    assert found["protected"]["norm_auc_not_fit"] < 0.65
    assert 0 < label_dp_epsilon(4.0, 3, 1e-5) < label_dp_epsilon(4.0, 40, 1e-5)


def test_joint_training_beats_the_label_holder_alone(rtr):
    """The partner's measurements add to what the platform knows (a test that can fail)."""
    scenario = renttherunway_scenario(subsample(rtr, 40_000, seed=2), seed=2)
    aligned = scenario.aligned_ids()
    plan = Plan(rounds=15, batch_size=1024)
    holders, label = parties(scenario, aligned, plan)
    joint = train_split(label, LocalTransport(holders), plan).metrics["macro_auc"]
    alone = LabelHolder(scenario.label.frame, scenario.label.columns, aligned, plan)
    only = train_split(alone, NoPartners(), plan).metrics["macro_auc"]
    assert joint > only + 0.005, (joint, only)
