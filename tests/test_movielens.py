"""MovieLens-1M: the release files, the leave-one-out split and the ZIP-zone silos."""

import socket
import zipfile

import numpy as np
import pandas as pd
import pytest

from fedshop.config import DataConfig
from fedshop.data.registry import load_dataset
from fedshop.errors import DataError

ML1M_USERS = 6040
ML1M_RATED_MOVIES = 3706
ML1M_RATINGS = 1_000_209


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


def test_download_impossible_is_a_clear_error(tmp_path, monkeypatch):
    with socket.socket() as probe:  # a port on loopback with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # urllib sends the request through this "proxy", which refuses the connection: offline.
    for variable in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(variable, f"http://127.0.0.1:{port}")
    for variable in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("FEDSHOP_CACHE_DIR", str(tmp_path / "cache"))
    empty = tmp_path / "data"
    empty.mkdir()
    with pytest.raises(DataError, match=r"could not download .*ml-1m\.zip"):
        load_dataset(DataConfig(dataset="movielens-1m", data_dir=str(empty)))
    with pytest.raises(DataError, match=r"could not download .*ml-1m\.zip"):
        load_dataset(DataConfig(dataset="movielens-1m", source="download"))
