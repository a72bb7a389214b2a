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
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, MessageType, RecordDict

from fedshop.messages import Aggregate
from fedshop.secure.protected_sum import (
    Layout,
    round_normaliser,
    unflatten,
    vector_length,
)
from fedshop.secure.protocol import ProtectionError
from fedshop.secure.secagg import (
    RoundSetup,
    SecAggSum,
    SharePackage,
    blobs_from_json,
    blobs_to_json,
    keys_to_json,
    run_secagg_round,
)

SECAGG_MESSAGE = f"{MessageType.TRAIN}.secagg"  # the ClientApp's @app.train("secagg")

# (step name, content by index in the round) → the replies that arrived, by index
Exchange = Callable[[str, dict[int, RecordDict]], dict[int, RecordDict]]


@dataclass
class SecureRound:
    """One protected round from the server's side. `start` gives what goes with each chosen silo's
    training message; `finish` runs steps 2–4 over `exchange` and returns the unmasked sum."""

    protection: SecAggSum
    bound: float
    layout: Layout
    silos: list[int]  # the chosen silos that are sent the round, in order: index i is silos[i]
    run: str = ""  # the server's run id (`checkpoint.run_identity`): a silo keeps its files there
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
        """What goes with `silo`'s training task: the setup, its index in the round and the silo
        of every index (a silo answers a round's unmasking for one roster of silos only)."""
        assert self.setup is not None
        return {
            "secagg-setup": self.setup.to_json(),
            "secagg-index": self.silos.index(silo),
            "secagg-silos": [int(s) for s in self.silos],
        }

    def finish(self, trained: dict[int, RecordDict], exchange: Exchange, needed: int, log):
        """Steps 2–4 (`secure/secagg.py`'s one round driver) with the silos whose training replies
        (step 1) are `trained`, by index in the round. `exchange(step, contents)` sends each index
        its content and returns the replies that arrived, by index. Returns the aggregate, the
        silos in it and the round's measured cost; raises `ProtectionError` when the round cannot
        complete securely."""
        assert self.setup is not None
        parties = MessageParties(self.setup, self.silos, self.bound, trained, exchange, self.run)
        outcome = run_secagg_round(self.setup, parties, needed, self.protection.kind)
        for i, reason in sorted({**parties.rejected, **outcome.rejected}.items()):
            log(f"secure aggregation: silo {self.silos[i]}'s message refused: {reason}")
        dropped = sorted(set(outcome.server.packages) - set(outcome.survivors))
        if dropped:
            names = [self.silos[i] for i in dropped]
            log(f"secure aggregation: silos {names} dropped after sharing keys")
        tensors, weight = unflatten(outcome.total, self.layout, parties.normaliser)
        aggregate = Aggregate(tensors=tensors, weight=weight, num_clients=len(outcome.survivors))
        return aggregate, [self.silos[i] for i in outcome.survivors], outcome.cost


@dataclass
class MessageParties:
    """A round's silos reached by Flower messages (`secure.secagg.SecAggParties`). Step 1 came with
    the training replies; each later step is one exchange. Seconds are what each silo reports of
    its own protocol work; bytes what it sent."""

    setup: RoundSetup
    silos: list[int]
    bound: float
    trained: dict[int, RecordDict]
    exchange: Exchange
    run: str = ""
    seconds: dict[int, float] = field(default_factory=dict)
    sent: dict[int, int] = field(default_factory=dict)
    weights: dict[int, float] = field(default_factory=dict)
    normaliser: float = 1.0
    rejected: dict[int, str] = field(default_factory=dict)  # replies that did not decode

    def _decoded(self, replies: dict[int, RecordDict], decode) -> dict:
        """`decode(i, reply)` of each reply; one that raises is refused (the silo becomes a
        dropout of this step, which the protocol recovers from) with its reason kept."""
        out = {}
        for i, reply in replies.items():
            try:
                out[i] = decode(i, reply)
            except (KeyError, TypeError, ValueError, AttributeError, ProtectionError) as exc:
                self.rejected[i] = f"{type(exc).__name__}: {exc}"
        return out

    def _tally(self, i: int, reply: RecordDict, size: int) -> None:
        self.sent[i] = self.sent.get(i, 0) + size
        self.seconds[i] = self.seconds.get(i, 0.0) + float(reply["secagg"]["seconds"])

    def advertise(self) -> dict[int, tuple[bytes, bytes]]:
        def decode(i: int, reply: RecordDict) -> tuple[bytes, bytes]:
            advertised, meta = reply["secagg"], reply["meta"]
            if int(advertised["index"]) != i or int(meta["silo"]) != self.silos[i]:
                raise ProtectionError(f"silo {meta['silo']} answered as SecAgg client {i}")
            keys = (bytes(advertised["c-public"]), bytes(advertised["s-public"]))
            weight = float(meta["weight"])
            if not math.isfinite(weight) or weight < 0:
                raise ProtectionError(f"a weight of {weight}")
            self._tally(i, reply, sum(len(k) for k in keys))
            self.weights[i] = weight
            return keys

        return self._decoded(self.trained, decode)

    def share_keys(self, keys):
        def decode(i: int, reply: RecordDict) -> SharePackage:
            package = SharePackage.from_json(str(reply["secagg"]["package"]))
            self._tally(i, reply, package.size())
            return package

        payloads = {i: {"keys": keys_to_json(k)} for i, k in keys.items()}
        return self._decoded(self._send("share", payloads), decode)

    def masked_inputs(self, shares):
        # Every vector is divided by the total weight of the silos that shared keys (public, as
        # without protection); the weights inside the vectors give the survivors' own total.
        self.normaliser = round_normaliser([self.weights[i] for i in shares])
        payloads = {
            i: {"shares": blobs_to_json(s), "normaliser": self.normaliser, "bound": self.bound}
            for i, s in shares.items()
        }

        def decode(i: int, reply: RecordDict):
            masked = reply["masked"]["masked"].numpy()
            self._tally(i, reply, masked.nbytes)
            return masked

        return self._decoded(self._send("mask", payloads), decode)

    def unmask(self, survivors, dropped):
        roster = {"survivors": survivors, "dropped": dropped}

        def decode(i: int, reply: RecordDict) -> dict[int, bytes]:
            answer = blobs_from_json(str(reply["secagg"]["answer"]))
            self._tally(i, reply, sum(2 + len(v) for v in answer.values()))
            return answer

        return self._decoded(self._send("unmask", dict.fromkeys(survivors, roster)), decode)

    def _send(self, step: str, payloads: dict[int, dict]) -> dict[int, RecordDict]:
        common = {"step": step, "setup": self.setup.to_json(), "run": self.run}
        contents = {
            i: RecordDict(
                {"secagg": ConfigRecord({**common, "index": i, "payload": json.dumps(payload)})}
            )
            for i, payload in payloads.items()
        }
        return self.exchange(step, contents)
