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

import os
import re
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedshop.config import RunConfig, config_from_toml
from fedshop.deploy import wire
from fedshop.deploy.silo_files import read_silo_file
from fedshop.errors import FedShopError
from fedshop.fl.client import SiloClient
from fedshop.fl.stages import AggregationPipeline

_STATE = re.compile(r"round-(\d+)\.pt$")


class SiloNode:
    """A silo as the node config describes it."""

    def __init__(self, node_config: dict) -> None:
        for key in ("silo-data", "state-dir"):
            if not str(node_config.get(key, "")):
                raise FedShopError(f"the SuperNode's --node-config has no {key!r}")
        self.data, self.meta = read_silo_file(str(node_config["silo-data"]))
        self.index = int(self.meta["index"])
        self.state_dir = Path(str(node_config["state-dir"]))
        self.state_dir.mkdir(parents=True, exist_ok=True)

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
                    }
                )
            }
        )

    def client(self, config: RunConfig, before_round: int) -> SiloClient:
        """The silo's `SiloClient` (the simulator's class) with its state after the latest round
        it trained in before `before_round`."""
        client = SiloClient(
            self.index, self.data, config.model, config.train,
            AggregationPipeline.for_aggregation(config.federated.aggregation), config.seed,
            config.federated.client_learning_rate,
        )  # fmt: skip
        rounds = sorted(
            int(m.group(1)) for p in self.state_dir.iterdir() if (m := _STATE.match(p.name))
        )
        earlier = [r for r in rounds if r < before_round]
        if earlier:
            state = torch.load(self.state_dir / f"round-{earlier[-1]}.pt", weights_only=True)
            client.load_state_dict(state)
        return client

    def save(self, client: SiloClient, round_number: int) -> None:
        path = self.state_dir / f"round-{round_number}.pt"
        torch.save(client.state_dict(), path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)

    def train(self, content: RecordDict) -> RecordDict:
        """Train on the received model; with `evaluate`, first evaluate it (the server's previous
        round) with the private state it will train from, as the simulator evaluates it."""
        task = content["task"]
        config = config_from_toml(str(task["config"]))
        round_number = int(task["round"])
        client = self.client(config, round_number)
        shared = wire.record_params(content["shared"])
        reply = {}
        if bool(task["evaluate"]):
            sums = client.evaluate(shared, config.eval.split)
            reply["metrics"] = wire.metrics_config(self.index, sums)
        fed = config.federated
        message = client.fit(shared, fed.local_epochs, fed.reconstruction_epochs)
        self.save(client, round_number)
        return wire.update_record(self.index, message, reply)

    def evaluate(self, content: RecordDict) -> RecordDict:
        """Metric sums of this silo's customers for the model of round `round`. With `final`, also
        after refitting its private vectors to it (personalisation, kept), as the simulator does
        after the last round."""
        task = content["task"]
        config = config_from_toml(str(task["config"]))
        round_number = int(task["round"])
        client = self.client(config, round_number + 1)
        shared = wire.record_params(content["shared"])
        reply = {
            "metrics": wire.metrics_config(self.index, client.evaluate(shared, config.eval.split))
        }
        if bool(task["final"]):
            client.personalise(shared, config.federated.personalise_epochs)
            torch.save(client.private_state(), self.state_dir / "final.pt")
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
