"""A counting TCP relay on 127.0.0.1: how PSI's traffic is measured (spu's link keeps no counters).

A party's peer is told to reach it through the relay instead of directly; every byte the relay
forwards is counted in each direction, and kept when asked (`capture=True`), so that a test can
search what one party received for what it must not learn. The relay sees TCP bytes only: under TLS
it counts ciphertext, which is what a network carries.

The relay listens from the start and, when the party behind it is not listening yet, holds the
connection while it keeps trying: brpc, refused once, marks the address down for its health-check
interval (3 s), which would make a session whose two sides start a moment apart take 3 s longer.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class CountingRelay:
    """Forwards connections made to `address` on to `target` ("host:port"), counting bytes:
    `upstream` from whoever connects to the target, `downstream` back."""

    def __init__(
        self, target: str, capture: bool = False, patience: float = 60.0, listen: str = ""
    ):
        """`listen` ("host:port"): where the relay listens; default a free port on 127.0.0.1."""
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self._capture = capture
        self._patience = patience
        self._lock = threading.Lock()
        self.upstream = 0
        self.downstream = 0
        self._captured = {"up": bytearray(), "down": bytearray()}
        listen_host, _, listen_port = listen.rpartition(":") if listen else ("127.0.0.1", "", "0")
        self._listener = socket.create_server((listen_host, int(listen_port)))
        self.address = f"{listen_host}:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._closed = False
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def captured(self, direction: str) -> bytes:
        """What went `"up"` (to the target) or `"down"` (back), when the relay was made with
        `capture=True`."""
        with self._lock:
            return bytes(self._captured[direction])

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.close()

    def __enter__(self) -> CountingRelay:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        deadline = time.monotonic() + self._patience
        while True:
            try:
                server = socket.create_connection(self._target, timeout=10)
                break
            except OSError:
                if self._closed or time.monotonic() > deadline:
                    client.close()
                    return
                time.sleep(0.02)  # the party behind the relay is not listening yet
        server.settimeout(None)
        with self._lock:
            self._sockets += [client, server]
        for source, sink, direction in ((client, server, "up"), (server, client, "down")):
            threading.Thread(target=self._pump, args=(source, sink, direction), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str) -> None:
        try:
            while chunk := source.recv(1 << 16):
                with self._lock:
                    if direction == "up":
                        self.upstream += len(chunk)
                    else:
                        self.downstream += len(chunk)
                    if self._capture:
                        self._captured[direction] += chunk
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
