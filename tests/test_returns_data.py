"""The return-risk table (`data/returns.py`): the matching rule on a hand-built frame, no leakage from
the test period into training rows, and sanity on the real Online Retail table."""

import numpy as np
import pandas as pd
import pytest

from fedshop.data import online_retail
from fedshop.data.datasets import load_cleaned_retail as load_cleaned
from fedshop.data.returns import (
    CATEGORICAL,
    NUMERIC,
    ReturnsSettings,
    build_returns_dataset,
    label_lines,
    match_returns,
    silo_features,
)

DAY0 = pd.Timestamp("2011-01-03 10:00")


def frame(rows):
    """Lines (invoice, code, quantity, day, price, customer) as a cleaned Online Retail table."""
    out = pd.DataFrame(
        rows, columns=["InvoiceNo", "StockCode", "Quantity", "day", "UnitPrice", "CustomerID"]
    )
    out["InvoiceDate"] = DAY0 + pd.to_timedelta(out.pop("day"), unit="D")
    out["Description"] = "item " + out["StockCode"]
    out["Country"] = "United Kingdom"
    out["Quantity"] = out["Quantity"].astype("int64")
    out["CustomerID"] = out["CustomerID"].astype("int64")
    return out[list(online_retail.COLUMNS)]


PURCHASES = frame(
    [
        ("1", "A", 10, 1, 1.0, 1),  # 0
        ("2", "A", 5, 5, 1.0, 1),  # 1
        ("3", "B", 2, 1, 2.0, 2),  # 2
        ("4", "B", 2, 2, 1.5, 2),  # 3
        ("5", "D", 1, 2, 3.0, 4),  # 4: bought after its cancellation
    ]
)
RETURNS = frame(
    [
        ("C1", "A", -3, 6, 1.0, 1),  # most recent line (1); line 0 could hold it too: ambiguous
        ("C2", "A", -4, 7, 1.0, 1),  # 2 left on line 1, then 2 from line 0: spans lines
        ("C3", "B", -1, 3, 2.0, 2),  # the same price first: line 2, not the more recent line 3
        ("C4", "C", -1, 3, 1.0, 2),  # never bought C: unmatched
        ("C5", "A", -1, 2, 1.0, 3),  # customer 3 never bought anything: unmatched
        ("C6", "B", -5, 4, 2.0, 2),  # 1 left at 2.0, 2 at 1.5, 2 units too many: partly matched
        ("C7", "B", -1, 5, 2.0, 2),  # everything already returned
        ("C8", "D", -1, 1, 3.0, 4),  # before the purchase: unmatched
    ]
)


def test_matching_rule_on_a_hand_built_frame():
    matching = match_returns(PURCHASES, RETURNS)
    assert matching.returned_units.tolist() == [2, 5, 2, 2, 0]
    first = matching.first_return
    assert first[0] == DAY0 + pd.Timedelta(days=7)  # line 0 first touched by C2
    assert first[1] == DAY0 + pd.Timedelta(days=6)
    assert first[2] == DAY0 + pd.Timedelta(days=3)  # C3 took the same-price line
    assert first[3] == DAY0 + pd.Timedelta(days=4)
    assert pd.isna(first[4])
    assert matching.outcome.tolist() == [
        "matched", "matched", "matched", "no_earlier_purchase", "no_earlier_purchase",
        "partly_matched", "nothing_left", "no_earlier_purchase",
    ]  # fmt: skip
    counts = matching.counts
    assert counts["cancellation_lines"] == 8
    assert (counts["matched"], counts["partly_matched"]) == (3, 1)
    assert (counts["no_earlier_purchase"], counts["nothing_left"]) == (3, 1)
    assert counts["customer_never_seen_before"] == 2  # customers 3 and 4 (C8 precedes its buy)
    assert counts["ambiguous_most_recent_taken"] == 1  # C1
    assert counts["spanning_several_lines"] == 2  # C2, C6
    assert counts["matched_at_other_price"] == 1  # C6
    assert counts["units_cancelled"] == 17
    assert counts["units_matched"] == 3 + 4 + 1 + 3
    assert counts["lines_with_a_return"] == 4


def test_labels_count_returns_within_the_horizon_only():
    matching = match_returns(PURCHASES, RETURNS)
    settings = ReturnsSettings(split_date="2011-03-01", label_horizon_days=3)
    lines = label_lines(PURCHASES, matching, settings)
    # Line 0 was first returned 6 days after purchase: past the 3-day horizon.
    assert lines["returned"].tolist() == [False, True, True, True, False]
    assert lines["known_at"][0] == lines["InvoiceDate"][0] + pd.Timedelta(days=3)
    assert lines["known_at"][1] == DAY0 + pd.Timedelta(days=6)  # known when it was returned
    assert (lines["period"] == "train").all()
    wide = label_lines(PURCHASES, matching, ReturnsSettings("2011-03-01", 30))
    assert wide["returned"].tolist() == [True, True, True, True, False]


@pytest.fixture(scope="module")
def cleaned():
    return load_cleaned()


@pytest.fixture(scope="module")
def dataset(cleaned):
    return build_returns_dataset(cleaned)


