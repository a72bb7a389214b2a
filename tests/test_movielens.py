"""MovieLens-1M and -100K: the release files, the leave-one-out split (data.leave_out) and the
ZIP-zone silos; the random leave-out on the other leave-one-out datasets (Amazon)."""

import zipfile

import numpy as np
import pandas as pd
import pytest

from fedshop.config import DataConfig, load_config
from fedshop.data.datasets import load_dataset
from fedshop.data.split import leave_last_out, leave_random_out
from fedshop.errors import ConfigError, DataError

ML1M_USERS = 6040
ML1M_RATED_MOVIES = 3706
ML1M_RATINGS = 1_000_209
ML100K_USERS = 943
ML100K_ITEMS = 1682
ML100K_RATINGS = 100_000


def movielens_config(data_dir, **overrides):
    return DataConfig(dataset="movielens-1m", data_dir=str(data_dir), **overrides)


@pytest.fixture(scope="session")
def ml1m(data_dir):
    # The shared copy has ratings_no_timestamp.csv, not ratings.dat: the split is random, seeded.
    return load_dataset(movielens_config(data_dir), seed=7)


@pytest.fixture(scope="session")
def ml1m_users(data_dir):
    return pd.read_csv(
        data_dir / "movielens-1m" / "users.dat",
        sep="::",
        engine="python",
        header=None,
        names=["UserID", "Gender", "Age", "Occupation", "Zip"],
        dtype={"Zip": str},
    )


def test_official_counts(ml1m):
    cleaning = ml1m.report["cleaning"]
    assert cleaning["users"] == ML1M_USERS
    assert cleaning["movies_rated"] == ML1M_RATED_MOVIES
    assert cleaning["ratings"] == ML1M_RATINGS
    assert ml1m.n_users == ML1M_USERS
    assert list(ml1m.user_ids) == list(range(1, ML1M_USERS + 1))
    split = ml1m.report["split"]
    # Every rating is an interaction and ML-1M has no repeated (user, movie) pair, so each rating is
    # either a training pair, a test pair or a test item dropped as unseen in training.
    removed = split["test_items_unseen_in_training_removed"]
    assert split["train_pairs"] + split["test_pairs"] + removed == ML1M_RATINGS
    assert ml1m.train.nnz == split["train_pairs"]
    assert ml1m.report["catalogue_items"] == ml1m.n_items <= ML1M_RATED_MOVIES


def test_exactly_one_test_item_per_user_never_in_training(ml1m):
    per_user = np.diff(ml1m.test.indptr)
    assert set(per_user) <= {0, 1}
    split = ml1m.report["split"]
    assert int(per_user.sum()) == split["test_users"]
    assert split["test_users"] + split["test_users_empty_basket"] == ML1M_USERS
    assert split["test_users"] >= ML1M_USERS - 10  # only a movie rated once can drop a user
    assert ml1m.test.multiply(ml1m.train).nnz == 0


def test_without_timestamps_the_split_is_random_and_says_so(ml1m):
    assert ml1m.report["ratings_file"] == "ratings_no_timestamp.csv"
    rule = ml1m.report["split_rule"]
    assert "no timestamps" in rule and "random" in rule and "seed" in rule
    assert "date_range" not in ml1m.report


def test_random_leave_one_out_is_reproducible_and_changes_with_the_seed(ml1m, data_dir):
    again = load_dataset(movielens_config(data_dir), seed=7)
    assert (again.test != ml1m.test).nnz == 0
    assert (again.train != ml1m.train).nnz == 0
    other = load_dataset(movielens_config(data_dir), seed=8)

    # The catalogue can differ by a movie or two, so compare (user, MovieID) pairs.
    def pairs(dataset):
        rows, cols = dataset.test.nonzero()
        return set(zip(rows.tolist(), dataset.item_ids[cols].tolist(), strict=True))

    overlap = len(pairs(ml1m) & pairs(other)) / ML1M_USERS
    assert overlap < 0.2  # users have 165 ratings on average: a new draw rarely repeats the item


