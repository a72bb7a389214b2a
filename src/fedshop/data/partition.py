"""Assign every customer to exactly one silo (a country's storefront)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

REST_OF_WORLD = "Rest of world"


@dataclass(frozen=True)
class SiloAssignment:
    names: tuple[str, ...]
    user_silo: np.ndarray  # silo index for each user, aligned with the `users` passed in
    merged_countries: tuple[str, ...]  # countries folded into REST_OF_WORLD


def home_country(
    lines: pd.DataFrame, user_col: str = "user", country_col: str = "Country"
) -> pd.Series:
    """Each customer's country: where most of their invoice lines were placed.

    A handful of customers appear under two countries; ties go to the alphabetically first country so
    the assignment never depends on row order.
    """
    counts = lines.groupby([user_col, country_col], observed=True).size().rename("n").reset_index()
    counts = counts.sort_values([user_col, "n", country_col], ascending=[True, False, True])
    return counts.drop_duplicates(user_col).set_index(user_col)[country_col]


def assign_silos(user_country: pd.Series, min_customers: int, max_silos: int = 0) -> SiloAssignment:
    """One silo per country; countries with fewer than `min_customers` customers merge into one
    "Rest of world" silo, and so do all but the `max_silos` − 1 largest when `max_silos` > 0 and
    there are more. Silos are ordered by size (largest first), then name."""
    sizes = user_country.value_counts()
    small = sorted(sizes[sizes < min_customers].index) if min_customers > 0 else []
    kept = sorted(set(sizes.index) - set(small), key=lambda name: (-sizes[name], name))
    if 0 < max_silos < len(kept) + (1 if small else 0):
        small = sorted(set(small) | set(kept[max_silos - 1 :]))
    silo_of = user_country.where(~user_country.isin(small), REST_OF_WORLD)
    silo_sizes = silo_of.value_counts()
    names = sorted(silo_sizes.index, key=lambda name: (-silo_sizes[name], name))
    index = {name: i for i, name in enumerate(names)}
    return SiloAssignment(
        names=tuple(names),
        user_silo=silo_of.map(index).to_numpy(dtype=np.int64),
        merged_countries=tuple(small),
    )


def slug(name: str) -> str:
    """A silo name as it appears in file names and URLs ("United Kingdom" → "united-kingdom")."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
