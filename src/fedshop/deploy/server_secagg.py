"""The server's side of secure aggregation in a deployment: the simulator's `SecAggServer` over Flower.

A protected round is the simulator's SecAgg round (`secure/secagg.py`) with each step a message
exchange: the training message announces the round's setup and each silo's reply advertises its keys
(step 1); then the server routes public keys (step 2), encrypted shares and the round's total weight
(step 3) and the roster of survivors and dropouts (step 4). The server sees masked vectors and their
sum, never a silo's update. Silos that fail or time out at any step are dropouts, recovered as the
protocol allows; if fewer than the round needs remain before unmasking, the round is abandoned
without unmasking anything and retried with fresh keys.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from flwr.app import ConfigRecord, MessageType, RecordDict

from fedshop.fl.stages import Aggregate, AggregationPipeline, ClientMessage
from fedshop.models.spec import Params
from fedshop.secure.protocol import ProtectionCost, ProtectionError
from fedshop.secure.secagg import (
    RoundSetup,
    SecAggServer,
    SecAggSum,
    SharePackage,
    blobs_from_json,
    blobs_to_json,
    keys_to_json,
    round_details,
)
from fedshop.secure.stage import Layout, layout_of, round_normaliser, unflatten, vector_length

SECAGG_MESSAGE = f"{MessageType.TRAIN}.secagg"  # the ClientApp's @app.train("secagg")

# (step name, content by index in the round) → the replies that arrived, by index
Exchange = Callable[[str, dict[int, RecordDict]], dict[int, RecordDict]]


def expected_layout(pipeline: AggregationPipeline, shared: Params) -> Layout:
    """The layout of every silo's staged message: the client stages applied to an update of the
    shared model's shape (what they add, such as FedNova's step count, is part of it)."""
    zero = {k: torch.zeros_like(v) for k, v in shared.items()}
    return layout_of(pipeline.on_client(ClientMessage(zero, 1.0, 1.0, 1)))


@dataclass
class SecureRound:
    """One protected round from the server's side. `start` gives what goes with each chosen silo's
    training message; `finish` runs steps 2–4 over `exchange` and returns the unmasked sum."""

    protection: SecAggSum
    bound: float
    layout: Layout
    silos: list[int]  # the chosen silos that are sent the round, in order: index i is silos[i]
    setup: RoundSetup | None = None

    def start(self) -> None:
        """Draw the round's setup: fresh session, neighbourhoods, threshold, ring."""
        if len(self.silos) < 2:
            raise ProtectionError(
                f"{len(self.silos)} of the round's silos are online; secure aggregation needs "
                "at least two"
            )
        length = vector_length(self.layout)
        self.setup = self.protection.setup_for(len(self.silos), length, self.bound)

    def task_for(self, silo: int) -> dict:
        """What goes with `silo`'s training task: the setup and its index in the round."""
        assert self.setup is not None
        return {"secagg-setup": self.setup.to_json(), "secagg-index": self.silos.index(silo)}

    def finish(self, trained: dict[int, RecordDict], exchange: Exchange, needed: int, log):
        """Steps 2–4 with the silos whose training replies (step 1) are `trained`, by index in the
        round. `exchange(step, contents)` sends each index its content and returns the replies
        that arrived, by index. Returns the aggregate, the silos in it and the round's measured
        cost; raises `ProtectionError` when the round cannot complete securely."""
        assert self.setup is not None
        server, tally = SecAggServer(self.setup), _Tally()
        weights = self._collect_keys(server, trained, tally)
        for i, reply in self._send(exchange, "share", self._keys_step(server, tally)).items():
            package = SharePackage.from_json(str(reply["secagg"]["package"]))
            tally.server(lambda i=i, p=package: server.collect_shares(i, p))
            tally.client(i, reply, package.size())
        # Every vector is divided by the total weight of the silos that shared keys (public, as
        # without protection); the weights inside the vectors give the survivors' own total.
        normaliser = round_normaliser([weights[i] for i in server.packages])
        shares = {
            i: {
                "shares": blobs_to_json(tally.server(lambda i=i: server.shares_for(i))),
                "normaliser": normaliser,
                "bound": self.bound,
            }
            for i in sorted(server.packages)
        }
        for i, reply in self._send(exchange, "mask", shares).items():
            masked = reply["masked"]["masked"].numpy()
            tally.server(lambda i=i, m=masked: server.collect_masked(i, m))
            tally.client(i, reply, masked.nbytes)
        survivors, dropped = server.roster()
        if len(survivors) < max(2, needed):
            # Unmasking now would reveal the sum of fewer silos than the round promised.
            raise ProtectionError(
                f"{len(survivors)} silos sent masked updates, {max(2, needed)} needed; the round "
                "is abandoned before unmasking"
            )
        if dropped:
            names = [self.silos[i] for i in dropped]
            log(f"secure aggregation: silos {names} dropped after sharing keys")
        roster = {"survivors": survivors, "dropped": dropped}
        answers = {}
        for i, reply in self._send(exchange, "unmask", dict.fromkeys(survivors, roster)).items():
            answers[i] = blobs_from_json(str(reply["secagg"]["answer"]))
            tally.client(i, reply, sum(2 + len(v) for v in answers[i].values()))
        total = tally.server(lambda: server.finish(answers))
        tensors, weight = unflatten(total, self.layout, normaliser)
        aggregate = Aggregate(tensors=tensors, weight=weight, num_clients=len(survivors))
        details = round_details(self.setup, len(dropped), len(self.silos) - len(server.packages))
        cost = tally.cost(self.protection.kind, survivors, details)
        return aggregate, [self.silos[i] for i in survivors], cost

    def _collect_keys(self, server: SecAggServer, trained, tally: _Tally) -> dict[int, float]:
        """Step 1's replies: each silo's public keys and its weight."""
        weights = {}
        for i, reply in trained.items():
            keys, meta = reply["secagg"], reply["meta"]
            if int(keys["index"]) != i or int(meta["silo"]) != self.silos[i]:
                raise ProtectionError(f"silo {meta['silo']} answered as SecAgg client {i}")
            public = (keys["c-public"], keys["s-public"])
            tally.server(lambda i=i, k=public: server.collect_keys(i, k))
            tally.client(i, reply, sum(len(k) for k in public))
            weights[i] = float(meta["weight"])
        return weights

    def _keys_step(self, server: SecAggServer, tally: _Tally) -> dict[int, dict]:
        return {
            i: {"keys": keys_to_json(tally.server(lambda i=i: server.keys_for(i)))}
            for i in sorted(server.public_keys)
        }

    def _send(self, exchange: Exchange, step: str, payloads: dict[int, dict]):
        assert self.setup is not None
        setup = self.setup.to_json()
        contents = {
            i: RecordDict(
                {
                    "secagg": ConfigRecord(
                        {"step": step, "setup": setup, "index": i, "payload": json.dumps(payload)}
                    )
                }
            )
            for i, payload in payloads.items()
        }
        return exchange(step, contents)


@dataclass
class _Tally:
    """What a round cost: the server's own protocol seconds, and each silo's reported seconds and
    the bytes it sent."""

    server_seconds: float = 0.0
    client_seconds: dict[int, float] = field(default_factory=dict)
    sent: dict[int, int] = field(default_factory=dict)

    def server(self, work):
        started = time.perf_counter()
        out = work()
        self.server_seconds += time.perf_counter() - started
        return out

    def client(self, i: int, reply: RecordDict, size: int) -> None:
        self.sent[i] = self.sent.get(i, 0) + size
        seconds = float(reply["secagg"]["seconds"])
        self.client_seconds[i] = self.client_seconds.get(i, 0.0) + seconds

    def cost(self, kind: str, survivors: list[int], details: dict) -> ProtectionCost:
        return ProtectionCost(
            kind=kind,
            client_seconds=[self.client_seconds[i] for i in survivors],
            server_seconds=self.server_seconds,
            bytes_sent_per_client=[self.sent[i] for i in survivors],
            details=details,
        )
