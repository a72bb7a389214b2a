"""New shoppers for the cold-start evaluation: customers held out of training entirely.

Rules (each counted in the data report's "cold_start" block):
- Eligible: customers with at least two distinct purchase days.
- In every storefront (silo), ceil(fraction × its eligible customers) of them are drawn with the run
  seed (a stream per storefront name), so every storefront has new shoppers; a storefront never
  loses its last customer to the cohort. Their purchase lines are removed before the split: they
  are in no training, validation or test matrix and have no user index.
- Basket: the items of their first purchase day. Target: the items of their next purchase day.
- Items outside the training catalogue are removed from both (no model can score them); target
  items already in the basket are removed (the basket is excluded from the ranking, so they could
  never be hit). Customers left with an empty basket or target are not evaluated.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from fedshop.data.interactions import ColdCohort, pairs_to_csr
from fedshop.seeding import derive_seed

RULE = (
    "customers held out of training entirely (ceil(fraction × eligible) per storefront, drawn with "
    "the run seed; eligible: at least two purchase days): their first purchase day is the basket, "
    "their next purchase day the target; items outside the training catalogue are removed from "
    "both, target items already in the basket are removed, and customers left with an empty basket "
    "or target are not evaluated"
)


def draw_cohort(
    days_per_user: np.ndarray,
    user_silo: np.ndarray,
    silo_names: tuple[str, ...],
    fraction: float,
    seed: int,
) -> np.ndarray:
    """The users (sorted indices) held out as new shoppers; `days_per_user[u]` is user u's number of
    distinct purchase days and `user_silo[u]` their silo."""
    chosen = []
    for index, name in enumerate(silo_names):
        members = np.flatnonzero(user_silo == index)
        eligible = members[days_per_user[members] >= 2]
        count = min(math.ceil(fraction * len(eligible)), len(members) - 1)
        if count > 0:
            rng = np.random.default_rng(derive_seed(seed, "cold-start", name))
            chosen.append(rng.choice(eligible, size=count, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def build_cohort(
    events: pd.DataFrame,
    cohort: np.ndarray,
    user_ids: np.ndarray,
    user_silo: np.ndarray,
    catalogue: np.ndarray,
) -> tuple[ColdCohort, dict[str, int]]:
    """Baskets and targets of the `cohort` users from their `events` (user, item, day; codes as in
    `user_ids` and before the catalogue re-index) on the training `catalogue` (sorted item codes;
    position = item index). Returns the cohort and the counts of what each rule removed."""
    mine = events[events["user"].isin(cohort)][["user", "item", "day"]].drop_duplicates()
    rank = mine.groupby("user")["day"].rank(method="dense").astype(int)  # 1 = first purchase day
    basket = mine.loc[rank == 1, ["user", "item"]].drop_duplicates()
    target = mine.loc[rank == 2, ["user", "item"]].drop_duplicates()
    counts = {"held_out": len(cohort)}

    def on_catalogue(pairs: pd.DataFrame, label: str) -> pd.DataFrame:
        known = pairs["item"].isin(catalogue)
        counts[f"{label}_items_outside_catalogue_removed"] = int((~known).sum())
        return pairs[known]

    basket = on_catalogue(basket, "basket")
    target = on_catalogue(target, "target")
    repeat = target.merge(basket, on=["user", "item"], how="left", indicator=True)["_merge"]
    counts["target_items_in_basket_removed"] = int((repeat == "both").sum())
    target = target[(repeat == "left_only").to_numpy()]

    with_basket = set(basket["user"].unique())
    with_target = set(target["user"].unique())
    counts["empty_basket_skipped"] = int(sum(u not in with_basket for u in cohort))
    counts["empty_target_skipped"] = int(
        sum(u in with_basket and u not in with_target for u in cohort)
    )
    evaluated = np.array(sorted(with_basket & with_target), dtype=np.int64)
    counts["evaluated"] = len(evaluated)

    row_of = pd.Series(np.arange(len(evaluated)), index=evaluated)
    item_of = pd.Series(np.arange(len(catalogue)), index=catalogue)

    def matrix(pairs: pd.DataFrame):
        pairs = pairs[pairs["user"].isin(evaluated)]
        rows = pd.DataFrame(
            {
                "user": row_of[pairs["user"]].to_numpy(),
                "item": item_of[pairs["item"]].to_numpy(),
            }
        )
        return pairs_to_csr(rows, len(evaluated), len(catalogue))

    cold = ColdCohort(
        customer_ids=np.asarray(user_ids)[evaluated],
        silo=np.asarray(user_silo, dtype=np.int64)[evaluated],
        basket=matrix(basket),
        target=matrix(target),
        held_out_ids=np.asarray(user_ids)[cohort],
    )
    return cold, counts
