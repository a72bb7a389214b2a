"""The silo's side of a deployment: one storefront's process, its own data file and state folder.

Flower starts a fresh client process for every message, so everything a silo carries between rounds
(its private user vectors and its random stream) lives in its state folder, one file per round it
trained in. A silo that is asked to train round r starts from its state after the latest round
before r: asking twice for the same round (a restarted server) gives the same update, and a silo
that was down for some rounds resumes from where it stopped.

Node config (`flower-supernode --node-config`): `silo-data` (the silo's data file, written by
`fedshop deploy silo-data`) and `state-dir` (a folder of its own).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedshop.config import RunConfig, config_from_toml
from fedshop.deploy import wire
from fedshop.deploy.silo_files import read_silo_file
from fedshop.deploy.silo_secagg import SecAggSilo
from fedshop.errors import FedShopError
from fedshop.fl.aggregation import aggregation_pipeline
from fedshop.fl.client import LocalTask, SiloClient, SiloDp
from fedshop.secure.protected_sum import flatten
from fedshop.secure.secagg import RoundSetup
from fedshop.storage.private_files import (
    create_private_once,
    private_dir,
    private_writer,
    write_private,
)

if TYPE_CHECKING:  # DP and its accountant load only in DP runs: every message is a new process
    from fedshop.fl.dp_local import DpSgdState
    from fedshop.privacy.dp import DpPlan

_STATE = re.compile(r"round-(\d+)\.pt$")


class SiloNode:
    """A silo as the node config describes it."""

    def __init__(self, node_config: dict) -> None:
        for key in ("silo-data", "state-dir"):
            if not str(node_config.get(key, "")):
                raise FedShopError(f"the SuperNode's --node-config has no {key!r}")
        self.data, self.meta = read_silo_file(str(node_config["silo-data"]))
        self.index = int(self.meta["index"])
        self.state_dir = private_dir(Path(str(node_config["state-dir"])))

    def hello(self) -> RecordDict:
        """Who this silo is: the server maps silos to nodes and checks the catalogue agrees."""
        return RecordDict(
            {
                "silo": ConfigRecord(
                    {
                        "silo": self.index,
                        "name": self.data.name,
                        "n-items": int(self.meta["n_items"]),
                        "catalogue": self.meta["catalogue_digest"],
                        "dataset": str(self.meta["dataset"]),
                        # For the DP plan's δ, which counts on the largest silo (as in the
                        # simulator); the weights of the mean use a noisy count instead.
                        "customers": int(self.data.n_users),
                    }
                )
            }
        )

    def client(self, config: RunConfig, before_round: int) -> tuple[SiloClient, dict | None]:
        """The silo's `SiloClient` (the simulator's class) with its state after the latest round
        it trained in before `before_round`, and that round's saved DP-SGD state (or None)."""
        client = SiloClient(
            self.index, self.data, config.model, config.train,
            aggregation_pipeline(config.federated.aggregation), config.seed,
            config.federated.client_learning_rate,
        )  # fmt: skip
        rounds = [int(m.group(1)) for p in self.state_dir.iterdir() if (m := _STATE.match(p.name))]
        earlier = [r for r in rounds if r < before_round]
        if not earlier:
            return client, None
        state = torch.load(self.state_dir / f"round-{max(earlier)}.pt", weights_only=True)
        client.load_state_dict(state["client"])
        return client, state.get("dp")

    def save(self, client: SiloClient, round_number: int, dp: DpSgdState | None = None) -> None:
        path = self.state_dir / f"round-{round_number}.pt"
        state = {"client": client.state_dict()}
        if dp is not None:
            state["dp"] = {
                "optimizer": dp.optimizer.state_dict(),
                **{name: getattr(dp, name).get_state() for name in dp.STREAMS},
            }
        with private_writer(path) as f:
            torch.save(state, f)

    # Record-level DP. The silo's noise must be secret from the server, which knows the run's
    # seed: its random streams come from a secret that never leaves the silo's state folder (so a
    # DP deployment is not bit-equal to the simulator, whose streams follow the seed).

    @functools.cached_property
    def secret(self) -> bytes:
        return create_private_once(self.state_dir / "secret", os.urandom(32))

    def _seed(self, label: str) -> int:
        return int.from_bytes(hashlib.sha256(self.secret + label.encode()).digest()[:8], "big")

    def dp_state(self, config: RunConfig, saved: dict | None) -> DpSgdState:
        """The DP-SGD state as `saved` after an earlier round, or a fresh one."""
        from fedshop.fl.dp_local import DpSgdState

        streams = {
            name: torch.Generator().manual_seed(self._seed(name) >> 1)
            for name in DpSgdState.STREAMS
        }
        state = DpSgdState.start(config.train.learning_rate, streams)
        if saved is not None:
            state.optimizer.load_state_dict(saved["optimizer"])
            for name in DpSgdState.STREAMS:
                getattr(state, name).set_state(saved[name])
        return state

    def released_count(self, plan: DpPlan) -> float:
        """The silo's customer count with Gaussian noise, released once (its accounting is the
        plan's fixed event) and reused as the silo's weight every round."""
        from fedshop.privacy.dp import release_silo_counts

        path = self.state_dir / "released-count.json"
        if not path.exists():
            rng = np.random.default_rng(self._seed("count"))
            count = release_silo_counts([self.data.n_users], plan, rng)[0]
            write_private(path, json.dumps({"count": float(count)}))
        return float(json.loads(path.read_text())["count"])

    def _task(self, content: RecordDict, before_offset: int):
        task = content["task"]
        config = config_from_toml(str(task["config"]))
        client, saved_dp = self.client(config, int(task["round"]) + before_offset)
        return task, config, client, saved_dp, wire.record_params(content["shared"])

    def train(self, content: RecordDict) -> RecordDict:
        """Train on the received model; with `evaluate`, first evaluate it (the server's previous
        round) with the private state it will train from, as the simulator evaluates it."""
        task, config, client, saved_dp, shared = self._task(content, 0)
        reply = {}
        if bool(task["evaluate"]):
            sums = client.evaluate(shared, config.eval.split)
            reply["metrics"] = wire.metrics_config(self.index, sums)
        plan = None
        if "dp-plan" in task:
            from fedshop.privacy.dp import DpPlan

            plan = DpPlan(**json.loads(str(task["dp-plan"])))
            client.dp = SiloDp(self.dp_state(config, saved_dp), self.released_count(plan))
        message = client.fit(shared, LocalTask.of_run(config, plan))
        self.save(client, int(task["round"]), client.dp.state if client.dp else None)
        if "secagg-setup" in task:
            # Under secure aggregation the update stays here; the reply advertises SecAgg keys.
            setup = RoundSetup.from_json(str(task["secagg-setup"]))
            update = flatten(message, 1.0)
            keys = SecAggSilo(self.state_dir).start(setup, int(task["secagg-index"]), update)
            meta = wire.meta_record(self.index, message)
            return RecordDict({"meta": meta, "secagg": keys, **reply})
        return wire.update_record(self.index, message, reply)

    def evaluate(self, content: RecordDict) -> RecordDict:
        """Metric sums of this silo's customers for the model of round `round`. With `final`, also
        after refitting its private vectors to it (personalisation, kept), as the simulator does
        after the last round."""
        task, config, client, _, shared = self._task(content, 1)
        reply = {
            "metrics": wire.metrics_config(self.index, client.evaluate(shared, config.eval.split))
        }
        if bool(task["final"]):
            client.personalise(shared, config.federated.personalise_epochs)
            with private_writer(self.state_dir / "final.pt") as f:
                torch.save(client.private_state(), f)
            sums = client.evaluate(shared, config.eval.split)
            reply["final"] = wire.metrics_config(self.index, sums)
        return RecordDict(reply)


def handle(message: Message, context: Context, what: str) -> Message:
    node = SiloNode(dict(context.node_config))
    if what == "hello":
        content = node.hello()
    elif what == "train":
        content = node.train(message.content)
    else:
        content = node.evaluate(message.content)
    return Message(content, reply_to=message)
