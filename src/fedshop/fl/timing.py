"""The simulated clock: how long each client takes for its part of a round ([communication]).

A client's part of a round takes

    model bytes / its downlink speed + examples × epochs × its seconds per example
    + message bytes / its uplink speed

`client_speeds = "equal"`: every client at the configured medians. `"lognormal"`: each client's
compute speed and both link speeds are drawn once per run (a slow phone stays slow), log-normally
around the medians with σ `speed_sigma`, independently. Log-normal because measured populations of
device speeds and mobile bandwidths are right-skewed with long tails (FedScale's device traces,
Lai et al. ICML 2022; Ookla's mobile speed reports); it is a parametric stand-in, stated as such:
no public trace can be fetched on this machine. At σ = 1 one client in ten is at least 3.6× slower
than the median, one in a hundred 10×. The medians default to 2 ms per example and epoch (a phone's
embedding step), 5 Mbit/s up and 20 Mbit/s down (mobile links).

A started client drops out (never reports) with probability `dropout`, drawn at each start. A
synchronous server cannot tell a dropout from a slow client: it waits for `round_timeout` before it
closes the round without it.

The draws come from the run's seed: a run's clock is reproducible (it is not privacy noise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedshop.config import CommunicationConfig
from fedshop.seeding import derive_seed

BITS_PER_BYTE = 8


@dataclass
class ClientClock:
    seconds_per_example: np.ndarray  # per client, per training example and epoch
    uplink_bytes_per_second: np.ndarray
    downlink_bytes_per_second: np.ndarray
    dropout: float
    round_timeout: float  # seconds a synchronous round waits for a client that dropped out
    _draws: np.random.Generator

    @classmethod
    def of(cls, config: CommunicationConfig, n_clients: int, seed: int) -> ClientClock:
        rng = np.random.default_rng(derive_seed(seed, "clock", "speeds"))
        sigma = config.speed_sigma if config.client_speeds == "lognormal" else 0.0

        def spread(median: float) -> np.ndarray:
            return median * np.exp(sigma * rng.standard_normal(n_clients))

        compute = spread(config.seconds_per_example)
        # A fast link is a large number: divide the median by the spread, so slow is the tail.
        uplink = config.uplink_mbps * 1e6 / BITS_PER_BYTE / spread(1.0)
        downlink = config.downlink_mbps * 1e6 / BITS_PER_BYTE / spread(1.0)
        return cls(
            compute, uplink, downlink, config.dropout, config.round_timeout,
            np.random.default_rng(derive_seed(seed, "clock", "dropouts")),
        )  # fmt: skip

    def duration(
        self, client: int, examples: float, epochs: int, sent: int, received: int
    ) -> float:
        """Seconds from the model's dispatch to `client` until its message is at the server."""
        return (
            received / self.downlink_bytes_per_second[client]
            + examples * epochs * self.seconds_per_example[client]
            + sent / self.uplink_bytes_per_second[client]
        )

    def drop_outs(self, clients: Sequence[int]) -> set[int]:
        """Which of the clients just started will never report (one draw per start)."""
        if self.dropout <= 0:
            return set()
        lost = self._draws.random(len(clients)) < self.dropout
        return {c for c, gone in zip(clients, lost, strict=True) if gone}

    def timeout(self, durations: Sequence[float]) -> float:
        """How long a synchronous round waits before it gives a silent client up."""
        if self.round_timeout > 0:
            return self.round_timeout
        return 3.0 * float(np.median(durations)) if len(durations) else 0.0


def synchronous_round_seconds(
    clock: ClientClock, durations: dict[int, float], dropped: set[int]
) -> float:
    """A synchronous round ends when its slowest reporting client's message arrives, or, when one
    of its clients dropped out, at the timeout (whichever is later)."""
    reported = [d for c, d in durations.items() if c not in dropped]
    end = max(reported, default=0.0)
    if dropped:
        end = max(end, clock.timeout(list(durations.values())))
    return end
