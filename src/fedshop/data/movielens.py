"""MovieLens 1M and 100K (GroupLens; Harper & Konstan 2015), read from the official release files.

Both releases are read from a folder or from inside the official zip (never extracted).
MovieLens 1M (ml-1m.zip): 1,000,209 ratings of 3,706 movies by 6,040 users.
- ratings.dat  UserID::MovieID::Rating::Timestamp
- users.dat    UserID::Gender::Age::Occupation::Zip-code
- movies.dat   MovieID::Title::Genres, latin-1
A folder may hold ratings_no_timestamp.csv (columns UserID, MovieID, Rating) instead of ratings.dat;
that copy has no timestamps, so a leave-one-out split on it has to pick the held-out items at random.
MovieLens 100K (ml-100k.zip): 100,000 ratings of 1,682 movies by 943 users.
- u.data  user id, item id, rating, timestamp, tab-separated
- u.user  user id|age|gender|occupation|zip code
- u.item  movie id|movie title|release date|video release date|IMDb URL|19 genre flags, latin-1
Both are read into the same tables (the ML-1M column names), so everything downstream is shared.
The data is licensed for research use only: it is read from the user's copy or downloaded, never shipped.
"""

from __future__ import annotations

import dataclasses
import io
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np
import pandas as pd

from fedshop.data.partition import SiloAssignment, assign_silos
from fedshop.errors import DataError


@dataclass(frozen=True)
class ReleaseFormat:
    """What tells the MovieLens releases apart: name, official download and file names."""

    dataset: str  # the config's data.dataset
    title: str  # for messages
    official_url: str
    official_sha256: str
    official_zip: str
    # Looked for inside a data directory, in order: a folder of release files, or the official zip.
    data_dir_candidates: tuple[str, ...]
    ratings_files: tuple[str, ...]  # in order of preference
    users_file: str
    movies_file: str


OFFICIAL_URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
# The official zip (5,917,549 bytes) as recorded in tensorflow_datasets' url_checksums/movielens.txt.
OFFICIAL_SHA256 = "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20"
OFFICIAL_ZIP = "ml-1m.zip"
DATA_DIR_CANDIDATES = ("movielens-1m", "ml-1m", OFFICIAL_ZIP)
RATINGS_FILES = ("ratings.dat", "ratings_no_timestamp.csv")
ML_1M = ReleaseFormat(
    dataset="movielens-1m",
    title="MovieLens-1M",
    official_url=OFFICIAL_URL,
    official_sha256=OFFICIAL_SHA256,
    official_zip=OFFICIAL_ZIP,
    data_dir_candidates=DATA_DIR_CANDIDATES,
    ratings_files=RATINGS_FILES,
    users_file="users.dat",
    movies_file="movies.dat",
)
ML_100K = ReleaseFormat(
    dataset="movielens-100k",
    title="MovieLens-100K",
    official_url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
    # The official zip (4,924,029 bytes), from tensorflow_datasets' url_checksums/movielens.txt.
    official_sha256="50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
    official_zip="ml-100k.zip",
    data_dir_candidates=("movielens-100k", "ml-100k", "ml-100k.zip"),
    ratings_files=("u.data",),
    users_file="u.user",
    movies_file="u.item",
)
RELEASES = {release.dataset: release for release in (ML_1M, ML_100K)}
OTHER_SILO = "Other"
RATING_RANGE = (1, 5)
# The 19 genre flags at the end of each u.item line, in order (u.genre of the 100K release).
GENRES_100K = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)


@dataclass(frozen=True)
class MovieLens:
    """The three release tables, as read."""

    ratings: pd.DataFrame  # UserID, MovieID, Rating and, unless from the csv, Timestamp; file order
    users: pd.DataFrame  # UserID, Gender, Age, Occupation, Zip (all text but UserID)
    movies: pd.DataFrame  # MovieID, Title, Genres
    ratings_file: str  # which ratings file was read

    @property
    def has_timestamps(self) -> bool:
        return "Timestamp" in self.ratings.columns


def is_release(location: Path, release: ReleaseFormat = ML_1M) -> bool:
    """Whether `location` is a zip file or a folder holding one of the ratings files."""
    if location.is_dir():
        return any((location / name).is_file() for name in release.ratings_files)
    return location.is_file() and location.suffix.lower() == ".zip"


