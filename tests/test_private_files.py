"""Owner-only files and folders (`storage/private_files.py`): owner-only from creation on, whatever the
umask, and never half-written under their real name."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from fedshop.storage.private_files import (
    create_private_once,
    open_private_append,
    private_dir,
    private_writer,
    write_private,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask():
    """Umask 0: whatever the helpers do not restrict themselves is created readable by all."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def test_folders_are_owner_only_from_the_top_missing_one_down(tmp_path, open_umask):
    target = private_dir(tmp_path / "a" / "b" / "c")
    assert target.is_dir()
    for folder in (tmp_path / "a", tmp_path / "a" / "b", target):
        assert _mode(folder) == 0o700
    (tmp_path / "shared").mkdir(mode=0o755)
    private_dir(tmp_path / "shared" / "mine")
    assert _mode(tmp_path / "shared") == 0o755  # an existing folder is the caller's choice
    assert _mode(tmp_path / "shared" / "mine") == 0o700


def test_a_file_is_owner_only_while_it_is_written_and_after(tmp_path, open_umask):
    path = tmp_path / "state" / "round-1.pt"
    with private_writer(path) as f:
        f.write(b"private")
        # Not yet under its name; the temporary file beside it is already owner-only.
        assert not path.exists()
        (temporary,) = path.parent.iterdir()
        assert _mode(temporary) == 0o600
    assert path.read_bytes() == b"private" and _mode(path) == 0o600
    assert list(path.parent.iterdir()) == [path]
    write_private(path, "again")
    assert path.read_text() == "again" and _mode(path) == 0o600


def test_a_failed_write_leaves_the_previous_file(tmp_path, open_umask):
    path = write_private(tmp_path / "record.json", "first")
    with pytest.raises(RuntimeError), private_writer(path) as f:
        f.write(b"half")
        raise RuntimeError("killed halfway")
    assert path.read_text() == "first" and list(tmp_path.iterdir()) == [path]


def test_a_secret_is_made_once_and_every_racer_reads_the_winner(tmp_path, open_umask):
    path = tmp_path / "run" / "secret"
    seen = []

    def make(value: bytes) -> None:
        seen.append(create_private_once(path, value))

    threads = [threading.Thread(target=make, args=(bytes([i]) * 32,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(seen)) == 1 and seen[0] == path.read_bytes()
    assert _mode(path) == 0o600 and list(path.parent.iterdir()) == [path]
    assert create_private_once(path, b"other") == seen[0]


def test_a_log_is_owner_only_and_an_old_readable_one_is_tightened(tmp_path, open_umask):
    new = tmp_path / "logs" / "silo-0.log"
    with open_private_append(new) as log:
        log.write(b"one\n")
    with open_private_append(new, "a") as log:
        log.write("two\n")
    assert new.read_text() == "one\ntwo\n" and _mode(new) == 0o600
    old = tmp_path / "old.log"
    old.write_text("error: a customer's row\n")
    old.chmod(0o644)
    open_private_append(old).close()
    assert _mode(old) == 0o600 and old.read_text() == "error: a customer's row\n"
