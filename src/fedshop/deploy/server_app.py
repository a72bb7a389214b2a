"""The server's side of a deployment: FedShop's round driver carried over Flower's Grid.

The round is `fl/rounds.py`'s `RoundDriver`, the simulator's: the same `FederatedServer` samples
silos, the same pipeline and server optimiser apply their updates; each silo trains with the same
`SiloClient` in its own process (`silo_app.py`). `GridTransport` is only the transport, so a
deployment and the simulator build the same model for the same seed.

Rounds and failures: a round goes to the sampled silos that are online; replies that fail or do not
arrive within `round-timeout` seconds count as dropouts, and the round is applied when at least
`min-silos` replies arrived (else the driver waits for silos to come back and retries it, applying
nothing). A checkpoint is written after every round; a restarted server resumes from it.

Run config (set by `fedshop deploy`, see the app's pyproject.toml): `config-path` (the run's TOML on
the server host), `out-dir` (where the server writes checkpoints and its outcome), `silos` (how many
silos the federation has), `min-silos`, `round-timeout`, `wait-timeout`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedshop.config import RunConfig, load_config
from fedshop.deploy import wire
from fedshop.deploy.checkpoint import (
    config_digest,
    load_checkpoint,
    run_identity,
    save_checkpoint,
)
from fedshop.deploy.fedbuff import Arrived, InFlight
from fedshop.deploy.identities import IdentityError, SiloNodes
from fedshop.deploy.outcome import Outcome
from fedshop.deploy.server_secagg import SECAGG_MESSAGE, SecureRound
from fedshop.errors import FedShopError
from fedshop.eval.metrics import MetricSums, summarise
from fedshop.fl.audit import hash_message
from fedshop.fl.buffered import discounted, staleness_weight
from fedshop.fl.client import LocalTask
from fedshop.fl.fit_silo import FitShapes, FitSummaries, fit_pipeline, make_fit_server
from fedshop.fl.in_process import make_server, server_pipeline
from fedshop.fl.robust import expected_layout
from fedshop.fl.rounds import (
    FinalEvaluation,
    IncompleteRoundError,
    RoundDriver,
    RoundReply,
    Traffic,
)
from fedshop.fl.server import FederatedServer
from fedshop.fl.tabular_silo import (
    TASK_KINDS,
    BinarySummaries,
    ForecastSummaries,
    TableSchema,
    make_tabular_server,
    shape_of,
    tabular_pipeline,
)
from fedshop.messages import AggregationPipeline
from fedshop.models.spec import Params
from fedshop.secure.protected_sum import make_protection, summarise_costs
from fedshop.secure.protocol import SecureSum
from fedshop.storage.private_files import open_private_append, private_dir, write_private

_POLL_SECONDS = 0.2  # Grid.send_and_receive sleeps 3 s between polls; rounds are shorter here


_TABLE_SCHEMA = ("kind", "horizon", "cardinalities", "n-numeric")


def message_bytes(message: Message) -> int:
    """A Flower message's size on the wire: its serialised protobuf (`flwr.common.serde`'s
    `message_to_proto`, metadata, content and error), as the Grid and the Fleet API carry it."""
    from flwr.common.serde import message_to_proto

    return message_to_proto(message).ByteSize()


class TrafficMeter:
    """The bytes of the Flower messages the server sent to each silo and received from it, since
    `start`; as `Traffic` from the silos' side (a silo's `received` is what the server sent it)."""

    def __init__(self) -> None:
        self.to_silo: dict[int, int] = {}
        self.from_silo: dict[int, int] = {}

    def start(self) -> None:
        self.to_silo, self.from_silo = {}, {}

    def sent(self, silo: int | None, message: Message) -> None:
        if silo is not None:
            self.to_silo[silo] = self.to_silo.get(silo, 0) + message_bytes(message)

    def received(self, silo: int | None, message: Message) -> None:
        if silo is not None:
            self.from_silo[silo] = self.from_silo.get(silo, 0) + message_bytes(message)

    def traffic(self) -> Traffic:
        return Traffic(dict(self.from_silo), dict(self.to_silo), source="flower")


def hello_shapes(info: ConfigRecord) -> dict[str, Any]:
    """What a hello says of the model's shape: a shop's catalogue sizes (fit), a storefront's
    table schema (retail tasks), or nothing (a recommender's, whose catalogue is `n-items`). A
    malformed value raises KeyError, TypeError or ValueError."""
    shapes: dict[str, Any] = {k: int(info[k]) for k in ("n-products", "n-features") if k in info}
    if "kind" in info:
        shapes["kind"] = str(info["kind"])
        shapes["horizon"] = int(info["horizon"])
        shapes["n-numeric"] = int(info["n-numeric"])
        cardinalities = info["cardinalities"]
        if not isinstance(cardinalities, list):
            raise TypeError("cardinalities must be a list")
        shapes["cardinalities"] = tuple(int(c) for c in cardinalities)
        if min(shapes["cardinalities"], default=1) < 1 or shapes["n-numeric"] < 0:
            raise ValueError("a table schema of empty vocabularies or negative columns")
    return shapes


class Federation:
    """Which node serves which silo: the operator's map (`identities.py`) from registered node keys
    to silos, confirmed by each node's hello, refreshed as nodes come and go."""

    def __init__(
        self,
        grid: Grid,
        n_silos: int,
        round_timeout: float,
        log,
        registered: SiloNodes,
        read_metrics=wire.record_metrics,
    ) -> None:
        self.grid = grid
        self.log = log
        self.n_silos = n_silos
        self.round_timeout = round_timeout
        self.registered = registered
        self.node_of: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.catalogue: str | None = None
        self.n_items: int | None = None
        # The model's shape from the hellos: a fit run's catalogue sizes, a retail task's schema.
        self.shapes: dict[str, Any] = {}
        self.audit_keys: dict[int, str] = {}  # each silo's public audit key, from its hello
        self.dataset = ""
        self.read_metrics = read_metrics  # a reply's evaluation: metric sums, or fit counts
        self.meter = TrafficMeter()  # every message of `exchange`, by silo
        self._ignored: set[int] = set()
        wrong = sorted(s for s in registered.node_of if not 0 <= s < n_silos)
        if wrong:
            raise IdentityError(f"the node map names silos {wrong}; this federation has {n_silos}")

    def silo_of(self, reply: Message) -> int:
        """The silo of the authenticated node a reply came from (not what the reply claims)."""
        return self.registered.silo_of(reply.metadata.src_node_id)  # type: ignore[return-value]

    def refresh(self) -> None:
        online = set(self.grid.get_node_ids())
        self.node_of = {s: n for s, n in self.node_of.items() if n in online}
        for node in sorted(online - set(self.registered.node_of.values()) - self._ignored):
            self._ignored.add(node)
            self.log(f"node {node} is not registered for any silo: ignored")
        unknown = sorted(
            set(self.registered.node_of.values()) & online - set(self.node_of.values())
        )
        if not unknown:
            return
        hello = RecordDict()
        for reply in self.exchange({n: (hello, MessageType.QUERY) for n in unknown}, "hello"):
            silo = self.silo_of(reply)
            try:
                info = reply.content["silo"]
                claimed, name = int(info["silo"]), str(info["name"])
                catalogue, n_items = str(info["catalogue"]), int(info["n-items"])
                dataset = str(info["dataset"])
                shapes = hello_shapes(info)
            except (KeyError, TypeError, ValueError) as exc:
                self.log(f"silo {silo}: a malformed hello ({type(exc).__name__}: {exc})")
                continue
            if claimed != silo:
                self.log(f"node {reply.metadata.src_node_id} serves silo {silo} but says it is "
                         f"silo {claimed}: refused")  # fmt: skip
                continue
            if self.catalogue is None:  # the digest covers the shapes: the first hello's stand
                self.catalogue, self.n_items, self.shapes = catalogue, n_items, shapes
            elif catalogue != self.catalogue:
                raise FedShopError(
                    f"silo {silo} ({name}) indexes another item catalogue; every silo's "
                    "data file must come from the same catalogue"
                )
            self.node_of[silo] = reply.metadata.src_node_id
            self.names[silo] = name
            if "audit-key" in info:  # from the authenticated node of this silo
                self.audit_keys[silo] = str(info["audit-key"])
            self.dataset = dataset

    def metrics(self, replies: list[Message], name: str = "metrics") -> dict[str, MetricSums]:
        """The silos' metric sums (a fit run's: counts) in `replies`, by silo name in silo order;
        a malformed one is logged and left out."""
        per_silo = {}
        for reply in replies:
            silo = self.silo_of(reply)
            try:
                per_silo[silo] = self.read_metrics(reply.content, silo, name)
            except wire.BadReplyError as reason:
                self.log(f"silo {silo}: {reason}")
        return {self.names[s]: per_silo[s] for s in sorted(per_silo)}

    def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.refresh()
            if len(self.node_of) >= count:
                return
            if time.monotonic() > deadline:
                raise FedShopError(
                    f"only {len(self.node_of)} of the {count} silos needed came online within "
                    f"{timeout:.0f} s"
                )
            time.sleep(1.0)

    def exchange(self, contents: dict[int, tuple[RecordDict, str]], group: str) -> list[Message]:
        """Send each node its (content, message type); the successful replies that arrive within
        the timeout."""
        messages = [
            Message(content, dst_node_id=node, message_type=kind, group_id=group)
            for node, (content, kind) in contents.items()
        ]
        pushed = list(self.grid.push_messages(messages))
        destination = {i: m.metadata.dst_node_id for i, m in zip(pushed, messages, strict=False)}
        for message_id, message in zip(pushed, messages, strict=False):
            if message_id:
                self.meter.sent(self.registered.silo_of(message.metadata.dst_node_id), message)
        pending = {i for i in pushed if i}
        replies: list[Message] = []
        deadline = time.monotonic() + self.round_timeout
        while pending and time.monotonic() < deadline:
            arrived = list(self.grid.pull_messages(pending))
            pending -= {r.metadata.reply_to_message_id for r in arrived}
            for reply in arrived:  # what came back from the node asked, a failure too
                if (
                    destination.get(reply.metadata.reply_to_message_id)
                    == reply.metadata.src_node_id
                ):
                    self.meter.received(self.registered.silo_of(reply.metadata.src_node_id), reply)
            # Only replies from the nodes asked: a registered node answering for another is not.
            replies += [
                r
                for r in arrived
                if not r.has_error()
                and destination.get(r.metadata.reply_to_message_id) == r.metadata.src_node_id
            ]
            for failed in (r for r in arrived if r.has_error()):
                # A silo's failure is its own business, but its reason helps whoever runs it.
                node = destination.get(failed.metadata.reply_to_message_id, "?")
                self.log(f"node {node} failed: {failed.error.reason.strip()[-500:]}")
            if pending:
                time.sleep(_POLL_SECONDS)
        return replies


@dataclass
class GridTransport:
    """A round's messages over Flower's Grid: one exchange per round. A round's evaluation travels
    with the next round's training message (`evaluate` returns None), so that silos evaluate with
    the private state they will train from, as the simulator's do."""

    federation: Federation
    config: RunConfig
    pipeline: AggregationPipeline
    protection: SecureSum | None
    layout: list
    min_silos: int
    wait_timeout: float
    dp_plan: str | None  # the DP plan as sent to the silos, under record-level DP
    client_dp_event: object = None
    unit: str = "silos"
    retries: bool = True  # a silo that failed may come back
    run: str = ""  # the run's id (`checkpoint.run_identity`), in every task
    # The silos' signed records of their weights files, from their final replies (audit log).
    claims: dict[int, dict] = field(default_factory=dict)
    # FedBuff (`[communication] schedule = "fedbuff"`): the training messages in flight across
    # steps and the replies that wait for one (`deploy/fedbuff.py`); None on synchronous rounds.
    flight: InFlight | None = None
    # What `RoundDriver` reads of the per-silo metrics (a fit run's: `FitGridTransport`).
    headline = "hr@10"
    summarise = staticmethod(summarise)

    def __post_init__(self) -> None:
        self.toml = self.config.to_toml()
        if self.config.communication.schedule == "fedbuff":
            self.flight = InFlight(self.federation.round_timeout)
            self.federation.meter.start()  # the first step's traffic: from here, not the hellos

    def party_name(self, silo: int) -> str:
        """A silo's name (its hello's), for the history's traffic."""
        return self.federation.names.get(silo, str(silo))

    def train(
        self, round_number: int, clients: Sequence[int], shared: Params, evaluate: int | None
    ) -> RoundReply:
        """One round's exchanges (`_train`), with the bytes of every Flower message of the round,
        each silo's, as its traffic. FedBuff: one server step (`_buffered`)."""
        if self.flight is not None:
            return self._buffered(round_number, clients, shared)
        self.federation.meter.start()
        reply = self._train(round_number, clients, shared, evaluate)
        reply.traffic = self.federation.meter.traffic()
        return reply

    def _train(
        self, round_number: int, clients: Sequence[int], shared: Params, evaluate: int | None
    ) -> RoundReply:
        federation = self.federation
        federation.refresh()
        chosen = list(clients)
        online = [s for s in chosen if s in federation.node_of]
        secure = None
        if self.protection is not None:
            secure = SecureRound(
                self.protection, self.config.protection.bound, self.layout, online, self.run
            )
            secure.start()
        tasks = {}
        for silo in federation.node_of:
            if silo in chosen:
                extra = secure.task_for(silo) if secure else {}
                task = self._task(round_number, evaluate is not None, dp=self.dp_plan, **extra)
                tasks[silo] = (task, MessageType.TRAIN)
            elif evaluate is not None:
                tasks[silo] = (self._task(evaluate), MessageType.EVALUATE)
        record = wire.params_record(shared)
        contents = {
            federation.node_of[silo]: (RecordDict({"task": task, "shared": record}), kind)
            for silo, (task, kind) in tasks.items()
        }
        replies = federation.exchange(contents, f"round-{round_number}")
        # Under DP the silos keep their metrics (`SiloNode._report`): none come back to read.
        asked = evaluate is not None and self.dp_plan is None
        previous = federation.metrics(replies) if asked else None
        needed = min(self.min_silos, len(chosen))
        if secure is None:
            updates = {}
            for reply in replies:
                silo = federation.silo_of(reply)
                if silo not in chosen:
                    continue  # an evaluation-only reply
                try:
                    updates[silo] = wire.record_update(
                        reply.content, silo, self.layout, self.config.federated.max_update_norm
                    )
                except wire.BadReplyError as reason:
                    federation.log(f"silo {silo}'s reply refused: {reason}")
            if len(updates) < needed:
                raise IncompleteRoundError(f"{len(updates)} silos replied, {needed} needed")
            # In silo order, as the simulator adds them: the same float sums.
            silos = sorted(updates)
            aggregate = self.pipeline.summation([updates[s] for s in silos])
            events = {s: updates[s].dp_event for s in silos if updates[s].dp_event is not None}
            hashes = {s: hash_message(updates[s]) for s in silos}
            acks = self._acks(replies, chosen, "ack")
            return RoundReply(aggregate, silos, None, events, previous, hashes, acks)
        aggregate, silos, cost, events = self._secure_sum(secure, replies, needed)
        # Under SecAgg the server never holds a silo's message: no message hashes, only the sum's.
        acks = self._acks(replies, chosen, "ack")
        return RoundReply(aggregate, silos, cost, events, previous, None, acks)

    def _acks(self, replies: list[Message], silos: Sequence[int], key: str) -> dict[int, str]:
        """Each silo's signature in its reply (by the silo its node serves), for the audit log."""
        acks = {}
        for reply in replies:
            silo = self.federation.silo_of(reply)
            value = wire.record_audit(reply.content, key)
            if silo in silos and value is not None:
                acks[silo] = value
        return acks

    def _claims(self, replies: list[Message]) -> None:
        """Each silo's signed record of its weights file, kept when its signature verifies with
        the key its node gave in its hello (a bad one is logged and left out of the log)."""
        from fedshop.storage.audit import files_message, signature_valid

        for reply in replies:
            silo = self.federation.silo_of(reply)
            try:
                body = json.loads(wire.record_audit(reply.content, "files") or "null")
                files = {str(k): str(v) for k, v in body["files"].items()}
                name = self.federation.names[silo]
                valid = int(body["party"]) == silo and signature_valid(
                    self.federation.audit_keys.get(silo),
                    files_message(self.run, name, files),
                    str(body["signature"]),
                )
            except (KeyError, TypeError, ValueError, AttributeError):
                valid = False
            if valid:
                self.claims[silo] = {"party": silo, "files": files, "signature": body["signature"]}
            else:
                self.federation.log(f"silo {silo}: no valid signed record of its weights file")

    def _secure_sum(self, secure: SecureRound, replies: list[Message], needed: int):
        """Steps 2–4 of SecAgg with the silos whose training replies advertised keys."""
        federation = self.federation
        index_of_node = {federation.node_of[s]: i for i, s in enumerate(secure.silos)}
        trained = {
            index_of_node[r.metadata.src_node_id]: r.content
            for r in replies
            if "secagg" in r.content and r.metadata.src_node_id in index_of_node
        }
        if len(trained) < max(needed, 2):
            raise IncompleteRoundError(f"{len(trained)} silos replied, {max(needed, 2)} needed")

        def exchange(step: str, contents: dict[int, RecordDict]) -> dict[int, RecordDict]:
            # By node, not by what a reply says of itself: a node is authenticated, a claim is not.
            nodes = {federation.node_of[secure.silos[i]]: i for i in contents}
            messages = {node: (contents[i], SECAGG_MESSAGE) for node, i in nodes.items()}
            replies = federation.exchange(messages, f"secagg-{step}")
            return {nodes[r.metadata.src_node_id]: r.content for r in replies}

        aggregate, silos, cost = secure.finish(trained, exchange, needed, federation.log)
        events = {}
        for i, content in trained.items():
            event = wire.record_dp_event(content["meta"])
            if event is not None and secure.silos[i] in silos:
                events[secure.silos[i]] = event
        return aggregate, silos, cost, events

    def _buffered(self, round_number: int, clients: Sequence[int], shared: Params) -> RoundReply:
        """One FedBuff step: the current model to the chosen silos with nothing in flight (up to
        `concurrency` messages in flight in all), then replies until `buffer_size` have arrived;
        the first `buffer_size` of them, each discounted by its staleness, summed in arrival order.
        Replies beyond them wait for the next step. Traffic: every Flower message since the last
        step (an evaluation exchange between steps counts in the next one)."""
        federation, flight, com = self.federation, self.flight, self.config.communication
        assert flight is not None
        federation.refresh()
        now = time.monotonic()
        self._give_up(flight, now, round_number)
        free = max((com.concurrency or federation.n_silos) - flight.occupied(), 0)
        busy = flight.busy()
        starting = [s for s in clients if s not in busy and s in federation.node_of][:free]
        if starting:
            task, record = self._task(round_number), wire.params_record(shared)
            messages = [
                Message(
                    RecordDict({"task": task, "shared": record}),
                    dst_node_id=federation.node_of[s], message_type=MessageType.TRAIN,
                    group_id=f"round-{round_number}",
                )
                for s in starting
            ]  # fmt: skip
            pushed = list(federation.grid.push_messages(messages))
            for silo, message_id, message in zip(starting, pushed, messages, strict=False):
                if message_id:
                    federation.meter.sent(silo, message)
                    flight.add(message_id, silo, federation.node_of[silo], round_number, now)
        deadline = now + federation.round_timeout
        while len(flight.arrived) < com.buffer_size and flight.sent:
            for reply in federation.grid.pull_messages(flight.ids()):
                self._arrive(flight, reply)
            self._give_up(flight, time.monotonic(), round_number)
            if len(flight.arrived) >= com.buffer_size or time.monotonic() >= deadline:
                break
            time.sleep(_POLL_SECONDS)
        needed = min(self.min_silos, com.buffer_size)
        if len(flight.arrived) < needed:  # what arrived waits for the retried step
            raise IncompleteRoundError(
                f"{len(flight.arrived)} training replies arrived, {needed} needed"
            )
        taken = flight.take(com.buffer_size)
        staleness = {a.silo: a.staleness(round_number) for a in taken}
        updates = {
            a.silo: discounted(
                a.update, staleness_weight(staleness[a.silo], com.staleness_exponent)
            )
            for a in taken
        }
        silos = list(updates)  # in arrival order, as the simulator's buffer sums them
        aggregate = self.pipeline.summation([updates[s] for s in silos])
        events = {s: updates[s].dp_event for s in silos if updates[s].dp_event is not None}
        hashes = {s: hash_message(updates[s]) for s in silos}
        acks = {a.silo: a.ack for a in taken}
        traffic = federation.meter.traffic()
        federation.meter.start()
        return RoundReply(
            aggregate, silos, None, events, None, hashes, acks, traffic, staleness=staleness
        )

    def _arrive(self, flight: InFlight, reply: Message) -> None:
        """A pulled training reply: decoded and checked into the buffer, or logged and dropped."""
        federation = self.federation
        sent = flight.answer(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if sent is None:  # not one of ours in flight, or from another node than the one asked
            return
        federation.meter.received(sent.silo, reply)
        if reply.has_error():
            federation.log(f"node {sent.node} failed: {reply.error.reason.strip()[-500:]}")
            return
        try:
            update = wire.record_update(
                reply.content, sent.silo, self.layout, self.config.federated.max_update_norm
            )
        except wire.BadReplyError as reason:
            federation.log(f"silo {sent.silo}'s reply refused: {reason}")
            return
        ack = wire.record_audit(reply.content, "ack")
        flight.arrived.append(Arrived(sent.silo, sent.round, update, ack))

    def _give_up(self, flight: InFlight, now: float, round_number: int) -> None:
        for lost in flight.give_up(now):
            self.federation.log(
                f"round {round_number}: silo {lost.silo}'s training message of round {lost.round} "
                f"unanswered after {flight.timeout:.0f} s: given up, a late reply is not read"
            )

    def evaluate(self, round_number: int, shared: Params) -> dict[str, MetricSums] | None:
        """Synchronous rounds: None, the metrics come with the next exchange. FedBuff: replies come
        at different times, so no evaluation rides on a training message; the model is sent to
        every online silo in an EVALUATE exchange of its own, whose metrics (of the silos that
        answered within the round timeout) come back here."""
        if self.flight is None:
            return None  # with the next exchange
        federation = self.federation
        federation.refresh()
        task, record = self._task(round_number), wire.params_record(shared)
        contents = {
            node: (RecordDict({"task": task, "shared": record}), MessageType.EVALUATE)
            for node in federation.node_of.values()
        }
        per_silo = federation.metrics(federation.exchange(contents, f"evaluate-{round_number}"))
        return per_silo or None  # none arrived: the last round's is asked again at the end

    def finish(self, shared: Params, evaluate: int | None) -> FinalEvaluation:
        """The last round's model, as it is and after every silo has refitted its own vectors."""
        federation = self.federation
        if self.flight is not None:
            sent, arrived = self.flight.drop()
            if sent or arrived:
                federation.log(
                    f"FedBuff: the run is over; {len(sent)} training messages still in flight "
                    f"(silos {sorted(s.silo for s in sent)}) and {len(arrived)} unused replies "
                    f"(silos {sorted(a.silo for a in arrived)}) dropped, never applied"
                )
        federation.wait_for(federation.n_silos, self.wait_timeout)
        task = self._task(self.config.federated.rounds, final=True)
        record = wire.params_record(shared)
        contents = {
            node: (RecordDict({"task": task, "shared": record}), MessageType.EVALUATE)
            for node in federation.node_of.values()
        }
        replies = federation.exchange(contents, "final")
        acks = self._acks(replies, list(federation.node_of), "final-ack")
        self._claims(replies)
        if self.dp_plan is not None:
            return FinalEvaluation({}, acks=acks)  # each silo kept its own metrics
        last = federation.metrics(replies) if evaluate is not None else None
        return FinalEvaluation(federation.metrics(replies, "final"), last, acks)

    def recover(self) -> None:
        needed = max(self.min_silos, 2 if self.protection is not None else 1)
        self.federation.wait_for(needed, self.wait_timeout)

    def _task(
        self, round_number: int, evaluate=False, final=False, dp: str | None = None, **extra
    ) -> ConfigRecord:
        task = {
            "round": round_number, "config": self.toml, "evaluate": evaluate, "final": final,
            "run": self.run,
        }  # fmt: skip
        if self.dp_plan is not None:
            task["private"] = True  # no exact metric sums back: they are not an accounted release
        return ConfigRecord({**task, **({"dp-plan": dp} if dp is not None else {}), **extra})


@dataclass
class FitGridTransport(FitSummaries, GridTransport):
    """`GridTransport` of a fit run: its silos' evaluations are `FitCounts`."""


@dataclass
class BinaryGridTransport(BinarySummaries, GridTransport):
    """`GridTransport` of a classifier's retail task: its silos' evaluations are `BinaryCounts`."""


@dataclass
class ForecastGridTransport(ForecastSummaries, GridTransport):
    """`GridTransport` of the demand task: its silos' evaluations are `ForecastSums`."""


TABLE_TRANSPORTS = {"binary": BinaryGridTransport, "quantile": ForecastGridTransport}
TABLE_METRICS = {"binary": wire.record_binary_counts, "quantile": wire.record_forecast_sums}


def serve(grid: Grid, context: Context) -> None:
    settings = context.run_config
    config = load_config(Path(str(settings["config-path"])))
    out = private_dir(Path(str(settings["out-dir"])))
    n_silos = int(settings["silos"])
    log = ServerLog(out / "server.log")
    registered = SiloNodes.read(Path(str(settings["node-silos"])))
    fit = config.task == "fit"
    kind = TASK_KINDS.get(config.task)  # a retail task's: its storefronts' counts
    federation = Federation(
        grid, n_silos, float(settings["round-timeout"]), log, registered,
        wire.record_fit_counts if fit else TABLE_METRICS[kind] if kind else wire.record_metrics,
    )  # fmt: skip
    wait_timeout = float(settings["wait-timeout"])
    # Every silo at the start: the model's shape and the silos' names come from them.
    federation.wait_for(n_silos, wait_timeout)
    make = _fit_server if fit else _table_server if kind else _recommender_server
    pipeline, server = make(config, federation)
    digest = config_digest(config.to_toml())
    checkpoints = out / "checkpoints"
    resumed = load_checkpoint(checkpoints, server, digest)
    identity = run_identity(out, digest)  # the silos keep their state for the run under it
    guard = _privacy_guard(config, federation, resumed)
    if resumed:
        log(f"resumed from the checkpoint after round {resumed.round}")
    task = LocalTask.of_run(config, guard.plan if guard is not None else None)
    transport_type = FitGridTransport if fit else TABLE_TRANSPORTS.get(kind, GridTransport)
    transport = transport_type(
        federation, config, pipeline, make_protection(config.protection),
        expected_layout(pipeline, server.shared), int(settings["min-silos"]) or n_silos,
        wait_timeout,
        # Sent with every silo's training task; a silo builds its DP-SGD from it.
        json.dumps(asdict(guard.plan)) if guard is not None else None,
        task.dp.dp_event if task.dp is not None else None,
        run=identity,
    )  # fmt: skip
    run_id = guard.run_id if guard is not None else None

    def checkpoint(server, history) -> None:
        save_checkpoint(checkpoints, server, history, digest, run_id)

    # The audit log (storage/audit.py), in this folder: a recommender's run and a fit run alike.
    audit = open_audit(out, identity, config, federation, resumed)
    driver = RoundDriver(
        config, server, transport, guard, resumed.history if resumed else None,
        checkpoint=checkpoint, log=log, audit=audit,
    )  # fmt: skip
    run = driver.run_all()
    for silo in sorted(transport.claims):
        audit.log.append("silo-files", transport.claims[silo])
    final = run.final.per_silo
    Outcome(
        history=run.history,
        per_silo=final,
        silo_names=[federation.names[s] for s in sorted(federation.names)],
        privacy=guard.summary() if guard is not None else None,
        protection=summarise_costs(config.protection.kind, run.costs),
        task=config.task,
    ).write(out, server.shared)
    if final:
        headline = transport.headline
        log(f"finished: {headline} {transport.summarise(final)[headline]:.4f}")
    else:
        log("finished (under DP each silo keeps its own metrics)")


def open_audit(out: Path, identity: str, config: RunConfig, federation: Federation, resumed):
    """The server's audit log, `audit.jsonl` in its folder, signed with its key (`audit-server.key`
    there, made on the first start). A new run starts a log (header: the run id, the config's
    hash, every silo's public audit key from its hello); a restarted server keeps the header and
    the rounds its checkpoint holds and writes the rest again. The run folder's writer closes it
    (`report/audit.py`); `fedshop deploy run` leaves it open (no files, no end)."""
    from fedshop.fl.audit import RoundAudit
    from fedshop.storage.audit import LOG_FILE, AuditLog, Problem, Signer, canonical, read_entries

    signer = Signer.of_file(out / "audit-server.key")
    path = out / LOG_FILE
    if resumed is not None and path.exists():
        entries = read_entries(path)
        if isinstance(entries, Problem):
            raise FedShopError(f"the server's audit log {path} is damaged: {entries}")
        keep = [
            e
            for e in entries
            if e["kind"] == "header"
            or (e["kind"] == "round" and e["body"]["round"] <= resumed.round)
        ]
        write_private(path, b"".join(canonical(e) + b"\n" for e in keep))
        return RoundAudit(AuditLog(signer, path, keep))
    path.unlink(missing_ok=True)
    log = AuditLog(signer, path)
    parties = {s: (federation.names[s], federation.audit_keys.get(s)) for s in federation.names}
    log.header(identity, config.to_toml(), parties, config.federated.mode)
    return RoundAudit(log)


def _recommender_server(
    config: RunConfig, federation: Federation
) -> tuple[AggregationPipeline, FederatedServer]:
    pipeline = server_pipeline(config)
    server = make_server(config, federation.n_items, torch.arange(federation.n_silos), pipeline)
    return pipeline, server


def _fit_server(
    config: RunConfig, federation: Federation
) -> tuple[AggregationPipeline, FederatedServer]:
    """The simulator's fit server (`make_fit_server`), shaped by what the silos' hellos said."""
    if set(federation.shapes) != {"n-products", "n-features"}:
        raise FedShopError("the silos hold purchases, not fit records: a fit run needs fit files")
    shapes = FitShapes(
        federation.shapes["n-products"], int(federation.n_items), federation.shapes["n-features"]
    )
    pipeline = fit_pipeline(config, private=config.privacy.enabled)
    return pipeline, make_fit_server(config, shapes, federation.n_silos, pipeline)


def _table_server(
    config: RunConfig, federation: Federation
) -> tuple[AggregationPipeline, FederatedServer]:
    """The simulator's table server (`make_tabular_server`), shaped by the storefronts' hellos."""
    shapes = federation.shapes
    if not set(_TABLE_SCHEMA) <= set(shapes):
        raise FedShopError(
            f"the silos hold no table: task = {config.task!r} needs table silo files"
        )
    schema = TableSchema(
        shapes["kind"], shapes["horizon"], shapes["cardinalities"], shapes["n-numeric"]
    )
    if schema.kind != TASK_KINDS[config.task]:
        raise FedShopError(f"the silos' table is {schema.kind}; task = {config.task!r} is not")
    shape = shape_of(config, schema)
    pipeline = tabular_pipeline(config, shape)
    return pipeline, make_tabular_server(config, shape, federation.n_silos, pipeline)


def _privacy_guard(config, federation: Federation, resumed):
    """Record-level DP: the run's guard, opened (the budgets checked before any training) or, after
    a restart, resumed under the same ledger run with the completed rounds composed again."""
    if not config.privacy.enabled:
        return None
    from fedshop.experiment import record_level_plan
    from fedshop.privacy.dp import PrivacyGuard

    # δ comes from the config: the server never sees a silo's exact customer count (`deploy local`
    # sets δ from the data it splits; on separate hosts the operator states it).
    plan = record_level_plan(config, None)
    names = tuple(federation.names[s] for s in sorted(federation.names))
    if resumed is not None and resumed.run_id:
        return PrivacyGuard.resume(
            plan, config.privacy, federation.dataset, names, resumed.run_id, resumed.round
        )
    return PrivacyGuard.open(plan, config.privacy, federation.dataset, names)


class ServerLog:
    """The server's log: each line stamped, printed and appended to an owner-only file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, line: str) -> None:
        stamped = f"{time.strftime('%H:%M:%S')} {line}"
        print(stamped, flush=True)
        with open_private_append(self.path, "a") as f:  # silos' failures may quote their data
            f.write(stamped + "\n")
