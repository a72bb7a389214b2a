"""A feature holder's side of a vertical deployment: a partner's process, its own table and state.

The feature holder runs as a SuperNode (`processes.Silo`): `silo-data` is its own party file (written
by `fedshop.vertical.scenario`), `state-dir` a folder of its own, and three more node-config entries
name its end of the direct PSI link: `psi-address` (host:port it listens on for the label holder),
`psi-cert`/`psi-key` (its link certificate and key) and `psi-ca` (the link CA that signed the label
holder's). Flower starts a fresh process for every message, so what the party carries between
messages (the aligned customers, its bottom model and optimiser) lives in `runs/<run id>/` of its
state folder, owner-only.

Messages (type `query.vertical` / `train.vertical`), each with a ConfigRecord `task` naming `run` and
`step`:
- `hello`: its name and PSI address, never its customer count or ids (which party it is, the
  server knows from the authenticated node).
- `psi`: run its side of the PSI against the label holder's address in the task; keep the
  intersection (only if the protocol revealed it to this party); reply with sizes and costs.
- `split`: one split-learning exchange (`kind` in the task, arrays in the ArrayRecord `message`),
  handled by `FeatureHolder.handle`, the simulator's class.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedshop.deploy import wire
from fedshop.errors import FedShopError
from fedshop.storage.private_files import private_dir, write_private

_RUN = re.compile(r"[A-Za-z0-9_-]{1,64}")
ALIGNED_FILE = "aligned.json"  # the intersection PSI revealed to this party
TRAINED_FILE = "trained.json"  # the customers the run trains on (a subset of it)
PLAN_FILE = "plan.json"
HOLDER_DIR = "holder"


class FeaturePartyNode:
    """The feature holder as its node config describes it."""

    def __init__(self, node_config: dict) -> None:
        for key in ("silo-data", "state-dir"):
            if not str(node_config.get(key, "")):
                raise FedShopError(f"the SuperNode's --node-config has no {key!r}")
        from fedshop.vertical.scenario import PartyTable

        self.party = PartyTable.load(Path(str(node_config["silo-data"])))
        self.state_dir = private_dir(Path(str(node_config["state-dir"])))
        self.node_config = node_config

    def run_folder(self, task: ConfigRecord) -> Path:
        run = str(task.get("run", ""))
        if not _RUN.fullmatch(run):
            raise FedShopError(f"a task names run {run!r}, not a run id")
        return private_dir(self.state_dir / "runs" / run)

    def hello(self) -> RecordDict:
        return RecordDict(
            {
                "party": ConfigRecord(
                    {
                        "name": self.party.name,
                        "psi-address": str(self.node_config.get("psi-address", "")),
                    }
                )
            }
        )

    def psi(self, task: ConfigRecord) -> RecordDict:
        from fedshop.secure.psi import PsiTls, run_psi_party

        folder = self.run_folder(task)
        tls = None
        if self.node_config.get("psi-ca"):
            tls = PsiTls(
                ca=Path(str(self.node_config["psi-ca"])),
                certificate=Path(str(self.node_config["psi-cert"])),
                key=Path(str(self.node_config["psi-key"])),
            )
        result = run_psi_party(
            "feature",
            list(self.party.ids),
            protocol=str(task["protocol"]),
            self_address=str(self.node_config["psi-address"]),
            peer_address=str(task["peer"]),
            reveal_to=str(task["reveal-to"]),
            tls=tls,
            timeout=float(task.get("timeout", 120.0)),
            measure_bytes=True,
        )
        if result.intersection is not None:
            # Customer ids are integers in the party files; kept as the sorted numbers, which
            # is the order both parties index the aligned customers by.
            aligned = sorted(int(i) for i in result.intersection)
            write_private(folder / ALIGNED_FILE, json.dumps(aligned))
        return RecordDict(
            {
                "psi": ConfigRecord(
                    {
                        "learned-intersection": result.intersection is not None,
                        "intersection-size": int(result.intersection_size or 0),
                        "seconds": float(result.seconds),
                        "bytes-sent": int(result.bytes_sent or 0),
                        "bytes-received": int(result.bytes_received or 0),
                    }
                )
            }
        )

    def split(self, task: ConfigRecord, content: RecordDict) -> RecordDict:
        import numpy as np

        from fedshop.vertical.split_learning import FeatureHolder, Plan

        folder = self.run_folder(task)
        kind = str(task["kind"])
        message = wire.record_arrays(content["message"]) if "message" in content else {}
        if kind == "setup":
            if not (folder / ALIGNED_FILE).exists():
                raise FedShopError(
                    "no aligned customers for this run: the PSI did not reveal the intersection "
                    "to this party (psi.reveal_to must be 'both' for training)"
                )
            found = np.asarray(json.loads((folder / ALIGNED_FILE).read_text()), dtype=np.int64)
            # With several feature holders the label holder trains on the customers every one of
            # them holds: `keep` marks those among this party's intersection with it.
            keep = message.pop("keep", None)
            if keep is None or keep.shape != found.shape:
                raise FedShopError("a setup request without a keep mask over the intersection")
            write_private(folder / TRAINED_FILE, json.dumps(found[keep.astype(bool)].tolist()))
            write_private(folder / PLAN_FILE, str(task["plan"]))
        if not (folder / PLAN_FILE).exists():
            raise FedShopError(f"a {kind!r} request before this run's setup")
        aligned = np.asarray(json.loads((folder / TRAINED_FILE).read_text()), dtype=np.int64)
        plan = Plan.from_dict(json.loads((folder / PLAN_FILE).read_text()))
        party = self.party
        holder = FeatureHolder(party.frame, party.columns, aligned, plan, name=party.name)
        if kind != "setup":
            holder.load(folder / HOLDER_DIR)
        reply = holder.handle(kind, message)
        holder.save(private_dir(folder / HOLDER_DIR))
        return RecordDict({"message": wire.arrays_record(reply)})


def handle(message: Message, context: Context) -> Message:
    node = FeaturePartyNode(dict(context.node_config))
    task = message.content["task"]
    step = str(task.get("step", ""))
    if step == "hello":
        content = node.hello()
    elif step == "psi":
        content = node.psi(task)
    elif step == "split":
        content = node.split(task, message.content)
    else:
        raise FedShopError(f"a vertical task of unknown step {step!r}")
    return Message(content, reply_to=message)