def resolve_location(
    path: str | None, data_dir: str | None, release: ReleaseFormat = ML_1M
) -> tuple[Path, str] | None:
    """The folder or zip to read: `path`, else a data directory; None means nothing local was found.

    Returns the location and a short description of where it came from (for the data report).
    """
    if path:
        location = Path(path).expanduser()
        if not location.exists():
            raise DataError(f"{release.title} path not found: {location}")
        if location.is_file() and location.name in release.ratings_files:
            location = location.parent  # a ratings file names its release folder
        if not is_release(location, release):
            raise DataError(
                f"{location} is neither the official {release.official_zip} nor a folder holding "
                f"{' or '.join(release.ratings_files)}"
            )
        return location, f"{'folder' if location.is_dir() else 'file'} {location}"
    if data_dir:
        base = Path(data_dir).expanduser()
        if not base.is_dir():
            raise DataError(f"data directory not found: {base}")
        for candidate in release.data_dir_candidates:
            if is_release(base / candidate, release):
                return base / candidate, f"data directory {base / candidate}"
    return None


def read_movielens(location: Path, release: ReleaseFormat = ML_1M) -> MovieLens:
    """Read ratings, users and movies from a release folder or the official zip."""
    with _ReleaseFiles(location) as files:
        ratings_file = next((name for name in release.ratings_files if files.has(name)), None)
        if ratings_file is None:
            raise DataError(f"{location} holds neither {' nor '.join(release.ratings_files)}")
        for required in (release.users_file, release.movies_file):
            if not files.has(required):
                raise DataError(
                    f"{location} has no {required} (the {release.title} release has it)"
                )
        with files.open(ratings_file) as handle:
            ratings = _READERS[ratings_file](handle, files.label(ratings_file))
        with files.open(release.users_file) as handle:
            users = _READERS[release.users_file](handle, files.label(release.users_file))
        with files.open(release.movies_file) as handle:
            movies = _READERS[release.movies_file](handle, files.label(release.movies_file))
    if ratings.empty:
        raise DataError(f"{files.label(ratings_file)} holds no ratings")
    return MovieLens(ratings=ratings, users=users, movies=movies, ratings_file=ratings_file)


# What pandas raises on a file that is not the expected text table.
_UNREADABLE = (
    pd.errors.ParserError,
    pd.errors.EmptyDataError,
    ValueError,
    UnicodeDecodeError,
    OSError,
)


def read_ratings_dat(handle: IO[bytes], label: str) -> pd.DataFrame:
    """Parse UserID::MovieID::Rating::Timestamp lines."""
    fields = ["UserID", "MovieID", "Rating", "Timestamp"]
    try:
        # The fast C parser cannot split on "::": split on ":" and check the empty fields between.
        raw = pd.read_csv(handle, sep=":", header=None, names=range(7), low_memory=False)
    except _UNREADABLE as exc:  # a foreign file: say which and why, without a traceback
        raise DataError(f"{label} is not in the format {'::'.join(fields)} ({exc})") from None
    gaps = raw[[1, 3, 5]].notna().any(axis=1).to_numpy()
    if gaps.any():
        line = int(np.flatnonzero(gaps)[0]) + 1
        raise DataError(f"{label}, line {line}: expected {'::'.join(fields)} separated by '::'")
    ratings = pd.DataFrame(
        {
            name: integer_column(raw[column], label, name, 1)
            for name, column in zip(fields, (0, 2, 4, 6), strict=True)
        }
    )
    check_ratings(ratings, label, 1)
    return ratings


def read_ratings_csv(handle: IO[bytes], label: str) -> pd.DataFrame:
    """Parse the timestamp-free copy: a csv with a header and columns UserID, MovieID, Rating."""
    fields = ["UserID", "MovieID", "Rating"]
    try:
        raw = pd.read_csv(handle, low_memory=False)
    except _UNREADABLE as exc:
        raise DataError(f"could not read {label} as csv ({exc})") from None
    missing = [name for name in fields if name not in raw.columns]
    if missing:
        raise DataError(
            f"{label} lacks column(s) {', '.join(missing)} (expected {', '.join(fields)})"
        )
    # Line numbers count the header line.
    ratings = pd.DataFrame({name: integer_column(raw[name], label, name, 2) for name in fields})
    check_ratings(ratings, label, 2)
    return ratings


