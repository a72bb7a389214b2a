"""An open-loop HTTP/1.1 load generator: requests at a fixed arrival rate, whatever the responses.

Request i is due at t0 + i/rate. It is sent then on an idle keep-alive connection (a new one when
none is idle, up to `max_connections`; beyond that it waits for one) and its latency is measured from
its *due* time to the end of its response, so time spent queueing (in the server, or here waiting
for a connection) counts: no coordinated omission. A closed-loop client (send, wait, send) would
slow down with the server and hide exactly the queueing that an overloaded server causes.

Raw asyncio streams on uvloop rather than an HTTP client library: the generator shares the 2 cores
with the server, so its own cost per request must stay small (benchmarks/serving.py measures it
against a trivial endpoint and reports it). Responses are read by Content-Length (what uvicorn sends
for a JSON body); anything else is an error.

    python benchmarks/load_generator.py --url http://127.0.0.1:8000/health --rate 200 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
    uvloop = None


@dataclass
class LoadResult:
    rate: float  # requests per second asked for
    seconds: float  # the schedule's length
    latencies_ms: np.ndarray  # per request, from its due time; NaN where it failed
    statuses: np.ndarray  # HTTP status per request (0: no response)
    send_lag_ms: np.ndarray  # how late the generator sent each request (its own overload)
    generator_cpu_seconds: float
    wall_seconds: float
    connections: int
    errors: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.latencies_ms)

    @property
    def ok(self) -> int:
        return int(((self.statuses >= 200) & (self.statuses < 300)).sum())

    def percentile(self, q: float) -> float:
        """Latency percentile in ms (nearest rank), failed requests counted as infinitely slow."""
        values = np.where(np.isnan(self.latencies_ms), np.inf, self.latencies_ms)
        return float(np.percentile(values, q, method="higher")) if len(values) else float("nan")

    def summary(self) -> dict:
        achieved = self.ok / self.wall_seconds if self.wall_seconds else 0.0
        return {
            "rate": self.rate,
            "seconds": self.seconds,
            "requests": self.requests,
            "ok": self.ok,
            "achieved_rps": round(achieved, 1),
            "p50_ms": _ms(self.percentile(50)),
            "p90_ms": _ms(self.percentile(90)),
            "p99_ms": _ms(self.percentile(99)),
            "max_ms": _ms(self.percentile(100)),
            "send_lag_p99_ms": round(float(np.percentile(self.send_lag_ms, 99)), 3),
            "generator_cpu_ms_per_request": round(
                1000 * self.generator_cpu_seconds / max(1, self.requests), 4
            ),
            "connections": self.connections,
            "errors": self.errors[:5],
        }


def _ms(value: float) -> float | None:
    """A latency for JSON: None where a failed request makes it infinite."""
    return round(value, 3) if np.isfinite(value) else None


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.answered = 0  # responses read on this connection

    async def get(self, request: bytes) -> int:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise ValueError("response without Content-Length")
        await self.reader.readexactly(length)
        self.answered += 1
        return status

    def close(self) -> None:
        self.writer.close()


async def _run(
    host: str,
    port: int,
    path_of: Callable[[int], str],
    rate: float,
    seconds: float,
    max_connections: int,
    timeout: float,
) -> LoadResult:
    n = max(1, int(rate * seconds))
    latencies = np.full(n, np.nan)
    statuses = np.zeros(n, dtype=np.int32)
    lag = np.zeros(n)
    errors: list[str] = []
    idle: list[_Connection] = []
    freed = asyncio.Condition()
    opened = 0
    requests = [
        f"GET {path_of(i)} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode() for i in range(n)
    ]

    async def connection(fresh: bool = False) -> _Connection:
        """An idle kept-alive connection, else a new one (`fresh`: a new one while allowed)."""
        nonlocal opened
        while True:
            if idle and not (fresh and opened < max_connections):
                return idle.pop()
            if opened < max_connections:
                opened += 1
                try:
                    return _Connection(*await asyncio.open_connection(host, port))
                except OSError:
                    opened -= 1
                    raise
            async with freed:
                await freed.wait()

    async def release(conn: _Connection | None) -> None:
        nonlocal opened
        if conn is None:
            opened -= 1  # a broken connection: a new one may take its place
        else:
            idle.append(conn)
        async with freed:
            freed.notify()

    async def one(i: int, due: float) -> None:
        # A kept-alive connection the server has closed meanwhile (uvicorn closes idle ones after
        # 5 s) fails at once: the request is sent again once on a new connection (not another idle
        # one, which may be as stale), as HTTP clients do. Its latency still runs from its due time.
        for attempt in (1, 2):
            conn = None
            try:
                conn = await asyncio.wait_for(connection(fresh=attempt > 1), timeout)
                statuses[i] = await asyncio.wait_for(conn.get(requests[i]), timeout)
                latencies[i] = (time.perf_counter() - due) * 1000
                await release(conn)
                return
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
                stale = conn is not None and conn.answered > 0 and not isinstance(exc, TimeoutError)
                if conn is not None:
                    conn.close()
                    await release(None)
                if stale and attempt == 1:
                    continue
                if len(errors) < 20:
                    errors.append(f"request {i}: {type(exc).__name__}: {exc}")
                return

    cpu_started = time.process_time()
    # perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds.
    t0 = time.perf_counter() + 0.05
    tasks = []
    for i in range(n):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lag[i] = max(0.0, time.perf_counter() - due) * 1000
        tasks.append(asyncio.ensure_future(one(i, due)))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu_started
    for conn in idle:
        conn.close()
    return LoadResult(rate, seconds, latencies, statuses, lag, cpu, wall, opened, errors)


def run_load(
    url: str,
    rate: float,
    seconds: float,
    path_of: Callable[[int], str] | None = None,
    max_connections: int = 256,
    timeout: float = 10.0,
) -> LoadResult:
    """Drive `url` (its host and port; the path from `path_of(i)` when given) at `rate` requests/s
    for `seconds`."""
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    path_of = path_of or (lambda i: path)
    coroutine = _run(
        parts.hostname, parts.port or 80, path_of, rate, seconds, max_connections, timeout
    )
    if uvloop is not None:
        return uvloop.run(coroutine)
    return asyncio.run(coroutine)


async def _fixed_responder(port: int) -> None:
    """An HTTP/1.1 server that answers every request at once with a fixed small JSON body: what
    the generator measures against it is the generator's own (and the loopback's) latency."""
    body = b'{"status":"ok"}'
    response = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(response)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url")
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--fixed-responder", type=int, metavar="PORT", help="serve, not load")
    args = parser.parse_args()
    if args.fixed_responder:
        runner = uvloop.run if uvloop is not None else asyncio.run
        runner(_fixed_responder(args.fixed_responder))
        return
    if not args.url:
        parser.error("--url is required")
    print(json.dumps(run_load(args.url, args.rate, args.seconds).summary(), indent=2))


if __name__ == "__main__":
    main()
