"""Downloads against a real HTTP server on 127.0.0.1."""

import hashlib
import http.server
import socket
import threading
from functools import partial

import pytest

from fedshop.data.download import fetch
from fedshop.errors import DataError


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "data.bin").write_bytes(b"fedshop" * 1000)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSHOP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_downloads_once_then_uses_the_cache(server, cache):
    url, root = server
    digest = hashlib.sha256(b"fedshop" * 1000).hexdigest()
    path = fetch(f"{url}/data.bin", "data.bin", sha256=digest)
    assert path.read_bytes() == b"fedshop" * 1000
    (root / "data.bin").unlink()  # the server no longer has it: the cache must serve
    assert fetch(f"{url}/data.bin", "data.bin", sha256=digest) == path


def test_checksum_mismatch_deletes_the_download(server, cache):
    url, _ = server
    with pytest.raises(DataError, match="checksum mismatch"):
        fetch(f"{url}/data.bin", "data.bin", sha256="0" * 64)
    assert not (cache / "data.bin").exists()


def test_corrupted_cache_is_detected_without_a_published_checksum(server, cache):
    url, _ = server
    path = fetch(f"{url}/data.bin", "data.bin")
    path.write_bytes(b"tampered")
    with pytest.raises(DataError, match="does not match its checksum"):
        fetch(f"{url}/data.bin", "data.bin")


def test_offline_is_a_clear_error(cache):
    with socket.socket() as probe:  # a port on loopback with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DataError, match=r"could not download .* offline"):
        fetch(f"http://127.0.0.1:{port}/x.zip", "x.zip", timeout=5)
    assert not list(cache.glob("*.part"))


def test_missing_remote_file(server):
    url, _ = server
    with pytest.raises(DataError, match="could not download"):
        fetch(f"{url}/absent.bin", "absent.bin")
