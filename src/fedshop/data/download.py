"""Download a file once into a local cache, verify it, and fail clearly when offline."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import platformdirs

from fedshop.config import Environment
from fedshop.errors import DataError


def cache_dir(configured: str | None = None) -> Path:
    """Where downloads are kept: `configured` (not given: `$FEDSHOP_CACHE_DIR`), else the user's
    cache folder."""
    if configured is None:
        configured = Environment.from_os().cache_dir
    return Path(configured) if configured else Path(platformdirs.user_cache_dir("fedshop"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(
    url: str,
    filename: str,
    sha256: str | None = None,
    timeout: float = 60.0,
    cache: str | None = None,
) -> Path:
    """Return a cached copy of `url` in `cache_dir(cache)`, downloading it first if needed.

    With `sha256` the file is checked against it (a mismatch deletes the bad copy and raises).
    Without one (the publisher gives none), the digest of the first download is written beside the
    file and later reads are checked against it, so a corrupted cache never passes silently.
    """
    target = cache_dir(cache) / filename
    pinned = target.with_name(target.name + ".sha256")
    if not target.exists():
        _download(url, target, timeout)
        actual = sha256_of(target)
        if sha256 is not None and actual != sha256:
            target.unlink()
            raise DataError(
                f"checksum mismatch for {url}: expected sha256 {sha256}, got {actual}; "
                "the download was deleted, try again or pass the file with --data-path"
            )
        pinned.write_text(actual + "\n")
        return target
    expected = sha256 or (pinned.read_text().strip() if pinned.exists() else None)
    if expected is not None and sha256_of(target) != expected:
        raise DataError(
            f"cached file {target} does not match its checksum; delete it and run again"
        )
    return target


def _download(url: str, target: Path, timeout: float) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary file first so an interrupted download never looks complete.
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".part") as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                shutil.copyfileobj(response, tmp)
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            tmp.close()
            Path(tmp.name).unlink(missing_ok=True)
            reason = getattr(exc, "reason", exc)
            raise DataError(
                f"could not download {url} ({reason}); if this machine is offline, put the file in "
                "a data directory (FEDSHOP_DATA_DIR or data.data_dir) or pass --data-path"
            ) from None
    os.replace(tmp.name, target)