def test_zip_zone_silos_add_up_to_every_user(ml1m, ml1m_users):
    silos = ml1m.report["silos"]
    assert sum(s["customers"] for s in silos) == ML1M_USERS
    assert sum(s["train_interactions"] for s in silos) == ml1m.train.nnz
    assert sum(s["test_customers"] for s in silos) == ml1m.report["split"]["test_users"]
    assert ml1m.n_silos == 10  # every zone has more than min_silo_customers users
    assert set(ml1m.silo_names) == {f"ZIP zone {d}" for d in range(10)}
    zone_of_user = dict(zip(ml1m_users["UserID"], ml1m_users["Zip"].str[0], strict=True))
    for user, silo in zip(ml1m.user_ids, ml1m.user_silo, strict=True):
        assert ml1m.silo_names[silo] == f"ZIP zone {zone_of_user[user]}"
    sizes = [s["customers"] for s in silos]
    assert sizes == sorted(sizes, reverse=True)  # largest first, as the country silos


def test_items_are_movie_ids_named_by_title(ml1m):
    toy_story = int(np.flatnonzero(ml1m.item_ids == 1)[0])
    assert ml1m.item_names[toy_story] == "Toy Story (1995)"
    assert all(isinstance(name, str) and name for name in ml1m.item_names)


# --- the official ratings.dat format, on small files -------------------------------------------

RATINGS_DAT = (
    "1::10::5::978300760\n"
    "1::20::3::978300900\n"
    "1::30::4::978300100\n"
    "2::10::4::978000000\n"
    "2::30::2::978000500\n"
    "2::20::5::978000500\n"  # same time as the line before: the later line counts as later
    "3::30::1::978000000\n"
    "3::20::4::977000000\n"
    "3::10::5::978000100\n"
    "3::40::2::978000200\n"
)
USERS_DAT = "1::F::1::10::48067\n2::M::56::16::02460\n3::M::25::15::K1A 0B1\n"
MOVIES_DAT = (
    "10::Misérables, Les (1995)::Drama|Musical\n"
    "20::Star Wars: Episode IV - A New Hope (1977)::Action|Sci-Fi\n"
    "30::Amélie (2001)::Comedy|Romance\n"
    "40::Toy Story (1995)::Animation\n"
)


def write_release(folder, ratings=RATINGS_DAT, users=USERS_DAT, movies=MOVIES_DAT):
    folder.mkdir(parents=True, exist_ok=True)
    if ratings is not None:
        (folder / "ratings.dat").write_text(ratings, encoding="latin-1")
    if users is not None:
        (folder / "users.dat").write_text(users, encoding="latin-1")
    if movies is not None:
        (folder / "movies.dat").write_text(movies, encoding="latin-1")
    return folder


def heldout_items(dataset, user_index, matrix="test"):
    row = getattr(dataset, matrix)[user_index]
    return sorted(dataset.item_ids[row.indices].tolist())


def test_ratings_dat_most_recent_rating_is_the_test_item(tmp_path):
    folder = write_release(tmp_path / "ml-1m")
    dataset = load_dataset(DataConfig(dataset="movielens-1m", path=str(folder)))
    assert list(dataset.user_ids) == [1, 2, 3]
    assert heldout_items(dataset, 0) == [20]  # the latest timestamp, not the last line
    assert heldout_items(dataset, 1) == [20]  # tie at 978000500: file order decides
    assert heldout_items(dataset, 2) == []  # movie 40 is rated by nobody else: removed
    report = dataset.report
    assert report["ratings_file"] == "ratings.dat"
    assert "timestamp" in report["split_rule"] and "random" not in report["split_rule"]
    assert report["split"]["test_items_unseen_in_training_removed"] == 1
    assert report["date_range"] == ["2000-12-16 20:53:20", "2000-12-31 22:15:00"]
    names = dict(zip(dataset.item_ids.tolist(), dataset.item_names.tolist(), strict=True))
    assert names[10] == "Misérables, Les (1995)"
    assert names[30] == "Amélie (2001)"
    assert names[20] == "Star Wars: Episode IV - A New Hope (1977)"


def test_ratings_dat_validation_item_is_the_one_before(tmp_path):
    folder = write_release(tmp_path / "ml-1m")
    dataset = load_dataset(DataConfig(dataset="movielens-1m", path=str(folder), validation=True))
    assert heldout_items(dataset, 0) == [20]
    assert heldout_items(dataset, 0, "validation") == [10]
    assert heldout_items(dataset, 0, "train") == [30]


