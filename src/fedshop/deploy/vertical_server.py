"""The label holder's side of a vertical deployment: the platform's process, as Flower's ServerApp.

It reads only its own party file (`label-data`), finds the feature holders among the registered
nodes (`node-silos`: the operator's map of registered keys to parties, as for silos), aligns its
customers with each of them by PSI over a direct TLS link between the two (both ends authenticated
by the link CA; `fedshop.secure.psi`), then trains with the simulator's split-learning driver
(`fedshop.vertical.split_learning.train_split`) over `GridSplitTransport`: one exchange is one
message to each feature holder and its reply. Its own baseline (`label_holder_only`) it trains on its
own columns. It writes `outcome.json` into `out-dir` only once everything has finished: a party that
fails or disconnects stops the run with its name and reason, and nothing is written half.

Run config (`fedshop vertical local` sets it, see the app's pyproject.toml): `task = "vertical"`,
`config-path`, `out-dir`, `node-silos`, `silos` (how many feature holders), `round-timeout` (seconds
a feature holder has to answer one exchange), `wait-timeout`, `label-data`, `psi-address` and the
label holder's link files `psi-ca`, `psi-cert`, `psi-key`.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from pathlib import Path

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedshop.deploy import wire
from fedshop.deploy.identities import SiloNodes
from fedshop.deploy.server_app import ServerLog
from fedshop.errors import FedShopError
from fedshop.storage.private_files import private_dir, write_private

OUTCOME_FILE = "vertical-outcome.json"
_POLL_SECONDS = 0.1
_QUERY = f"{MessageType.QUERY}.vertical"
_TRAIN = f"{MessageType.TRAIN}.vertical"


class PartyLostError(FedShopError):
    """A feature holder failed, disconnected or did not answer in time: the run stops."""


class FeatureParties:
    """The feature holders: registered node → party index (the operator's map), confirmed by each
    node's hello, and one request/reply exchange with all of them at a time."""

    def __init__(self, grid: Grid, registered: SiloNodes, n: int, timeout: float, log) -> None:
        self.grid, self.registered, self.n, self.timeout, self.log = (
            grid,
            registered,
            n,
            timeout,
            log,
        )
        self.node_of: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.psi_address: dict[int, str] = {}

    def wait_for_all(self, wait_timeout: float) -> None:
        deadline = time.monotonic() + wait_timeout
        expected = {s: node for s, node in self.registered.node_of.items() if s < self.n}
        while True:
            online = set(self.grid.get_node_ids())
            arrived = [s for s, node in expected.items() if node in online]
            if len(arrived) == self.n:
                break
            if time.monotonic() > deadline:
                raise PartyLostError(
                    f"only {len(arrived)} of the {self.n} feature holders came online within "
                    f"{wait_timeout:.0f} s"
                )
            time.sleep(0.5)
        self.node_of = expected
        hello = RecordDict({"task": _task("hello")})
        replies = self.ask({s: (hello, _QUERY) for s in expected}, self.timeout)
        for index, content in replies.items():
            info = content["party"]
            self.names[index] = str(info["name"])
            self.psi_address[index] = str(info["psi-address"])

    def ask(
        self, contents: dict[int, tuple[RecordDict, str]], timeout: float
    ) -> dict[int, RecordDict]:
        """Send each party its (content, message type); every reply by party, or `PartyLostError`
        naming the first party that failed or did not answer within `timeout`."""
        messages = {
            index: Message(content, dst_node_id=self.node_of[index], message_type=kind)
            for index, (content, kind) in contents.items()
        }
        ids = dict(zip(messages, self.grid.push_messages(list(messages.values())), strict=True))
        party_of = {message_id: index for index, message_id in ids.items()}
        replies: dict[int, RecordDict] = {}
        deadline = time.monotonic() + timeout
        while len(replies) < len(messages):
            pending = [m for m, index in party_of.items() if index not in replies]
            for reply in self.grid.pull_messages(pending):
                index = party_of.get(reply.metadata.reply_to_message_id)
                if index is None or reply.metadata.src_node_id != self.node_of[index]:
                    continue  # only the node asked may answer
                if reply.has_error():
                    raise PartyLostError(
                        f"feature holder {self.label(index)} failed: "
                        f"{reply.error.reason.strip()[-800:]}"
                    )
                replies[index] = reply.content
            if len(replies) < len(messages):
                if time.monotonic() > deadline:
                    late = sorted(set(messages) - set(replies))
                    raise PartyLostError(
                        f"feature holder {self.label(late[0])} did not answer within "
                        f"{timeout:.0f} s (disconnected?); the run stops, nothing is written"
                    )
                time.sleep(_POLL_SECONDS)
        return replies

    def label(self, index: int) -> str:
        return f"{index} ({self.names[index]})" if index in self.names else str(index)


class GridSplitTransport:
    """`train_split`'s transport over Flower: one exchange = one message to each feature holder.
    The setup request carries the plan and, per holder, the mask of its intersection the run trains
    on (the customers every feature holder has)."""

    def __init__(self, parties: FeatureParties, run: str, plan_json: str, keep: dict) -> None:
        self.parties, self.run, self.plan_json, self.keep = parties, run, plan_json, keep
        self.index_of = {name: index for index, name in parties.names.items()}
        self.names = tuple(parties.names[i] for i in sorted(parties.names))

    def exchange(self, requests: dict) -> dict:
        contents = {}
        for name, (kind, message) in requests.items():
            task = _task("split", run=self.run, kind=kind)
            if kind == "setup":
                task["plan"] = self.plan_json
                message = {**message, "keep": self.keep[name]}
            record = RecordDict({"task": task, "message": wire.arrays_record(message)})
            contents[self.index_of[name]] = (record, _TRAIN)
        replies = self.parties.ask(contents, self.parties.timeout)
        return {
            self.parties.names[index]: wire.record_arrays(content["message"])
            for index, content in replies.items()
        }


def _task(step: str, **values) -> ConfigRecord:
    return ConfigRecord({"step": step, **values})


PSI_ATTEMPTS = 3


def run_psi(parties: FeatureParties, index: int, ids: list, settings, config, run: str):
    """`psi_once`, tried again (a fresh session on both sides) when a session breaks off: spu's
    link now and then fails a session on loopback; a second session is independent of the first
    (fresh randomness), so retrying reveals nothing more."""
    for attempt in range(1, PSI_ATTEMPTS):
        try:
            return psi_once(parties, index, ids, settings, config, run)
        except FedShopError as reason:
            parties.log(f"PSI with {parties.label(index)}: attempt {attempt} failed ({reason}); "
                        "trying again")  # fmt: skip
    return psi_once(parties, index, ids, settings, config, run)


def psi_once(parties: FeatureParties, index: int, ids: list, settings, config, run: str):
    """The label holder's side of the PSI with feature holder `index` (in a thread: both ends run at
    once), while the feature holder runs its side in the message handler."""
    from fedshop.secure.psi import PsiTls, run_psi_party

    tls = None
    if str(settings.get("psi-ca", "")):
        tls = PsiTls(
            ca=Path(str(settings["psi-ca"])),
            certificate=Path(str(settings["psi-cert"])),
            key=Path(str(settings["psi-key"])),
        )
    outcome: dict = {}

    def label_side() -> None:
        try:
            outcome["result"] = run_psi_party(
                "label", ids, protocol=config.psi.protocol,
                self_address=str(settings["psi-address"]),
                peer_address=parties.psi_address[index], reveal_to=config.psi.reveal_to,
                tls=tls, timeout=config.psi.timeout, measure_bytes=True,
            )  # fmt: skip
        except BaseException as exc:  # handed to the main thread, which reports it
            outcome["error"] = exc

    thread = threading.Thread(target=label_side, daemon=True)
    thread.start()
    task = _task(
        "psi", run=run, protocol=config.psi.protocol, peer=str(settings["psi-address"]),
        timeout=float(config.psi.timeout), **{"reveal-to": config.psi.reveal_to},
    )  # fmt: skip
    try:
        reply = parties.ask({index: (RecordDict({"task": task}), _QUERY)}, config.psi.timeout + 60)
    finally:
        thread.join(config.psi.timeout + 60)  # this side's session ends before any next one
    if "error" in outcome:
        raise FedShopError(f"PSI with {parties.label(index)} failed: {outcome['error']}")
    if "result" not in outcome:
        raise PartyLostError(f"PSI with {parties.label(index)} did not finish")
    return outcome["result"], dict(reply[index]["psi"])


def serve_vertical(grid: Grid, context) -> None:
    import numpy as np

    from fedshop.vertical.scenario import PartyTable
    from fedshop.vertical.settings import load_vertical_config
    from fedshop.vertical.simulate import NoPartners, block
    from fedshop.vertical.split_learning import LabelHolder, train_split

    settings = context.run_config
    config = load_vertical_config(Path(str(settings["config-path"])))
    plan = config.plan
    out = private_dir(Path(str(settings["out-dir"])))
    log = ServerLog(out / "server.log")
    registered = SiloNodes.read(Path(str(settings["node-silos"])))
    parties = FeatureParties(
        grid, registered, int(settings["silos"]), float(settings["round-timeout"]), log
    )
    parties.wait_for_all(float(settings["wait-timeout"]))
    log(f"feature holders online: {', '.join(parties.names[i] for i in sorted(parties.names))}")
    label = PartyTable.load(Path(str(settings["label-data"])))
    ids = [int(i) for i in label.ids]
    run = secrets.token_hex(8)  # this run's state folder at every feature holder

    psi_report: dict = {
        "protocol": config.psi.protocol,
        "reveal_to": config.psi.reveal_to,
        "label_holder_customers": len(ids),
        "with": {},
    }
    found: dict[str, np.ndarray] = {}
    for index in sorted(parties.names):
        result, remote = run_psi(parties, index, ids, settings, config, run)
        name = parties.names[index]
        if result.intersection is None:
            raise FedShopError("the PSI revealed no intersection to the label holder")
        found[name] = np.sort(np.asarray([int(i) for i in result.intersection], dtype=np.int64))
        psi_report["with"][name] = {
            "intersection_size": result.intersection_size,
            "feature_holder_customers": result.peer_size,
            "seconds": round(result.seconds, 3),
            # Measured at the label holder's end of the link (TCP bytes, TLS included).
            "bytes_label_to_feature": result.bytes_sent,
            "bytes_feature_to_label": result.bytes_received,
            "feature_holder_learned_intersection": bool(remote["learned-intersection"]),
        }
        log(f"PSI with {name}: {result.intersection_size} common customers "
            f"({result.seconds:.2f} s, {config.psi.protocol})")  # fmt: skip
    aligned = next(iter(found.values()))
    for values in found.values():
        aligned = np.intersect1d(aligned, values)
    if len(aligned) == 0:
        raise FedShopError(
            "no customer is held by the label holder and every feature holder: nothing to train"
        )
    psi_report["aligned_customers"] = len(aligned)
    keep = {name: np.isin(values, aligned).astype(np.uint8) for name, values in found.items()}

    holder = LabelHolder(label.frame, label.columns, aligned, plan)
    transport = GridSplitTransport(parties, run, json.dumps(plan.to_dict()), keep)
    joint = train_split(holder, transport, plan, progress=lambda e: log(_progress(e)))
    log(f"joint model: macro AUC {joint.metrics['macro_auc']:.4f}")
    alone = train_split(LabelHolder(label.frame, label.columns, aligned, plan), NoPartners(), plan)
    log(f"label holder alone: macro AUC {alone.metrics['macro_auc']:.4f}")
    outcome = {
        "joint": block(joint),
        "label_holder_only": block(alone),
        "psi": psi_report,
        "exchanges": joint.exchanges,
        "bytes": {
            "to_feature_holders": joint.bytes_to_feature_holders,
            "to_label_holder": joint.bytes_to_label_holder,
        },
        "history": joint.history,
        "feature_holders": list(transport.names),
        "aligned_rentals": len(holder.labels),
        "platform_rentals_not_aligned": holder.rows_dropped_unaligned,
    }
    write_private(out / OUTCOME_FILE, json.dumps(outcome, indent=1) + "\n")
    log("finished")


def _progress(entry: dict) -> str:
    return f"exchange {entry['exchanges']}: round {entry['round']}, loss {entry['train_loss']:.4f}"
