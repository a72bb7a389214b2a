"""A deployed silo's side of secure aggregation: the simulator's `SecAggClient`, one step per message.

The silo trains as usual (`silo_app.py`), keeps its staged update in its state folder and answers the
round's four SecAgg steps (`secure/secagg.py`) one message at a time: advertise keys (with the
training reply), share keys, send the masked update, answer the unmasking. Flower starts a fresh
process for every message, so the client's round secrets live in a file of the run's folder in the
silo's state folder (readable by the silo's user only) between steps, named by the round's session;
the file and the kept update are deleted once the silo has answered the unmasking, and a new round's
training removes whatever an abandoned round left.

A silo takes part in the unmasking of a round of a run with one roster only. A server that restarts
between unmasking a round and its checkpoint runs the round again with fresh keys, and the silo
masks the same update again: were the second unmasking for other survivors, the difference of the
two sums would be one silo's update (or a few silos'). So before it replies the silo records, in
the run's folder, the survivors and dropouts it answered for (by silo, not by index in the round),
and answers that round's unmasking again only for the same ones.

Only numpy and `cryptography` load here: these steps do not pay for importing PyTorch.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedshop.errors import FedShopError
from fedshop.secure.protocol import ProtectionError, check_inputs
from fedshop.secure.secagg import (
    RoundSetup,
    SecAggClient,
    blobs_from_json,
    blobs_to_json,
    keys_from_json,
)
from fedshop.storage.private_files import private_dir, private_writer, write_private

STEPS = ("share", "mask", "unmask")
RUN_ID = re.compile(r"[0-9a-f]{32}")  # as the server makes them (`checkpoint.run_identity`)


def run_folder(state_dir: Path, run: str) -> Path:
    """The folder of the server's run `run` in a silo's state folder (made owner-only when new)."""
    # The id names a folder: only the server's own format, never a path of the server's choice.
    if not RUN_ID.fullmatch(run):
        raise FedShopError(
            f"the server's task names run {run[:40]!r}, not a run id of 32 hex digits: is the "
            "server's FedShop older than the silo's?"
        )
    return private_dir(state_dir / "runs" / run)


class SecAggSilo:
    """The SecAgg files of one silo's run folder (`run_folder`): a session's secrets and kept update
    in `secagg/`, the roster it unmasked each round for in `unmasked/`."""

    def __init__(self, run_dir: Path) -> None:
        self.folder = run_dir / "secagg"
        self.unmasked = run_dir / "unmasked"

    def _paths(self, setup: RoundSetup) -> tuple[Path, Path]:
        session = setup.session.hex()
        return self.folder / f"{session}.json", self.folder / f"{session}-update.npy"

    def start(
        self,
        setup: RoundSetup,
        index: int,
        update: np.ndarray,
        round_number: int,
        silos: Sequence[int],
    ) -> ConfigRecord:
        """Step 1, after training round `round_number`: keep `update` (the staged message,
        flattened, not yet divided by the round's total weight) and advertise fresh keys. `silos`
        are the round's silos by index in the round, as the server announced them."""
        started = time.perf_counter()
        silos = [int(s) for s in silos]
        if len(silos) != setup.n_clients or len(set(silos)) != len(silos):
            raise ProtectionError(
                f"the server named silos {silos} for a round of {setup.n_clients} SecAgg clients"
            )
        if not 0 <= index < setup.n_clients:
            raise ProtectionError(f"SecAgg index {index} is outside the round's {silos}")
        private_dir(self.folder)
        for stale in self.folder.iterdir():  # an abandoned round's secrets
            stale.unlink()
        client = SecAggClient(index, setup)
        c_public, s_public = client.advertise()
        secrets_path, update_path = self._paths(setup)
        with private_writer(update_path) as f:  # the silo's update in the clear
            np.save(f, update)
        kept = {"round": round_number, "silos": silos, "index": index}
        self._keep(secrets_path, kept, client)
        return ConfigRecord(
            {
                "index": index,
                "c-public": c_public,
                "s-public": s_public,
                "seconds": time.perf_counter() - started,
            }
        )

    def step(self, content: RecordDict) -> RecordDict:
        """Steps 2–4: `content["secagg"]` names the step and carries the round's setup and what the
        server routes to this client."""
        started = time.perf_counter()
        record = content["secagg"]
        step = str(record["step"])
        if step not in STEPS:
            raise ProtectionError(f"unknown secure aggregation step {step!r}")
        setup = RoundSetup.from_json(str(record["setup"]))
        index = int(record["index"])
        payload = json.loads(str(record["payload"]))
        secrets_path, update_path = self._paths(setup)
        if not secrets_path.exists():
            answered = self._answered_session(setup) if step == "unmask" else None
            if answered is None:
                raise ProtectionError(
                    f"no secrets for session {setup.session.hex()[:8]}: this silo did not start "
                    "that round, or already finished it"
                )
            # The reply was lost, or the server asks again: the same answer, or none.
            round_number, silos = answered
            reply = {"answer": self._unmask(setup, round_number, silos, payload, None)}
        else:
            kept = json.loads(secrets_path.read_text())
            if index != kept["index"]:  # the server may not move a silo within a round
                raise ProtectionError(
                    f"this silo is client {kept['index']} of the round, not {index}"
                )
            client = SecAggClient.resume(index, setup, json.dumps(kept["client"]))
            reply = {}
            if step == "share":
                reply["package"] = client.share_keys(keys_from_json(payload["keys"])).to_json()
            elif step == "mask":
                vector = np.load(update_path) / float(payload["normaliser"])
                check_inputs([vector], float(payload["bound"]))
                masked = client.masked_input(vector, blobs_from_json(payload["shares"]))
                reply["masked"] = ArrayRecord({"masked": Array(masked)})
            else:
                reply["answer"] = self._unmask(
                    setup, int(kept["round"]), kept["silos"], payload, client
                )
            if step == "unmask":
                secrets_path.unlink()
                update_path.unlink(missing_ok=True)
            else:
                self._keep(secrets_path, kept, client)
        records = {k: v for k, v in reply.items() if isinstance(v, ArrayRecord)}
        text = {k: v for k, v in reply.items() if not isinstance(v, ArrayRecord)}
        text["seconds"] = time.perf_counter() - started
        return RecordDict({"secagg": ConfigRecord(text), **records})

    def _unmask(
        self,
        setup: RoundSetup,
        round_number: int,
        silos: list[int],
        payload: dict,
        client: SecAggClient | None,
    ) -> str:
        """Step 4 of round `round_number`: the answer for the server's roster, once its survivors
        and dropouts are the only ones this silo unmasks that round for (recorded before the
        answer leaves). `client` None: the session was answered already; its answer again."""
        roster = {}
        for name in ("survivors", "dropped"):
            indices = [int(i) for i in payload[name]]
            if not all(0 <= i < len(silos) for i in indices):
                raise ProtectionError(f"the server's {name} {indices} are not clients of the round")
            roster[name] = sorted(silos[i] for i in indices)
        path = self.unmasked / f"round-{round_number}.json"
        record = json.loads(path.read_text()) if path.exists() else {**roster, "answers": {}}
        if {name: record[name] for name in roster} != roster:
            raise ProtectionError(
                f"this silo already unmasked round {round_number} for survivors "
                f"{record['survivors']} (dropped {record['dropped']}); it refuses to unmask it for "
                f"survivors {roster['survivors']} (dropped {roster['dropped']}): the difference of "
                "two sums of one round would show the updates of the silos in one and not the other"
            )
        session = setup.session.hex()
        if session in record["answers"]:
            return record["answers"][session]["answer"]
        if client is None:
            raise ProtectionError(f"no answer kept for session {session[:8]}")
        answer = blobs_to_json(client.unmask(payload["survivors"], payload["dropped"]))
        record["answers"][session] = {"silos": silos, "answer": answer}
        write_private(path, json.dumps(record))  # on disk before the answer leaves
        return answer

    def _answered_session(self, setup: RoundSetup) -> tuple[int, list[int]] | None:
        """(round, silos) of the round whose unmasking this silo answered in `setup`'s session."""
        session = setup.session.hex()
        for path in self.unmasked.glob("round-*.json") if self.unmasked.is_dir() else ():
            record = json.loads(path.read_text())
            if session in record["answers"]:
                return int(path.stem.removeprefix("round-")), record["answers"][session]["silos"]
        return None

    @staticmethod
    def _keep(path: Path, kept: dict, client: SecAggClient) -> None:
        # Owner-only and moved into place whole: a crash never leaves a half-written secret file.
        write_private(path, json.dumps({**kept, "client": json.loads(client.secrets())}))


def handle_step(message: Message, context: Context) -> Message:
    state_dir = str(context.node_config.get("state-dir", ""))
    if not state_dir:
        raise FedShopError("the SuperNode's --node-config has no 'state-dir'")
    run = run_folder(Path(state_dir), str(message.content["secagg"].get("run", "")))
    return Message(SecAggSilo(run).step(message.content), reply_to=message)