def test_no_leakage_from_the_test_period(cleaned, dataset):
    """Changing, dropping or adding test-period rows (purchases and cancellations) changes no
    training row's features or label, and no silo."""
    split = ReturnsSettings().split
    purchases = cleaned.purchases.copy()
    later = purchases["InvoiceDate"] >= split
    purchases.loc[later, "Quantity"] *= 3
    purchases.loc[later & (purchases.index % 7 == 0), "StockCode"] = "NEW-CODE"
    purchases = purchases.drop(purchases.index[later & (purchases.index % 5 == 0)])
    # A test-period cancellation of a training-period purchase, and one of a test-period purchase.
    old = cleaned.purchases[~later].iloc[100]
    new = cleaned.purchases[later].iloc[100]
    extra = pd.DataFrame([old, new]).assign(
        InvoiceNo=["C999998", "C999999"], Quantity=[-1, -1], InvoiceDate=[split, split]
    )
    returns = pd.concat([cleaned.returns[cleaned.returns["InvoiceDate"] < split], extra])
    changed = online_retail.CleanedRetail(
        purchases.reset_index(drop=True), returns.reset_index(drop=True), {}, "changed"
    )
    other = build_returns_dataset(changed)
    assert other.silo_names == dataset.silo_names
    assert other.cardinalities == dataset.cardinalities
    for mine, theirs in zip(dataset.silos, other.silos, strict=True):
        np.testing.assert_array_equal(mine.train.categorical, theirs.train.categorical)
        np.testing.assert_array_equal(mine.train.numeric, theirs.train.numeric)
        np.testing.assert_array_equal(mine.train.target, theirs.train.target)
    # The change did reach the test rows (the check above is not vacuous).
    assert other.report["rows"]["test"] < dataset.report["rows"]["test"]


def test_real_data_sanity(dataset):
    report = dataset.report
    matching = report["matching"]
    outcomes = ("matched", "partly_matched", "nothing_left", "no_earlier_purchase")
    assert sum(matching[k] for k in outcomes) == matching["cancellation_lines"] == 8539
    assert matching["matched"] / matching["cancellation_lines"] > 0.85
    assert 0.05 < matching["no_earlier_purchase"] / matching["cancellation_lines"] < 0.2
    assert 0.01 < report["return_rate"]["train"] < 0.03
    assert 0.01 < report["return_rate"]["test"] < 0.03
    assert report["rows"]["train"] == sum(len(s.train) for s in dataset.silos) > 150_000
    assert report["rows"]["test"] == sum(len(s.test) for s in dataset.silos) > 80_000
    assert dataset.silo_names[0] == "United Kingdom" and dataset.n_silos >= 8
    assert "Rest of world" in dataset.silo_names
    assert report["train_window"][1] < "2011-08-02" and report["test_window"][0] >= "2011-09-01"
    assert dataset.kind == "binary"
    assert dataset.categorical_names == CATEGORICAL and dataset.numeric_names == NUMERIC
    pooled = dataset.pooled("train")
    assert set(np.unique(pooled.target)) == {0.0, 1.0}
    # Rates are rates; a new customer has no history.
    rate = pooled.numeric[:, NUMERIC.index("customer_prior_return_rate")]
    assert rate.min() >= 0 and rate.max() <= 1
    new = pooled.numeric[:, NUMERIC.index("new_customer")] == 1
    assert (pooled.numeric[new, NUMERIC.index("log_customer_prior_orders")] == 0).all()
    # Test rows may hold stock codes unseen in training: code 0.
    assert (dataset.pooled("test").categorical[:, 0] == 0).any()
    assert (pooled.categorical[:, 0] > 0).all()


def test_features_use_only_what_was_known_at_purchase_time():
    """A past line's return counts in the customer's and item's rates only from when it was known:
    its return time, or purchase time + horizon when it was not returned in time."""
    purchases = frame(
        [
            ("1", "A", 1, 0, 1.0, 7),  # returned on day 10
            ("2", "B", 1, 5, 1.0, 7),  # never returned: known on day 35
            ("3", "C", 1, 12, 1.0, 7),
            ("4", "C", 1, 40, 1.0, 7),
            ("5", "A", 1, 11, 1.0, 8),  # another customer, same item as line 0
        ]
    )
    returns = frame([("C1", "A", -1, 10, 1.0, 7)])
    lines = label_lines(
        purchases, match_returns(purchases, returns), ReturnsSettings("2011-06-01", 30)
    )
    features = silo_features(lines, returns)
    rate = features["customer_prior_return_rate"].tolist()
    known = np.expm1(features["log_customer_known_lines"]).round().tolist()
    prior = np.expm1(features["log_customer_prior_lines"]).round().tolist()
    assert prior[:4] == [0, 1, 2, 3]
    assert known[:4] == [0, 0, 1, 2]  # day 5: nothing known; day 12: line 0; day 40: lines 0, 1
    assert rate[:4] == [0.0, 0.0, 1.0, 0.5]
    assert np.expm1(features["log_customer_prior_cancellations"]).round().tolist()[:4] == [
        0,
        0,
        1,
        1,
    ]
    # The item's rate in the silo: customer 8's line of A on day 11 sees line 0's return (day 10).
    assert features["item_prior_return_rate"].iloc[4] == 1.0
    assert features["new_customer"].tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert np.expm1(features["log_customer_item_prior_lines"]).round().tolist() == [0, 0, 0, 1, 0]