def test_small_zones_and_foreign_zip_codes_form_the_other_silo(tmp_path):
    folder = write_release(tmp_path / "ml-1m")
    dataset = load_dataset(
        DataConfig(dataset="movielens-1m", path=str(folder), min_silo_customers=2)
    )
    # Zones 4 and 0 have one user each (merged), user 3's Canadian code has no US zone.
    assert dataset.silo_names == ("Other",)
    assert dataset.report["merged_into_other"] == ["ZIP zone 0", "ZIP zone 4"]
    unmerged = load_dataset(
        DataConfig(dataset="movielens-1m", path=str(folder), min_silo_customers=0)
    )
    assert unmerged.silo_names == ("Other", "ZIP zone 0", "ZIP zone 4")  # size, then name


def test_official_zip_is_read_without_extracting(tmp_path):
    archive = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("ml-1m/ratings.dat", RATINGS_DAT.encode("latin-1"))
        zipped.writestr("ml-1m/users.dat", USERS_DAT.encode("latin-1"))
        zipped.writestr("ml-1m/movies.dat", MOVIES_DAT.encode("latin-1"))
    from_zip = load_dataset(DataConfig(dataset="movielens-1m", path=str(archive)))
    from_folder = load_dataset(
        DataConfig(dataset="movielens-1m", path=str(write_release(tmp_path / "folder")))
    )
    assert (from_zip.train != from_folder.train).nnz == 0
    assert (from_zip.test != from_folder.test).nnz == 0
    assert list(from_zip.item_names) == list(from_folder.item_names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "ml-1m.zip"]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"ratings": "1::10::5::978300760\n1::20::five::978300900\n"}, r"ratings\.dat, line 2"),
        ({"ratings": "1::10::5::978300760\n1::20::3\n"}, r"ratings\.dat, line 2: Timestamp"),
        ({"ratings": "1::10::5::978300760\n1::20::9::978300900\n"}, r"line 2: Rating must be"),
        ({"ratings": "1,10,5,978300760\n"}, r"ratings\.dat"),
        ({"ratings": "1:10:5:978300760\n"}, r"ratings\.dat, line 1"),
        ({"users": "1::F::1::10\n"}, r"users\.dat, line 1: expected"),
        ({"users": "x::F::1::10::48067\n"}, r"users\.dat, line 1: UserID must be an integer"),
        ({"movies": "10::Heat (1995)\n"}, r"movies\.dat, line 1: expected"),
        ({"users": None}, r"no users\.dat"),
        ({"movies": None}, r"no movies\.dat"),
    ],
)
def test_malformed_release_files_are_data_errors(tmp_path, files, message):
    folder = write_release(tmp_path / "ml-1m", **files)
    with pytest.raises(DataError, match=message):
        load_dataset(DataConfig(dataset="movielens-1m", path=str(folder)))


def test_ratings_csv_with_wrong_columns(tmp_path):
    folder = write_release(tmp_path / "ml-1m", ratings=None)
    (folder / "ratings_no_timestamp.csv").write_text("user,movie,rating\n1,10,5\n")
    with pytest.raises(DataError, match=r"ratings_no_timestamp\.csv lacks column\(s\) UserID"):
        load_dataset(DataConfig(dataset="movielens-1m", path=str(folder)))


