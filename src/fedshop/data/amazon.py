"""Amazon product reviews 2014, 5-core subsets (He & McAuley, WWW 2016; McAuley et al., SIGIR 2015).

Every user and item has at least five reviews. Two file formats are read, recognised by content:
- sequential: one line per user, "user item item ..." in time order, whitespace-separated tokens (the
  format of S3-Rec, SASRec and most sequential-recommendation code; ids are any non-space tokens);
- the official raw reviews, `reviews_<Category>_5.json.gz` (or uncompressed): one review per line with
  reviewerID, asin and unixReviewTime, as JSON or, in older releases, as a Python dict literal.
The data is licensed for research use only: it is read from the user's copy or downloaded, never shipped.
"""

from __future__ import annotations

import ast
import gzip
import itertools
import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedshop.errors import DataError

# Dataset name → the category's name in the official file names.
CATEGORIES = {
    "amazon-toys": "Toys_and_Games",
    "amazon-beauty": "Beauty",
    "amazon-sports": "Sports_and_Outdoors",
}
SEQUENTIAL_DATASET = "amazon-sequential"  # any file in the sequential format, named by data.path
DATA_DIR_FOLDER = "amazon-2014-5core"
OFFICIAL_BASE_URL = "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles"
REVIEW_FIELDS = ("reviewerID", "asin", "unixReviewTime")
GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class AmazonSequences:
    """Each user's items in time order."""

    # user, item (text ids), position (0, 1, ... in time order within the user); users in order of
    # first appearance in the file, each user's rows in sequence order.
    events: pd.DataFrame
    file_format: str  # "sequential" or "reviews"
    time_range: tuple[int, int] | None  # unixReviewTime span (reviews format only)


def raw_filename(category: str) -> str:
    return f"reviews_{category}_5.json.gz"


def official_url(category: str) -> str:
    return f"{OFFICIAL_BASE_URL}/{raw_filename(category)}"


def data_dir_candidates(category: str) -> tuple[str, ...]:
    """File names looked for in `<data_dir>/amazon-2014-5core/`, in order of preference."""
    return (f"{category}.txt", raw_filename(category), f"reviews_{category}_5.json")


def resolve_path(dataset: str, path: str | None, data_dir: str | None) -> tuple[Path, str] | None:
    """The file to read: `path`, else a data directory; None means nothing local was found.

    Returns the path and a short description of where it came from (for the data report).
    """
    if path:
        location = Path(path).expanduser()
        if not location.is_file():
            raise DataError(f"Amazon reviews file not found: {location}")
        return location, f"file {location}"
    if dataset not in CATEGORIES:
        raise DataError(
            f"{dataset} needs data.path: a file with one 'user item item ...' line per user"
        )
    if data_dir:
        base = Path(data_dir).expanduser()
        if not base.is_dir():
            raise DataError(f"data directory not found: {base}")
        for name in data_dir_candidates(CATEGORIES[dataset]):
            candidate = base / DATA_DIR_FOLDER / name
            if candidate.is_file():
                return candidate, f"data directory {base} ({DATA_DIR_FOLDER}/{name})"
    return None


def read_sequences(path: Path) -> AmazonSequences:
    """Read a sequential or raw-reviews file (plain or gzip), telling the format by its content."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Amazon reviews file not found: {path}")
    try:
        lines = ((number, line) for number, line in enumerate(_text_lines(path), 1) if line.strip())
        first = next(lines, None)
        if first is None:
            raise DataError(f"{path} is empty: expected one 'user item item ...' line per user")
        lines = itertools.chain([first], lines)
        if first[1].lstrip().startswith("{"):
            return _parse_reviews(lines, path)
        return _parse_sequential(lines, path)
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
        # A truncated download or a binary file: name it instead of showing a traceback.
        raise DataError(f"could not read {path} ({exc})") from None


def random_shards(n_users: int, n_shards: int, seed: int) -> tuple[tuple[str, ...], np.ndarray]:
    """Deal users at random into `n_shards` shards of equal size (±1): "shard 1" ... "shard k".

    Returns the shard names and each user's shard index. `seed` must already be derived for this use.
    """
    if n_shards > n_users:
        raise DataError(f"data.silos = {n_shards} is more than the {n_users} users to share out")
    shuffled = np.random.default_rng(seed).permutation(n_users)
    user_shard = np.empty(n_users, dtype=np.int64)
    user_shard[shuffled] = np.arange(n_users) % n_shards
    return tuple(f"shard {k + 1}" for k in range(n_shards)), user_shard


def _text_lines(path: Path) -> Iterator[str]:
    with open(path, "rb") as probe:
        compressed = probe.read(2) == GZIP_MAGIC  # by content: the extension may not say
    opener = gzip.open if compressed else open
    with opener(path, "rt", encoding="utf-8") as handle:
        yield from handle


def _parse_sequential(lines: Iterable[tuple[int, str]], path: Path) -> AmazonSequences:
    users: list[str] = []
    items: list[str] = []
    positions: list[int] = []
    line_of_user: dict[str, int] = {}
    for number, line in lines:
        user, *sequence = line.split()
        if not sequence:
            raise DataError(
                f"{path}, line {number}: user {user!r} has no items (expected 'user item item ...')"
            )
        if user in line_of_user:
            raise DataError(
                f"{path}, line {number}: user {user!r} already has a sequence on line "
                f"{line_of_user[user]}"
            )
        line_of_user[user] = number
        users.extend([user] * len(sequence))
        items.extend(sequence)
        positions.extend(range(len(sequence)))
    events = pd.DataFrame({"user": users, "item": items, "position": positions})
    return AmazonSequences(events=events, file_format="sequential", time_range=None)


def _parse_reviews(lines: Iterable[tuple[int, str]], path: Path) -> AmazonSequences:
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    for number, line in lines:
        review = _parse_review(line, path, number)
        users.append(str(review["reviewerID"]))
        items.append(str(review["asin"]))
        times.append(review["unixReviewTime"])
    user_rank = pd.factorize(pd.Series(users))[0]
    time = np.asarray(times, dtype=np.int64)
    # np.lexsort is stable, so reviews with the same time keep their file order.
    order = np.lexsort((np.arange(len(users)), time, user_rank))
    events = pd.DataFrame({"user": np.asarray(users, dtype=object)[order]})
    events["item"] = np.asarray(items, dtype=object)[order]
    events["position"] = events.groupby("user", sort=False).cumcount().to_numpy()
    return AmazonSequences(
        events=events, file_format="reviews", time_range=(int(time.min()), int(time.max()))
    )


def _parse_review(line: str, path: Path, number: int) -> dict:
    try:
        review = json.loads(line)
    except json.JSONDecodeError:
        try:  # the 2014 release writes Python dict literals (single quotes)
            review = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise DataError(
                f"{path}, line {number}: not a review record (neither JSON nor a Python dict)"
            ) from None
    if not isinstance(review, dict):
        raise DataError(f"{path}, line {number}: not a review record (expected {{...}})")
    missing = [name for name in REVIEW_FIELDS if name not in review]
    if missing:
        raise DataError(f"{path}, line {number}: the review has no {', '.join(missing)}")
    time = review["unixReviewTime"]
    if isinstance(time, str) and time.strip().isdigit():
        time = int(time)
    if not isinstance(time, int) or isinstance(time, bool):
        raise DataError(f"{path}, line {number}: unixReviewTime must be an integer, got {time!r}")
    review["unixReviewTime"] = time
    return review
