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
from dataclasses import dataclass

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
        setup = self.setup
        server = SecAggServer(setup)
        server_seconds, sent, client_seconds = 0.0, {}, {}
        weights = {}

        def timed(work):
            nonlocal server_seconds
            t0 = time.perf_counter()
            out = work()
            server_seconds += time.perf_counter() - t0
            return out

        def account(i: int, reply: RecordDict, size: int) -> None:
            sent[i] = sent.get(i, 0) + size
            client_seconds[i] = client_seconds.get(i, 0.0) + float(reply["secagg"]["seconds"])

        for i, reply in trained.items():
            keys, meta = reply["secagg"], reply["meta"]
            if int(keys["index"]) != i or int(meta["silo"]) != self.silos[i]:
                raise ProtectionError(f"silo {meta['silo']} answered as SecAgg client {i}")
            timed(lambda i=i, k=keys: server.collect_keys(i, (k["c-public"], k["s-public"])))
            weights[i] = float(meta["weight"])
            account(i, reply, 64)

        def step(name: str, payloads: dict[int, dict]) -> dict[int, RecordDict]:
            contents = {}
            for i, payload in payloads.items():
                record = {"step": name, "setup": setup.to_json(), "index": i}
                record["payload"] = json.dumps(payload)
                contents[i] = RecordDict({"secagg": ConfigRecord(record)})
            return exchange(name, contents)

        keys_of = {
            i: {
                "keys": {
                    str(j): [c.hex(), s.hex()]
                    for j, (c, s) in timed(lambda i=i: server.keys_for(i)).items()
                }
            }
            for i in sorted(server.public_keys)
        }
        for i, reply in step("share", keys_of).items():
            package = SharePackage.from_json(str(reply["secagg"]["package"]))
            timed(lambda i=i, p=package: server.collect_shares(i, p))
            account(i, reply, package.size())
        # Every vector is divided by the total weight of the silos that shared keys (public, as
        # without protection); the weights inside the vectors give the survivors' own total.
        normaliser = round_normaliser([weights[i] for i in server.packages])
        shares_of = {
            i: {
                "shares": blobs_to_json(timed(lambda i=i: server.shares_for(i))),
                "normaliser": normaliser,
                "bound": self.bound,
            }
            for i in sorted(server.packages)
        }
        for i, reply in step("mask", shares_of).items():
            masked = reply["masked"]["masked"].numpy()
            timed(lambda i=i, m=masked: server.collect_masked(i, m))
            account(i, reply, masked.nbytes)
        survivors, dropped = server.roster()
        if len(survivors) < max(2, needed):
            # Unmasking now would reveal the sum of fewer silos than the round promised.
            raise ProtectionError(
                f"{len(survivors)} silos sent masked updates, {max(2, needed)} needed; the round "
                "is abandoned before unmasking"
            )
        if dropped:
            log(
                f"secure aggregation: silos {[self.silos[i] for i in dropped]} dropped after sharing keys"
            )
        roster = {"survivors": survivors, "dropped": dropped}
        answers = {}
        for i, reply in step("unmask", {i: roster for i in survivors}).items():
            answers[i] = blobs_from_json(str(reply["secagg"]["answer"]))
            account(i, reply, sum(2 + len(v) for v in answers[i].values()))
        total = timed(lambda: server.finish(answers))
        tensors, weight = unflatten(total, self.layout, normaliser)
        aggregate = Aggregate(tensors=tensors, weight=weight, num_clients=len(survivors))
        cost = ProtectionCost(
            kind=self.protection.kind,
            client_seconds=[client_seconds[i] for i in survivors],
            server_seconds=server_seconds,
            bytes_sent_per_client=[sent[i] for i in survivors],
            details={
                "neighbours": max(len(v) for v in setup.graph.values()),
                "threshold": setup.threshold,
                "ring_bits": setup.ring.bits,
                "resolution": setup.ring.resolution,
                "dropped_after_shares": len(dropped),
                "dropped_before_shares": len(self.silos) - len(server.packages),
                "plaintext_bytes_per_client": vector_length(self.layout) * 4,  # as in the simulator
            },
        )
        return aggregate, [self.silos[i] for i in survivors], cost