def test_not_a_release(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(DataConfig(dataset="movielens-1m", path=str(tmp_path / "absent")))
    with pytest.raises(DataError, match=r"neither the official ml-1m\.zip nor a folder"):
        load_dataset(DataConfig(dataset="movielens-1m", path=str(tmp_path)))
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable zip file"):
        load_dataset(DataConfig(dataset="movielens-1m", path=str(tmp_path / "broken.zip")))


def test_no_embedded_copy(tmp_path):
    with pytest.raises(DataError, match="no embedded copy"):
        load_dataset(DataConfig(dataset="movielens-1m", source="embedded"))


def test_download_impossible_is_a_clear_error(offline):
    empty = offline
    with pytest.raises(DataError, match=r"could not download .*ml-1m\.zip"):
        load_dataset(DataConfig(dataset="movielens-1m", data_dir=str(empty)))
    with pytest.raises(DataError, match=r"could not download .*ml-1m\.zip"):
        load_dataset(DataConfig(dataset="movielens-1m", source="download"))


def test_leave_out_random_on_the_csv_is_the_fallback_draw_and_says_it_was_asked_for(ml1m, data_dir):
    asked = load_dataset(movielens_config(data_dir, leave_out="random"), seed=7)
    assert (asked.test != ml1m.test).nnz == 0  # the same seeded draw as the "last" fallback
    assert (asked.train != ml1m.train).nnz == 0
    rule = asked.report["split_rule"]
    assert 'data.leave_out = "random"' in rule and "seed" in rule
    assert 'data.leave_out = "last" is impossible' in ml1m.report["split_rule"]


def test_ratings_dat_leave_out_random_really_draws(tmp_path):
    # Three users rate the same 30 movies, one per minute, each in another order: "last" holds out
    # movies 19, 9 and 29, which the other two users keep in training.
    lines = [
        f"{user}::{movie}::4::{978000000 + 60 * ((movie + 10 * user) % 30)}\n"
        for user in (1, 2, 3)
        for movie in range(1, 31)
    ]
    folder = write_release(tmp_path / "ml-1m", ratings="".join(lines))
    last = load_dataset(DataConfig(dataset="movielens-1m", path=str(folder)))
    assert [heldout_items(last, u) for u in range(3)] == [[19], [9], [29]]
    drawn = [
        load_dataset(
            DataConfig(dataset="movielens-1m", path=str(folder), leave_out="random"), seed=seed
        )
        for seed in range(4)
    ]
    held = [tuple(heldout_items(d, u)) for d in drawn for u in range(3)]
    assert len(set(held)) > 5  # 12 draws from 30 movies
    assert sum(h in {(19,), (9,), (29,)} for h in held) <= 3
    assert all("random" in d.report["split_rule"] for d in drawn)


# --- MovieLens-100K ----------------------------------------------------------------------------


def ml100k_config(data_dir, **overrides):
    return DataConfig(dataset="movielens-100k", data_dir=str(data_dir), **overrides)


@pytest.fixture(scope="session")
def ml100k(data_dir):
    return load_dataset(ml100k_config(data_dir), seed=7)


@pytest.fixture(scope="session")
def ml100k_random(data_dir):
    return load_dataset(ml100k_config(data_dir, leave_out="random"), seed=7)


@pytest.fixture(scope="session")
def u_data(data_dir):
    return pd.read_csv(
        data_dir / "movielens-100k" / "u.data",
        sep="\t",
        header=None,
        names=["UserID", "MovieID", "Rating", "Timestamp"],
    )


def test_ml100k_official_counts(ml100k):
    report = ml100k.report
    assert report["dataset"] == "movielens-100k"
    assert report["ratings_file"] == "u.data"
    assert report["source"].startswith("data directory") and "movielens-100k" in report["source"]
    cleaning = report["cleaning"]
    assert cleaning["users"] == ML100K_USERS
    assert cleaning["movies_rated"] == ML100K_ITEMS
    assert cleaning["movies_listed"] == ML100K_ITEMS
    assert cleaning["ratings"] == ML100K_RATINGS
    assert cleaning["users_without_profile"] == cleaning["rated_movies_without_title"] == 0
    assert list(ml100k.user_ids) == list(range(1, ML100K_USERS + 1))
    split = report["split"]
    assert split["users_too_little_history"] == 0  # everyone rated at least 20 movies
    removed = split["test_items_unseen_in_training_removed"]
    assert split["train_pairs"] + split["test_pairs"] + removed == ML100K_RATINGS
    assert split["test_users"] + split["test_users_empty_basket"] == ML100K_USERS
    assert ml100k.report["catalogue_items"] == ml100k.n_items <= ML100K_ITEMS
    assert report["date_range"] == ["1997-09-20 03:05:10", "1998-04-22 23:10:38"]


def test_ml100k_zip_zone_silos(ml100k, data_dir):
    users = pd.read_csv(
        data_dir / "movielens-100k" / "u.user",
        sep="|",
        header=None,
        names=["UserID", "Age", "Gender", "Occupation", "Zip"],
        dtype={"Zip": str},
    )
    silos = ml100k.report["silos"]
    assert sum(s["customers"] for s in silos) == ML100K_USERS
    assert sum(s["train_interactions"] for s in silos) == ml100k.train.nnz
    assert set(ml100k.silo_names) == {f"ZIP zone {d}" for d in range(10)} | {"Other"}
    zip_of_user = dict(zip(users["UserID"], users["Zip"], strict=True))
    for user, silo in zip(ml100k.user_ids, ml100k.user_silo, strict=True):
        zone = zip_of_user[user][0]
        expected = f"ZIP zone {zone}" if zone.isdigit() else "Other"  # Canadian postal codes
        assert ml100k.silo_names[silo] == expected
    names = dict(zip(ml100k.item_ids.tolist(), ml100k.item_names.tolist(), strict=True))
    assert names[1] == "Toy Story (1995)"


def test_ml100k_last_test_item_is_a_latest_rating(ml100k, u_data):
    assert "timestamp" in ml100k.report["split_rule"]
    assert 'data.leave_out = "last"' in ml100k.report["split_rule"]
    assert "random" not in ml100k.report["split_rule"]
    latest = u_data.groupby("UserID")["Timestamp"].max()
    time_of = u_data.set_index(["UserID", "MovieID"])["Timestamp"]
    for index, user in enumerate(ml100k.user_ids):
        items = heldout_items(ml100k, index)
        for item in items:
            assert time_of[(user, item)] == latest[user]
        if not items:  # the latest rating (file order breaks ties) was of a movie seen only here
            rows = u_data[u_data["UserID"] == user]
            last_movie = rows.loc[rows["Timestamp"] == latest[user], "MovieID"].iloc[-1]
            assert last_movie not in set(ml100k.item_ids.tolist())
    assert ml100k.test.multiply(ml100k.train).nnz == 0


def test_ml100k_validation_last_is_the_latest_before_the_test_item(data_dir, u_data):
    dataset = load_dataset(ml100k_config(data_dir, validation=True), seed=7)
    time_of = u_data.set_index(["UserID", "MovieID"])["Timestamp"]
    for index in range(0, ML100K_USERS, 37):
        user = dataset.user_ids[index]
        trained = heldout_items(dataset, index, "train")
        for valid in heldout_items(dataset, index, "validation"):  # empty if removed as unseen
            assert time_of[(user, valid)] >= max(time_of[(user, m)] for m in trained)


def heldout_pairs(dataset, matrix="test"):
    """(user index, MovieID) pairs: comparable across datasets whose catalogues differ."""
    rows, cols = getattr(dataset, matrix).nonzero()
    return set(zip(rows.tolist(), dataset.item_ids[cols].tolist(), strict=True))


def test_ml100k_random_differs_from_last_and_is_reproducible(ml100k, ml100k_random, data_dir):
    pairs = heldout_pairs
    same_as_last = len(pairs(ml100k) & pairs(ml100k_random))
    assert same_as_last < 0.1 * ML100K_USERS  # 106 ratings per user: the latest is rarely drawn
    rule = ml100k_random.report["split_rule"]
    assert 'data.leave_out = "random"' in rule and "uniformly at random" in rule
    assert "run seed (7)" in rule
    again = load_dataset(ml100k_config(data_dir, leave_out="random"), seed=7)
    assert (again.test != ml100k_random.test).nnz == 0
    assert (again.train != ml100k_random.train).nnz == 0
    other = load_dataset(ml100k_config(data_dir, leave_out="random"), seed=8)
    assert len(pairs(other) & pairs(ml100k_random)) < 0.1 * ML100K_USERS
    split = ml100k_random.report["split"]
    assert (
        split["train_pairs"] + split["test_pairs"]
        == ML100K_RATINGS - split["test_items_unseen_in_training_removed"]
    )


def test_ml100k_random_validation_is_a_second_random_rating(data_dir, ml100k_random):
    dataset = load_dataset(ml100k_config(data_dir, leave_out="random", validation=True), seed=7)
    assert "a second random rating the validation item" in dataset.report["split_rule"]
    assert dataset.validation.multiply(dataset.test).nnz == 0
    assert dataset.validation.multiply(dataset.train).nnz == 0
    assert dataset.test.multiply(dataset.train).nnz == 0
    split = dataset.report["split"]
    assert split["validation_users"] >= ML100K_USERS - 5
    assert split["train_pairs"] == ML100K_RATINGS - 2 * ML100K_USERS

    # The test draw is the same with or without validation; validation takes a second one (only a
    # test movie left with no rating in training can differ).
    assert len(heldout_pairs(dataset) ^ heldout_pairs(ml100k_random)) <= 5
    assert len(heldout_pairs(dataset, "validation") & heldout_pairs(ml100k_random)) == 0


U_DATA = "1\t10\t5\t881250949\n1\t20\t3\t881250950\n1\t30\t4\t881250000\n2\t10\t4\t881000000\n"
U_DATA += "2\t30\t2\t881000600\n2\t20\t5\t881000500\n3\t30\t1\t881000000\n3\t20\t4\t880000000\n"
U_USER = "1|24|M|technician|85711\n2|53|F|other|02460\n3|23|M|writer|T8H1N\n"
U_ITEM = (
    "10|Misérables, Les (1995)|01-Jan-1995||http://x|0|0|0|0|0|0|0|0|1|0|0|0|1|0|0|0|0|0|0\n"
    "20|Star Wars (1977)|01-Jan-1977||http://y|0|1|1|0|0|0|0|0|0|0|0|0|0|0|1|1|0|1|0\n"
    "30|unknown||||1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
)


def write_100k(folder, data=U_DATA, user=U_USER, item=U_ITEM):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("u.data", data), ("u.user", user), ("u.item", item)):
        if text is not None:
            (folder / name).write_text(text, encoding="latin-1")
    return folder