def read_users_dat(handle: IO[bytes], label: str) -> pd.DataFrame:
    """Parse UserID::Gender::Age::Occupation::Zip-code lines; zip codes stay text (leading zeros)."""
    fields = ["UserID", "Gender", "Age", "Occupation", "Zip"]
    return _read_users(handle, label, "::", fields, "UserID::Gender::Age::Occupation::Zip-code")


def read_users_100k(handle: IO[bytes], label: str) -> pd.DataFrame:
    """Parse u.user lines, user id|age|gender|occupation|zip code, into the ML-1M columns."""
    fields = ["UserID", "Age", "Gender", "Occupation", "Zip"]
    users = _read_users(handle, label, "|", fields, "user id|age|gender|occupation|zip code")
    return users[["UserID", "Gender", "Age", "Occupation", "Zip"]]


def _read_users(
    handle: IO[bytes], label: str, separator: str, fields: list[str], expected: str
) -> pd.DataFrame:
    rows, lines = [], []
    for number, line in _lines(handle):
        values = line.split(separator)
        if len(values) != len(fields):
            raise DataError(f"{label}, line {number}: expected {expected}, got {line!r}")
        rows.append(values)
        lines.append(number)
    users = pd.DataFrame(rows, columns=fields, dtype=str)
    users["UserID"] = integer_column(users["UserID"], label, "UserID", lines)
    return users


def read_movies_dat(handle: IO[bytes], label: str) -> pd.DataFrame:
    """Parse MovieID::Title::Genres lines (latin-1); a title may itself contain ':'."""
    rows, lines = [], []
    for number, line in _lines(handle):
        movie_id, _, rest = line.partition("::")
        title, separator, genres = rest.rpartition("::")
        if not separator:
            raise DataError(
                f"{label}, line {number}: expected MovieID::Title::Genres, got {line!r}"
            )
        rows.append((movie_id, title, genres))
        lines.append(number)
    movies = pd.DataFrame(rows, columns=["MovieID", "Title", "Genres"], dtype=str)
    movies["MovieID"] = integer_column(movies["MovieID"], label, "MovieID", lines)
    return movies


def read_ratings_100k(handle: IO[bytes], label: str) -> pd.DataFrame:
    """Parse u.data: user id, item id, rating, timestamp separated by tabs."""
    fields = ["UserID", "MovieID", "Rating", "Timestamp"]
    expected = "user id, item id, rating and timestamp separated by tabs"
    try:
        # One column more than expected, so that a line with a fifth field is caught below.
        raw = pd.read_csv(handle, sep="\t", header=None, names=range(5), low_memory=False)
    except _UNREADABLE as exc:  # a foreign file: say which and why, without a traceback
        raise DataError(f"{label} is not in the format {expected} ({exc})") from None
    extra = raw[4].notna().to_numpy()
    if extra.any():
        line = int(np.flatnonzero(extra)[0]) + 1
        raise DataError(f"{label}, line {line}: expected {expected}, got more fields")
    ratings = pd.DataFrame(
        {name: integer_column(raw[column], label, name, 1) for column, name in enumerate(fields)}
    )
    check_ratings(ratings, label, 1)
    return ratings


def read_movies_100k(handle: IO[bytes], label: str) -> pd.DataFrame:
    """Parse u.item lines (latin-1) into MovieID, Title, Genres.

    A line is movie id|movie title|release date|video release date|IMDb URL and then 19 genre flags
    (0 or 1, in the order of GENRES_100K); Genres joins the flagged names with "|" as in ML-1M.
    """
    rows, lines = [], []
    tail = 3 + len(GENRES_100K)  # the dates, the URL and the flags follow the title
    for number, line in _lines(handle):
        values = line.split("|")
        if len(values) < 2 + tail:
            raise DataError(
                f"{label}, line {number}: expected movie id|movie title|release date|"
                f"video release date|IMDb URL|{len(GENRES_100K)} genre flags, got {line!r}"
            )
        flags = values[-len(GENRES_100K) :]
        genres = "|".join(g for g, flag in zip(GENRES_100K, flags, strict=True) if flag == "1")
        # A title containing "|" would be split: the fields after it are counted from the end.
        rows.append((values[0], "|".join(values[1:-tail]), genres))
        lines.append(number)
    movies = pd.DataFrame(rows, columns=["MovieID", "Title", "Genres"], dtype=str)
    movies["MovieID"] = integer_column(movies["MovieID"], label, "MovieID", lines)
    return movies


