"""A deployed silo's side of secure aggregation: the simulator's `SecAggClient`, one step per message.

The silo trains as usual (`silo_app.py`), keeps its staged update in its state folder and answers the
round's four SecAgg steps (`secure/secagg.py`) one message at a time: advertise keys (with the
training reply), share keys, send the masked update, answer the unmasking. Flower starts a fresh
process for every message, so the client's round secrets live in a file of the run's folder in the
silo's state folder (readable by the silo's user only) between steps, named by the round's session;
the file and the kept update are deleted once the silo has answered the unmasking, and a new round's
training removes whatever an abandoned round left.

Only numpy and `cryptography` load here: these steps do not pay for importing PyTorch.
"""

from __future__ import annotations

import json
import re
import time
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
    """The SecAgg files of one silo's run folder (`run_folder`)."""

    def __init__(self, run_dir: Path) -> None:
        self.folder = run_dir / "secagg"

    def _paths(self, setup: RoundSetup) -> tuple[Path, Path]:
        session = setup.session.hex()
        return self.folder / f"{session}.json", self.folder / f"{session}-update.npy"

    def start(self, setup: RoundSetup, index: int, update: np.ndarray) -> ConfigRecord:
        """Step 1, after training: keep `update` (the staged message, flattened, not yet divided by
        the round's total weight) and advertise fresh keys."""
        started = time.perf_counter()
        private_dir(self.folder)
        for stale in self.folder.iterdir():  # an abandoned round's secrets
            stale.unlink()
        client = SecAggClient(index, setup)
        c_public, s_public = client.advertise()
        secrets_path, update_path = self._paths(setup)
        with private_writer(update_path) as f:  # the silo's update in the clear
            np.save(f, update)
        self._keep(secrets_path, client)
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
        secrets_path, update_path = self._paths(setup)
        if not secrets_path.exists():
            raise ProtectionError(
                f"no secrets for session {setup.session.hex()[:8]}: this silo did not start that "
                "round, or already finished it"
            )
        client = SecAggClient.resume(index, setup, secrets_path.read_text())
        payload = json.loads(str(record["payload"]))
        reply: dict = {}
        if step == "share":
            reply["package"] = client.share_keys(keys_from_json(payload["keys"])).to_json()
        elif step == "mask":
            vector = np.load(update_path) / float(payload["normaliser"])
            check_inputs([vector], float(payload["bound"]))
            masked = client.masked_input(vector, blobs_from_json(payload["shares"]))
            reply["masked"] = ArrayRecord({"masked": Array(masked)})
        else:
            answer = client.unmask(payload["survivors"], payload["dropped"])
            reply["answer"] = blobs_to_json(answer)
        if step == "unmask":
            secrets_path.unlink()
            update_path.unlink(missing_ok=True)
        else:
            self._keep(secrets_path, client)
        records = {k: v for k, v in reply.items() if isinstance(v, ArrayRecord)}
        text = {k: v for k, v in reply.items() if not isinstance(v, ArrayRecord)}
        text["seconds"] = time.perf_counter() - started
        return RecordDict({"secagg": ConfigRecord(text), **records})

    @staticmethod
    def _keep(path: Path, client: SecAggClient) -> None:
        # Owner-only and moved into place whole: a crash never leaves a half-written secret file.
        write_private(path, client.secrets())


def handle_step(message: Message, context: Context) -> Message:
    state_dir = str(context.node_config.get("state-dir", ""))
    if not state_dir:
        raise FedShopError("the SuperNode's --node-config has no 'state-dir'")
    run = run_folder(Path(state_dir), str(message.content["secagg"].get("run", "")))
    return Message(SecAggSilo(run).step(message.content), reply_to=message)