def test_ml100k_small_release(tmp_path):
    dataset = load_dataset(DataConfig(dataset="movielens-100k", path=str(write_100k(tmp_path))))
    assert list(dataset.user_ids) == [1, 2, 3]
    assert heldout_items(dataset, 0) == [20]
    assert heldout_items(dataset, 1) == [30]
    assert heldout_items(dataset, 2) == [30]
    names = dict(zip(dataset.item_ids.tolist(), dataset.item_names.tolist(), strict=True))
    assert names == {10: "Misérables, Les (1995)", 20: "Star Wars (1977)", 30: "unknown"}
    assert dataset.silo_names == ("Other",)  # every zone has fewer than 10 users


def test_ml100k_official_zip_is_read_without_extracting(tmp_path):
    archive = tmp_path / "data" / "ml-100k.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("ml-100k/u.data", U_DATA.encode("latin-1"))
        zipped.writestr("ml-100k/u.user", U_USER.encode("latin-1"))
        zipped.writestr("ml-100k/u.item", U_ITEM.encode("latin-1"))
        zipped.writestr("ml-100k/u1.base", "9\t9\t9\t9\n")  # the official split files: unread
        zipped.writestr("ml-100k/u.genre", "unknown|0\n")
    folder = write_100k(tmp_path / "folder")
    from_zip = load_dataset(DataConfig(dataset="movielens-100k", path=str(archive)))
    found = load_dataset(DataConfig(dataset="movielens-100k", data_dir=str(archive.parent)))
    from_folder = load_dataset(DataConfig(dataset="movielens-100k", path=str(folder)))
    for dataset in (from_zip, found):
        assert (dataset.train != from_folder.train).nnz == 0
        assert (dataset.test != from_folder.test).nnz == 0
        assert list(dataset.item_names) == list(from_folder.item_names)
    assert found.report["source"] == f"data directory {archive}"
    assert from_zip.report["source"] == f"file {archive}"
    assert sorted(p.name for p in archive.parent.iterdir()) == ["ml-100k.zip"]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"data": "1\t10\t5\t881250949\n1\t20\tfive\t881250950\n"}, r"u\.data, line 2"),
        ({"data": "1\t10\t5\t881250949\n1\t20\t3\n"}, r"u\.data, line 2: Timestamp"),
        ({"data": "1\t10\t5\t881250949\t7\n"}, r"u\.data, line 1: expected user id"),
        ({"data": "1\t10\t0\t881250949\n"}, r"u\.data, line 1: Rating must be"),
        ({"data": "1,10,5,881250949\n"}, r"u\.data, line 1: UserID must be an integer"),
        ({"user": "1|24|M|technician\n"}, r"u\.user, line 1: expected user id\|age"),
        ({"item": "10|Heat (1995)|01-Jan-1995\n"}, r"u\.item, line 1: expected movie id"),
        ({"user": None}, r"no u\.user \(the MovieLens-100K release has it\)"),
        ({"item": None}, r"no u\.item"),
    ],
)
def test_ml100k_malformed_files_are_data_errors(tmp_path, files, message):
    folder = write_100k(tmp_path / "ml-100k", **files)
    with pytest.raises(DataError, match=message):
        load_dataset(DataConfig(dataset="movielens-100k", path=str(folder)))


