"""MovieLens 1M (GroupLens; Harper & Konstan 2015): 1,000,209 ratings of 3,706 movies by 6,040 users.

Reads the official release files from a folder or from inside the official zip (never extracted):
- ratings.dat  UserID::MovieID::Rating::Timestamp
- users.dat    UserID::Gender::Age::Occupation::Zip-code
- movies.dat   MovieID::Title::Genres, latin-1
A folder may hold ratings_no_timestamp.csv (columns UserID, MovieID, Rating) instead of ratings.dat;
that copy has no timestamps, so a leave-one-out split on it has to pick the held-out items at random.
The data is licensed for research use only: it is read from the user's copy or downloaded, never shipped.
"""

from __future__ import annotations

import dataclasses
import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np
import pandas as pd

from fedshop.data.partition import SiloAssignment, assign_silos
from fedshop.errors import DataError

OFFICIAL_URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
# The official zip (5,917,549 bytes) as recorded in tensorflow_datasets' url_checksums/movielens.txt.
OFFICIAL_SHA256 = "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20"
OFFICIAL_ZIP = "ml-1m.zip"
# Looked for inside a data directory, in order: a folder of release files, or the official zip.
DATA_DIR_CANDIDATES = ("movielens-1m", "ml-1m", OFFICIAL_ZIP)
RATINGS_FILES = ("ratings.dat", "ratings_no_timestamp.csv")
OTHER_SILO = "Other"
RATING_RANGE = (1, 5)


@dataclass(frozen=True)
class MovieLens:
    """The three release tables, as read."""

    ratings: pd.DataFrame  # UserID, MovieID, Rating and, from ratings.dat, Timestamp; file order
    users: pd.DataFrame  # UserID, Gender, Age, Occupation, Zip (all text but UserID)
    movies: pd.DataFrame  # MovieID, Title, Genres
    ratings_file: str  # which ratings file was read

    @property
    def has_timestamps(self) -> bool:
        return "Timestamp" in self.ratings.columns


def is_release(location: Path) -> bool:
    """Whether `location` is a zip file or a folder holding one of the ratings files."""
    if location.is_dir():
        return any((location / name).is_file() for name in RATINGS_FILES)
    return location.is_file() and location.suffix.lower() == ".zip"


def resolve_location(path: str | None, data_dir: str | None) -> tuple[Path, str] | None:
    """The folder or zip to read: `path`, else a data directory; None means nothing local was found.

    Returns the location and a short description of where it came from (for the data report).
    """
    if path:
        location = Path(path).expanduser()
        if not location.exists():
            raise DataError(f"MovieLens-1M path not found: {location}")
        if location.is_file() and location.name in RATINGS_FILES:
            location = location.parent  # a ratings file names its release folder
        if not is_release(location):
            raise DataError(
                f"{location} is neither the official {OFFICIAL_ZIP} nor a folder holding "
                f"{' or '.join(RATINGS_FILES)}"
            )
        return location, f"{'folder' if location.is_dir() else 'file'} {location}"
    if data_dir:
        base = Path(data_dir).expanduser()
        if not base.is_dir():
            raise DataError(f"data directory not found: {base}")
        for candidate in DATA_DIR_CANDIDATES:
            if is_release(base / candidate):
                return base / candidate, f"data directory {base / candidate}"
    return None


def read_movielens(location: Path) -> MovieLens:
    """Read ratings, users and movies from a release folder or the official zip."""
    with _ReleaseFiles(location) as files:
        ratings_file = next((name for name in RATINGS_FILES if files.has(name)), None)
        if ratings_file is None:
            raise DataError(f"{location} holds neither {' nor '.join(RATINGS_FILES)}")
        for required in ("users.dat", "movies.dat"):
            if not files.has(required):
                raise DataError(f"{location} has no {required} (the MovieLens-1M release has it)")
        reader = read_ratings_dat if ratings_file == "ratings.dat" else read_ratings_csv
        with files.open(ratings_file) as handle:
            ratings = reader(handle, files.label(ratings_file))
        with files.open("users.dat") as handle:
            users = read_users_dat(handle, files.label("users.dat"))
        with files.open("movies.dat") as handle:
            movies = read_movies_dat(handle, files.label("movies.dat"))
    if ratings.empty:
        raise DataError(f"{files.label(ratings_file)} holds no ratings")
    return MovieLens(ratings=ratings, users=users, movies=movies, ratings_file=ratings_file)


def read_ratings_dat(handle: IO[bytes], label: str) -> pd.DataFrame:
    """Parse UserID::MovieID::Rating::Timestamp lines."""
    fields = ["UserID", "MovieID", "Rating", "Timestamp"]
    try:
        # The fast C parser cannot split on "::": split on ":" and check the empty fields between.
        raw = pd.read_csv(handle, sep=":", header=None, names=range(7), low_memory=False)
    except Exception as exc:  # a foreign file: say which and why, without a traceback
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
    except Exception as exc:
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
    rows, lines = [], []
    for number, line in _lines(handle):
        values = line.split("::")
        if len(values) != len(fields):
            raise DataError(
                f"{label}, line {number}: expected UserID::Gender::Age::Occupation::Zip-code, "
                f"got {line!r}"
            )
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
        # The official zip keeps its files under ml-1m/: match on the file name alone.
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
