"""Files and folders only their owner may read: a deployment's keys, secrets, private vectors, logs.

Each is owner-only from the moment it exists, whatever the process's umask: never created readable
and tightened after (a window in which another user on the host could open it and keep the file
descriptor). Files are written under a fresh temporary name in the same folder and moved into
place, so a reader, or a process killed halfway, never leaves half a file under the real name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

FILE_MODE = 0o600
FOLDER_MODE = 0o700


def private_dir(path: str | Path) -> Path:
    """`path` and its missing parents, each made owner-only; a folder that exists is left as it is
    (it was someone's choice, and what lands in it is owner-only anyway)."""
    path = Path(path)
    missing = []
    folder = path
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, FOLDER_MODE)
        except FileExistsError:
            if not folder.is_dir():
                raise
            continue  # made meanwhile by another process of the deployment
        # mkdir's mode is masked by the umask; setting it on the new, still empty folder opens
        # no window to its contents.
        os.chmod(folder, FOLDER_MODE)
    return path


@contextlib.contextmanager
def private_writer(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """A file object whose content replaces `path` (owner-only) when the block ends without error;
    on error `path` is left as it was."""
    path = Path(path)
    private_dir(path.parent)
    # mkstemp opens a new name exclusively with mode 0600 (less under a stricter umask, never more).
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # on disk before it takes the name: a record others rely on
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_private(path: str | Path, data: bytes | str) -> Path:
    """Replace `path` with `data` (text is UTF-8), owner-only, in one step."""
    with private_writer(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def create_private_once(path: str | Path, data: bytes) -> bytes:
    """The content of `path`, made with `data` first when there is no such file. Of processes that
    race to make it, one wins and all read its content."""
    path = Path(path)
    if not path.exists():
        private_dir(path.parent)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(descriptor, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)  # fails when another process made it first
        finally:
            os.unlink(temporary)
    return path.read_bytes()


def open_private_append(path: str | Path, mode: str = "ab") -> IO:
    """`path` opened for appending (a log), made owner-only when it is new."""
    path = Path(path)
    private_dir(path.parent)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
    # A log left by an older version may be readable by others: it holds errors, tighten it.
    os.fchmod(descriptor, FILE_MODE)
    return os.fdopen(descriptor, mode)