def test_ml100k_not_a_release_and_no_download(tmp_path, offline):
    with pytest.raises(DataError, match=r"MovieLens-100K path not found"):
        load_dataset(DataConfig(dataset="movielens-100k", path=str(tmp_path / "absent")))
    write_release(tmp_path / "ml-1m")  # an ML-1M folder is not an ML-100K release
    with pytest.raises(DataError, match=r"neither the official ml-100k\.zip nor a folder"):
        load_dataset(DataConfig(dataset="movielens-100k", path=str(tmp_path / "ml-1m")))
    with pytest.raises(DataError, match="no embedded copy"):
        load_dataset(DataConfig(dataset="movielens-100k", source="embedded"))
    with pytest.raises(DataError, match=r"could not download .*ml-100k\.zip"):
        load_dataset(DataConfig(dataset="movielens-100k", data_dir=str(tmp_path / "ml-1m")))


# --- data.leave_out elsewhere ------------------------------------------------------------------


def test_leave_random_out_holds_out_random_distinct_rows():
    # Three users with the same 40 items in another order each: the last ones are 39, 9 and 19.
    position = np.tile(np.arange(40), 3)
    user = np.repeat([0, 1, 2], 40)
    events = pd.DataFrame({"user": user, "item": (position + 10 * user) % 40, "order": position})
    last = leave_last_out(events, validation=True)
    assert sorted(last.test["item"]) == [9, 19, 39]
    assert sorted(last.validation["item"]) == [8, 18, 38]
    drawn = leave_random_out(events, seed=1, validation=True)
    again = leave_random_out(events, seed=1, validation=True)
    assert drawn.test.equals(again.test) and drawn.validation.equals(again.validation)
    assert drawn.counts["test_users"] == drawn.counts["validation_users"] == 3
    assert sorted(drawn.test["item"]) != [9, 19, 39]
    for index in range(3):
        test_item = drawn.test.loc[drawn.test["user"] == index, "item"].item()
        valid_item = drawn.validation.loc[drawn.validation["user"] == index, "item"].item()
        trained = set(drawn.train.loc[drawn.train["user"] == index, "item"])
        assert test_item != valid_item
        assert trained == set(range(40)) - {test_item, valid_item}
    draws = {tuple(leave_random_out(events, seed=s).test["item"]) for s in range(5)}
    assert len(draws) == 5