def integer_column(
    values: pd.Series, label: str, field: str, line_of: int | list[int]
) -> pd.Series:
    """`values` as int64, or a DataError naming the file, line and field of the first bad value.

    `line_of` is the file line of the first row, or the file line of every row.
    """
    if pd.api.types.is_integer_dtype(values) and not values.isna().any():
        return values.astype("int64")  # the parser already read whole numbers: nothing to check
    numbers = pd.to_numeric(values, errors="coerce")
    bad = (numbers.isna() | (numbers != np.round(numbers))).to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        line = line_of[row] if isinstance(line_of, list) else line_of + row
        value = values.iloc[row]
        shown = "nothing" if pd.isna(value) else repr(value)
        raise DataError(f"{label}, line {line}: {field} must be an integer, got {shown}")
    return numbers.astype("int64")


def check_ratings(ratings: pd.DataFrame, label: str, first_line: int) -> None:
    low, high = RATING_RANGE
    outside = ~ratings["Rating"].between(low, high).to_numpy()
    if outside.any():
        row = int(np.flatnonzero(outside)[0])
        raise DataError(
            f"{label}, line {first_line + row}: Rating must be {low} to {high} stars, "
            f"got {ratings['Rating'].iloc[row]}"
        )


def zip_zone(zip_code: object) -> str:
    """US ZIP codes start with their zone, 0 (New England) to 9 (the West Coast)."""
    text = zip_code if isinstance(zip_code, str) else ""  # NaN: a user without a profile
    return f"ZIP zone {text[0]}" if text and text[0] in "0123456789" else OTHER_SILO


def zip_zone_silos(zip_codes: pd.Series, min_customers: int) -> SiloAssignment:
    """One silo per ZIP zone (`zip_codes` aligned with the users, NaN where unknown).

    Zones with fewer than `min_customers` users merge into "Other", with zip codes that do not start
    with a digit. Silos are ordered like the country silos: largest first, then by name.
    `merged_countries` lists the merged zones.
    """
    zones = zip_codes.map(zip_zone)
    sizes = zones.value_counts()
    small = sorted(z for z in sizes.index if z != OTHER_SILO and sizes[z] < min_customers)
    zones = zones.where(~zones.isin(small), OTHER_SILO)
    return dataclasses.replace(assign_silos(zones, 0), merged_countries=tuple(small))


def _lines(handle: IO[bytes]) -> Iterator[tuple[int, str]]:
    """Non-blank lines with their 1-based numbers; latin-1 decodes any byte, as the release needs."""
    text = io.TextIOWrapper(handle, encoding="latin-1", newline=None)
    for number, line in enumerate(text, 1):
        line = line.rstrip("\r\n")
        if line.strip():
            yield number, line


class _ReleaseFiles:
    """The release files in a folder or inside a zip, read in place (a zip is never extracted)."""

    def __init__(self, location: Path) -> None:
        self.location = location
        self.archive: zipfile.ZipFile | None = None
        self.members: dict[str, str] = {}

    def __enter__(self) -> _ReleaseFiles:
        if self.location.is_dir():
            self.members = {p.name: p.name for p in self.location.iterdir() if p.is_file()}
            return self
        try:
            self.archive = zipfile.ZipFile(self.location)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{self.location} is not a readable zip file ({exc})") from None
        # The official zips keep their files under ml-1m/ or ml-100k/: match on the file name alone.
        for member in self.archive.namelist():
            name = PurePosixPath(member).name
            if name and not member.startswith("__MACOSX"):
                self.members.setdefault(name, member)
        return self

    def __exit__(self, *_: object) -> None:
        if self.archive is not None:
            self.archive.close()

    def has(self, name: str) -> bool:
        return name in self.members

    def open(self, name: str) -> IO[bytes]:
        if self.archive is not None:
            return self.archive.open(self.members[name])
        return open(self.location / name, "rb")

    def label(self, name: str) -> str:
        if self.archive is not None:
            return f"{self.location}:{self.members[name]}"
        return str(self.location / name)


# Which parser reads which release file (the names differ between the releases, so one table serves).
_READERS: dict[str, Callable[[IO[bytes], str], pd.DataFrame]] = {
    "ratings.dat": read_ratings_dat,
    "ratings_no_timestamp.csv": read_ratings_csv,
    "users.dat": read_users_dat,
    "movies.dat": read_movies_dat,
    "u.data": read_ratings_100k,
    "u.user": read_users_100k,
    "u.item": read_movies_100k,
}
