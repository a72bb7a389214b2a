"""Timestamps of a silo message's phases, in the silo's log, when `FEDSHOP_SILO_TIMING` is set.

Each line is `fedshop timing <pid> <label> <wall clock> (+<seconds since the previous mark>)`: the
wall clock lets the silo's lines be set against the server's log and the executor's.
"""

from __future__ import annotations

import logging
import os
import sys
import time

TIMING_ENV = "FEDSHOP_SILO_TIMING"
_last: list[float] = []


def enabled() -> bool:
    from fedshop.config import Environment

    return Environment.from_os().silo_timing


def mark(label: str) -> None:
    """Log `label` with the time since the previous mark of this process (if timing is on)."""
    if not enabled():
        return
    now = time.time()
    since = f" (+{now - _last[0]:.3f} s)" if _last else ""
    _last[:] = [now]
    print(f"fedshop timing {os.getpid()} {label} {now:.3f}{since}", file=sys.stderr, flush=True)


def reset() -> None:
    """A forked child starts its own sequence."""
    _last.clear()


def stamp_flower_log() -> None:
    """Flower's log lines in this process with the wall clock, as the marks."""

    def stamped(record: logging.LogRecord) -> bool:
        record.msg = f"{record.created:.3f} {record.msg}"
        return True

    logging.getLogger("flwr").addFilter(stamped)
