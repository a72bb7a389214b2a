import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from fedshop.data.split import temporal_split


def events(rows):
    frame = pd.DataFrame(rows, columns=["user", "item", "day"])
    frame["day"] = pd.to_datetime(frame["day"])
    return frame


def pairs(frame):
    return set(map(tuple, frame[["user", "item"]].to_numpy().tolist()))


def test_last_day_is_the_test_basket():
    split = temporal_split(
        events(
            [
                (0, 10, "2011-01-01"),
                (0, 11, "2011-01-01"),
                (0, 12, "2011-02-01"),
                (0, 10, "2011-02-01"),  # 10 is a repeat: removed
                (1, 10, "2011-01-05"),
                (1, 12, "2011-01-05"),  # one day only: train only
                (2, 11, "2011-01-03"),
                (2, 13, "2011-03-01"),  # 13 never in training: removed
            ]
        )
    )
    assert pairs(split.test) == {(0, 12)}
    assert pairs(split.train) == {(0, 10), (0, 11), (1, 10), (1, 12), (2, 11)}
    assert split.counts["users_too_little_history"] == 1
    assert split.counts["test_repeat_items_removed"] == 1
    assert split.counts["test_items_unseen_in_training_removed"] == 1
    assert split.counts["test_users_empty_basket"] == 1  # user 2
    assert split.counts["test_users"] == 1


def test_validation_is_the_day_before_and_needs_more_history():
    split = temporal_split(
        events(
            [
                (0, 1, "2011-01-01"),
                (0, 2, "2011-01-02"),
                (0, 3, "2011-01-03"),
                (1, 1, "2011-01-01"),
                (1, 2, "2011-01-02"),
                (1, 3, "2011-01-02"),
                (1, 4, "2011-01-03"),
                (1, 5, "2011-01-04"),  # 5: only in test, never trained
                (2, 3, "2011-01-01"),
                (2, 4, "2011-01-02"),
            ]
        ),
        validation=True,
    )
    assert pairs(split.validation) == {(0, 2), (1, 4)}
    # user 2 has two days: not enough for train + validation + test, so it trains only
    assert (2, 3) in pairs(split.train) and (2, 4) in pairs(split.train)
    assert pairs(split.test) == {(0, 3)}


def test_min_train_days():
    split = temporal_split(
        events(
            [
                (0, 1, "2011-01-01"),
                (0, 2, "2011-01-02"),
                (1, 1, "2011-01-01"),
                (1, 3, "2011-01-02"),
                (1, 2, "2011-01-03"),
            ]
        ),
        min_train_days=2,
    )
    assert set(split.test["user"]) == {1}


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 8), st.integers(0, 15), st.integers(0, 6)), min_size=1, max_size=80
    ),
    st.booleans(),
)
def test_no_test_item_is_in_that_customers_training(rows, validation):
    frame = events([(u, i, f"2011-01-0{d + 1}") for u, i, d in rows])
    split = temporal_split(frame, validation=validation)
    train = pairs(split.train)
    assert not (pairs(split.test) & train)
    if validation:
        assert not (pairs(split.validation) & train)
        assert not (pairs(split.validation) & pairs(split.test))
    # Every customer keeps something in training, and test items are all items someone trained on.
    assert set(split.train["user"]) == set(frame["user"])
    assert set(split.test["item"]) <= set(split.train["item"])
    # Test items come from the customer's own last purchase day.
    last_day = frame.groupby("user")["day"].max()
    for user, item in pairs(split.test):
        bought = frame[(frame["user"] == user) & (frame["item"] == item)]["day"]
        assert (bought == last_day[user]).any()


def test_real_split_has_no_leakage(retail):
    overlap = retail.train.multiply(retail.test)
    assert overlap.nnz == 0
    evaluated = np.diff(retail.test.indptr) > 0
    assert evaluated.sum() == retail.report["split"]["test_users"] > 2000
