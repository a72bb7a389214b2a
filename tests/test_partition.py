import numpy as np
import pandas as pd

from fedshop.data.partition import REST_OF_WORLD, assign_silos, home_country


def test_home_country_by_most_lines_with_alphabetical_ties():
    lines = pd.DataFrame(
        {
            "user": [1, 1, 1, 2, 2, 3],
            "Country": ["France", "France", "Germany", "Spain", "Austria", "Japan"],
        }
    )
    country = home_country(lines)
    assert country.to_dict() == {1: "France", 2: "Austria", 3: "Japan"}


def test_small_countries_merge_into_rest_of_world():
    user_country = pd.Series(["UK"] * 5 + ["France"] * 3 + ["Japan"] + ["Chile"], index=range(10))
    silos = assign_silos(user_country, min_customers=3)
    assert silos.names == ("UK", "France", REST_OF_WORLD)
    assert silos.merged_countries == ("Chile", "Japan")
    assert list(silos.user_silo) == [0] * 5 + [1] * 3 + [2, 2]


def test_no_merging_with_threshold_zero():
    user_country = pd.Series(["A", "B", "B"])
    assert assign_silos(user_country, 0).names == ("B", "A")


def test_every_real_customer_in_exactly_one_silo(retail):
    assert len(retail.user_silo) == retail.n_users
    assert set(np.unique(retail.user_silo)) == set(range(retail.n_silos))
    silo_users = [set(retail.silo(i).users) for i in range(retail.n_silos)]
    assert sum(len(s) for s in silo_users) == retail.n_users
    assert set().union(*silo_users) == set(range(retail.n_users))
    assert retail.silo_names[0] == "United Kingdom"
    assert REST_OF_WORLD in retail.silo_names
    sizes = {row["silo"]: row["customers"] for row in retail.report["silos"]}
    assert all(size >= 10 for name, size in sizes.items() if name != REST_OF_WORLD)


def test_max_silos_merges_all_but_the_largest_countries():
    country = pd.Series(["UK"] * 5 + ["FR"] * 4 + ["DE"] * 3 + ["ES"] * 2 + ["IT"])
    three = assign_silos(country, min_customers=2, max_silos=3)
    assert three.names == (REST_OF_WORLD, "UK", "FR")  # largest first, as always
    assert three.merged_countries == ("DE", "ES", "IT")
    assert np.bincount(three.user_silo).tolist() == [6, 5, 4]
    # A limit at or above the natural count changes nothing.
    same, natural = assign_silos(country, 2, max_silos=5), assign_silos(country, 2)
    assert same.names == natural.names and (same.user_silo == natural.user_silo).all()
