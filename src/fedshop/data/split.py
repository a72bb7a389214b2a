"""Temporal per-customer split: a customer's last purchase day is their test basket.

Rules (each counted in the data report):
- A customer is evaluated only if at least `min_train_days` distinct purchase days remain for training
  after the held-out day(s); everyone else keeps all their purchases in training and is not evaluated.
- With `validation`, the second-to-last purchase day is held out as validation.
- Held-out items the customer already bought in training (repeat purchases) are removed from the held-out
  basket: full-ranking evaluation excludes training items, so they could never be hit.
- Held-out items that nobody bought in training are removed: no model can score an item it never saw.
- A customer whose test basket is empty after these removals is not evaluated.
No test item of a customer ever appears in that customer's training set.

`leave_last_out` is the leave-one-out variant for datasets without purchase days (MovieLens, Amazon):
the held-out unit is a user's last interaction instead of their last day, with the same cleaning rules.
`leave_random_out` holds out a uniformly random interaction per user instead (data.leave_out =
"random", or data without timestamps), seeded, with the same eligibility and cleaning rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class SplitPairs:
    train: pd.DataFrame  # unique (user, item)
    test: pd.DataFrame  # unique (user, item), disjoint from train per user
    validation: pd.DataFrame | None
    counts: dict[str, int]


def temporal_split(
    events: pd.DataFrame, min_train_days: int = 1, validation: bool = False
) -> SplitPairs:
    """Split `events` (columns user, item, day) by each user's most recent purchase days."""
    if min_train_days < 1:
        raise ValueError("min_train_days must be at least 1")
    held_days = 2 if validation else 1
    days = events[["user", "day"]].drop_duplicates()
    # 0 = the user's last purchase day, 1 = the one before, ...
    days = days.assign(back=days.groupby("user")["day"].rank(method="dense", ascending=False) - 1)
    n_days = days.groupby("user")["day"].size()
    eligible_users = n_days.index[n_days >= held_days + min_train_days]

    events = events.merge(days, on=["user", "day"], how="left")
    eligible = events["user"].isin(eligible_users)
    held = eligible & (events["back"] < held_days)

    train = events.loc[~held, ["user", "item"]].drop_duplicates()
    counts = {
        "users": int(n_days.size),
        "users_too_little_history": int(n_days.size - len(eligible_users)),
    }
    return _assemble(
        train,
        events.loc[held & (events["back"] == 0)],
        events.loc[held & (events["back"] == 1)] if validation else None,
        counts,
    )


def _assemble(
    train: pd.DataFrame,
    test_events: pd.DataFrame,
    validation_events: pd.DataFrame | None,
    counts: dict[str, int],
) -> SplitPairs:
    """Clean the held-out events against the training pairs and count what each rule removed."""
    test = _held_out(test_events, train, counts, "test")
    valid = None
    if validation_events is not None:
        valid = _held_out(validation_events, train, counts, "validation")
        # A test item already held out for validation is a repeat as far as the model is concerned.
        before = len(test)
        test = test.merge(valid, on=["user", "item"], how="left", indicator=True)
        test = test.loc[test["_merge"] == "left_only", ["user", "item"]]
        counts["test_repeat_of_validation_removed"] = before - len(test)
    counts["train_pairs"] = len(train)
    counts["test_pairs"] = len(test)
    counts["test_users"] = int(test["user"].nunique())
    if valid is not None:
        counts["validation_pairs"] = len(valid)
        counts["validation_users"] = int(valid["user"].nunique())
    return SplitPairs(
        train=train.reset_index(drop=True),
        test=test.reset_index(drop=True),
        validation=None if valid is None else valid.reset_index(drop=True),
        counts=counts,
    )


def _held_out(
    held: pd.DataFrame, train: pd.DataFrame, counts: dict[str, int], label: str
) -> pd.DataFrame:
    pairs = held[["user", "item"]].drop_duplicates()
    users_before = pairs["user"].nunique()
    marked = pairs.merge(train, on=["user", "item"], how="left", indicator=True)
    repeat = (marked["_merge"] == "both").to_numpy()
    counts[f"{label}_repeat_items_removed"] = int(repeat.sum())
    pairs = marked.loc[~repeat, ["user", "item"]]
    known = pairs["item"].isin(np.unique(train["item"].to_numpy()))
    counts[f"{label}_items_unseen_in_training_removed"] = int((~known).sum())
    pairs = pairs[known]
    counts[f"{label}_users_empty_basket"] = int(users_before - pairs["user"].nunique())
    return pairs


def leave_last_out(events: pd.DataFrame, validation: bool = False) -> SplitPairs:
    """Leave-one-out split of `events` (columns user, item, order; higher order = later).

    Each user's last interaction is their test item and, with `validation`, the one before is their
    validation item. Equal `order` values keep the row order of `events` (the later row is later).
    A user is evaluated only if at least one interaction remains for training after the held-out
    one(s); everyone else keeps everything in training. Held-out items are then cleaned by the same
    rules as `temporal_split`: repeats of the user's training items and items nobody has in training
    are removed, and a user whose held-out item is removed is not evaluated.
    """
    held_count = 2 if validation else 1
    # np.lexsort is stable and sorts by the last key first: user, then order, then row position.
    rows = np.lexsort(
        (np.arange(len(events)), events["order"].to_numpy(), events["user"].to_numpy())
    )
    ordered = events.iloc[rows][["user", "item"]].reset_index(drop=True)
    back = ordered.groupby("user").cumcount(ascending=False).to_numpy()  # 0 = the user's last
    n_events = ordered.groupby("user").size()
    eligible_users = n_events.index[n_events >= held_count + 1]
    held = ordered["user"].isin(eligible_users).to_numpy() & (back < held_count)

    train = ordered.loc[~held, ["user", "item"]].drop_duplicates()
    counts = {
        "users": int(n_events.size),
        "interactions": len(events),
        "users_too_little_history": int(n_events.size - len(eligible_users)),
    }
    return _assemble(
        train,
        ordered.loc[held & (back == 0)],
        ordered.loc[held & (back == 1)] if validation else None,
        counts,
    )


def leave_random_out(events: pd.DataFrame, seed: int, validation: bool = False) -> SplitPairs:
    """Leave-one-out split of `events` (columns user, item) with random held-out interactions.

    Each user's test item is one of their interactions drawn uniformly at random and, with
    `validation`, the validation item is a second one drawn from the rest; `seed` fixes the draw
    (derive it from the run seed). An `order` column, if any, is ignored. Everything else follows
    `leave_last_out`: a random permutation of the rows is used as the order.
    """
    order = np.random.default_rng(seed).permutation(len(events))
    return leave_last_out(events[["user", "item"]].assign(order=order), validation)
