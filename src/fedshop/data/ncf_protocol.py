"""The NCF paper's own MovieLens-1M test set (He et al., WWW 2017), which FedMF, FedNCF and PFedRec reuse.

Two files from the authors' repository (hexiangnan/neural_collaborative_filtering, `Data/`,
Apache-2.0), read from `<data_dir>/movielens-1m/ncf/` or downloaded at a pinned commit:
- ml-1m.test.rating:   `user item rating timestamp`, each user's latest rating (one per user);
- ml-1m.test.negative: `(user,item)` then the 99 items sampled for that user as negatives.
Ids are 0-based: user = UserID − 1; item = the order in which each MovieID first appears in the
ratings file (ratings_no_timestamp.csv or ratings.dat, which list the ratings in the same order).
Under this protocol the training set is every rating except each user's test pair, and the test
item is ranked against exactly those 99 negatives: nothing is resampled. As published, 156 of the
597,960 negatives are the user's own test item; they are kept, and (as in NCF's evaluate.py, which
scores candidates through a dict) the item is then ranked once, among 99 distinct candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedshop.data.download import fetch
from fedshop.errors import DataError

FOLDER = "ncf"  # inside the MovieLens-1M data folder
TEST_RATING = "ml-1m.test.rating"
TEST_NEGATIVE = "ml-1m.test.negative"
NEGATIVES_PER_USER = 99
REPOSITORY_COMMIT = "4aab159e81c44b062c091bdaed0ab54ac632371f"
BASE_URL = (
    "https://raw.githubusercontent.com/hexiangnan/neural_collaborative_filtering/"
    f"{REPOSITORY_COMMIT}/Data"
)
SHA256 = {
    TEST_RATING: "231ae11eb060b643a8c58c063cd17ffc743b54f569afb073d1abb6cf126b88b5",
    TEST_NEGATIVE: "127853228a76b7d21c0481e8ef8d00dd009cd5c88670dbdd9e9debfdb9f93de4",
}


@dataclass(frozen=True)
class NcfTestSet:
    """The published test set, in the files' own ids (0-based user and item numbers)."""

    users: np.ndarray  # one row per test user
    items: np.ndarray  # the user's test item
    ratings: np.ndarray  # its star rating (used to check the id mapping)
    negatives: np.ndarray  # users × 99 negative items
    source: str  # where the files came from, for the data report


def locate(data_dir: str | None, ratings_location: Path, cache: str | None) -> tuple[Path, str]:
    """The folder holding both files: beside the ratings, the data directory, else a download."""
    candidates = []
    if ratings_location.is_dir():
        candidates.append(ratings_location / FOLDER)
    if data_dir:
        candidates.append(Path(data_dir).expanduser() / "movielens-1m" / FOLDER)
    for folder in candidates:
        if all((folder / name).is_file() for name in SHA256):
            return folder, f"folder {folder}"
    # fetch keeps every download in the one cache folder, so both files end up side by side.
    paths = [fetch(f"{BASE_URL}/{name}", name, sha256=SHA256[name], cache=cache) for name in SHA256]
    return paths[0].parent, f"NCF repository at {REPOSITORY_COMMIT[:8]} ({BASE_URL})"


def read_test_set(folder: Path, source: str) -> NcfTestSet:
    rating_path, negative_path = folder / TEST_RATING, folder / TEST_NEGATIVE
    try:
        rated = pd.read_csv(
            rating_path, sep="\t", header=None, names=["user", "item", "rating", "time"]
        )
        lines = negative_path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, ValueError) as exc:
        raise DataError(f"could not read the NCF test files in {folder} ({exc})") from None
    if rated.isna().any().any() or not all(
        pd.api.types.is_integer_dtype(rated[c]) for c in rated.columns
    ):
        raise DataError(f"{rating_path}: expected 'user item rating timestamp' integer lines")
    negatives = np.full((len(lines), NEGATIVES_PER_USER), -1, dtype=np.int64)
    pair_users = np.empty(len(lines), dtype=np.int64)
    pair_items = np.empty(len(lines), dtype=np.int64)
    for number, line in enumerate(lines):
        head, *rest = line.split("\t")
        try:
            user, item = (int(part) for part in head.strip("()").split(","))
            values = [int(value) for value in rest if value.strip()]
        except ValueError:
            raise DataError(
                f"{negative_path}, line {number + 1}: expected '(user,item)' then item ids"
            ) from None
        if len(values) != NEGATIVES_PER_USER:
            raise DataError(
                f"{negative_path}, line {number + 1}: {len(values)} negatives, expected "
                f"{NEGATIVES_PER_USER}"
            )
        pair_users[number], pair_items[number] = user, item
        negatives[number] = values
    if len(lines) != len(rated) or not (
        np.array_equal(pair_users, rated["user"].to_numpy())
        and np.array_equal(pair_items, rated["item"].to_numpy())
    ):
        raise DataError(
            f"{negative_path} and {rating_path} do not list the same (user, item) pairs in order"
        )
    if len(np.unique(pair_users)) != len(pair_users):
        raise DataError(f"{rating_path} holds more than one test rating for some user")
    return NcfTestSet(
        users=pair_users,
        items=pair_items,
        ratings=rated["rating"].to_numpy(),
        negatives=negatives,
        source=source,
    )


def align(
    test: NcfTestSet, ratings: pd.DataFrame, user_codes: np.ndarray, user_ids: pd.Index
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map the files' ids onto the rating table: returns (test user code, test row in `ratings`,
    negatives as MovieIDs). `user_codes` are the loader's user codes per rating, `user_ids` the
    UserID of each code.

    Every test pair must be a rating in the table with the same stars; otherwise the ratings file is
    not the one the NCF ids were numbered on, and the protocol would silently test other pairs.
    """
    movie_of_ncf_item = pd.unique(ratings["MovieID"].to_numpy())  # order of first appearance
    n_items = len(movie_of_ncf_item)
    if test.items.max() >= n_items or test.negatives.max() >= n_items or test.negatives.min() < 0:
        raise DataError(
            f"the NCF test files name items beyond the {n_items} movies of the ratings file"
        )
    user_code_of_id = pd.Series(np.arange(len(user_ids)), index=user_ids)
    wanted_user_ids = test.users + 1  # NCF user = UserID − 1
    known = np.isin(wanted_user_ids, user_ids)
    if not known.all():
        raise DataError(
            f"the NCF test set names {int((~known).sum())} users the ratings file does not have"
        )
    codes = user_code_of_id.loc[wanted_user_ids].to_numpy()
    keyed = pd.DataFrame(
        {"code": user_codes, "movie": ratings["MovieID"].to_numpy(), "row": np.arange(len(ratings))}
    )
    wanted = pd.DataFrame({"code": codes, "movie": movie_of_ncf_item[test.items]})
    matched = wanted.merge(keyed, on=["code", "movie"], how="left")
    stars = ratings["Rating"].to_numpy()
    found = matched["row"].notna().to_numpy()
    rows = matched["row"].fillna(-1).to_numpy(dtype=np.int64)
    same_stars = found & (stars[np.where(found, rows, 0)] == test.ratings)
    if not same_stars.all():
        raise DataError(
            f"{int((~same_stars).sum())} of the {len(rows)} NCF test ratings are not in the ratings "
            "file with the same stars: the file is not the one the NCF item ids were numbered on "
            "(items are numbered by first appearance in ratings_no_timestamp.csv / ratings.dat)"
        )
    return codes, rows, movie_of_ncf_item[test.negatives]