# Six users with the same 20 items in another order each: the last items differ (sku19, sku2, ...).
SEQUENCES = "".join(
    f"user{u} " + " ".join(f"sku{(i + 3 * u) % 20}" for i in range(20)) + "\n" for u in range(6)
)
LAST_SKUS = [[f"sku{(19 + 3 * u) % 20}"] for u in range(6)]


def test_amazon_leave_out_random_really_draws(tmp_path):
    path = tmp_path / "shop.txt"
    path.write_text(SEQUENCES)

    def load(**overrides):
        config = DataConfig(dataset="amazon-sequential", path=str(path), silos=2, **overrides)
        return load_dataset(config, seed=3)

    last = load()
    assert [heldout_items(last, u) for u in range(6)] == LAST_SKUS
    assert 'data.leave_out = "last"' in last.report["split_rule"]
    drawn = load(leave_out="random")
    held = [heldout_items(drawn, u) for u in range(6)]
    assert sum(h != expected for h, expected in zip(held, LAST_SKUS, strict=True)) >= 4
    assert len({tuple(h) for h in held}) >= 3
    assert held == [heldout_items(load(leave_out="random"), u) for u in range(6)]
    rule = drawn.report["split_rule"]
    assert 'data.leave_out = "random"' in rule and "item drawn uniformly at random" in rule


def test_leave_out_is_validated_and_ignored_by_online_retail(retail):
    with pytest.raises(ConfigError, match=r"\[data\] leave_out must be one of last, random"):
        DataConfig(leave_out="first").validate()
    with pytest.raises(ConfigError, match=r"leave_out must be one of last, random; got 'Random'"):
        load_config(overrides={"data.dataset": "movielens-100k", "data.leave_out": "Random"})
    config = load_config(overrides={"data.leave_out": "random"})
    assert config.data.dataset == "online-retail" and config.data.leave_out == "random"
    ignored = load_dataset(config.data)
    assert (ignored.test != retail.test).nnz == 0
    assert ignored.report["split_rule"] == retail.report["split_rule"]
