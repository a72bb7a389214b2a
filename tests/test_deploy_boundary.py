"""The server's boundary in a deployment: what it accepts from the nodes that reach it.

The real ServerApp (`serve`) runs in this process against real silos (`SiloNode` over their own data
files and state folders); only the transport is this file's: a Grid that hands each message to the
node's handler at once. Some nodes are attackers: a real silo whose replies are tampered with.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, replace

import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedshop.config import DataConfig, load_config
from fedshop.data.datasets import load_dataset
from fedshop.deploy import wire
from fedshop.deploy.identities import IdentityError, SiloNodes, silo_of_key
from fedshop.deploy.launch import DeploySettings, prepare, run_config
from fedshop.deploy.server_app import serve
from fedshop.deploy.silo_app import SiloNode
from fedshop.deploy.silo_policy import (
    LEDGER_FILE,
    PolicyError,
    SiloLedger,
    SiloPolicy,
    policy_path,
)
from fedshop.errors import FedShopError
from fedshop.messages import ClientMessage
from fedshop.secure.secagg import SecAggSum

SMALL = {
    "methods": ["federated"], "model.dim": 8, "federated.rounds": 2, "data.max_silos": 3,
    "federated.personalise_epochs": 1,
}  # fmt: skip

Handler = Callable[[Message], RecordDict]


class InstantGrid:
    """Flower's Grid as the ServerApp uses it, each node a handler called when a message is pushed
    (a real deployment carries the same messages between processes)."""

    def __init__(self, nodes: dict[int, Handler]) -> None:
        self.nodes = nodes
        self.inbox: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for message in messages:
            # What the Grid does when it stores a message: its id is its content's digest.
            message.metadata.__dict__["_message_id"] = message.object_id
            node = message.metadata.dst_node_id
            TaskIdentity.node_id = node  # the reply's source: the node the message went to
            try:
                self.inbox.append(Message(self.nodes[node](message), reply_to=message))
            except FedShopError as exc:  # as Flower reports a ClientApp's exception
                self.inbox.append(Message(error=Error(0, str(exc)), reply_to=message))
            TaskIdentity.node_id = 0
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, ids) -> list[Message]:
        arrived = [m for m in self.inbox if m.metadata.reply_to_message_id in set(ids)]
        self.inbox = [m for m in self.inbox if m not in arrived]
        return arrived


def silo_handler(node: SiloNode) -> Handler:
    """A silo's ClientApp: the message types the ServerApp sends, to the real `SiloNode`."""

    def handle(message: Message) -> RecordDict:
        kind = message.metadata.message_type
        if kind == MessageType.QUERY:
            return node.hello()
        if kind == MessageType.TRAIN:
            return node.train(message.content)
        return node.evaluate(message.content)

    return handle


@pytest.fixture(scope="module")
def three_silos(data_dir):
    return load_dataset(DataConfig(max_silos=3))


@pytest.fixture
def federation(three_silos, tmp_path):
    """Three silos' files and state folders, the server's config, and a run config; nodes 101–103
    registered as silos 0–2."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    config = load_config(overrides=SMALL)
    folder = tmp_path / "deployment"
    silos, server_config = prepare(config, three_silos, folder)
    nodes = SiloNodes({0: 101, 1: 102, 2: 103})
    nodes.write(folder / "node-silos.json")
    settings = DeploySettings(round_timeout=5, wait_timeout=3)
    settings_record = run_config(folder, server_config, 3, settings, folder / "node-silos.json")
    real = {
        101 + s.index: SiloNode({"silo-data": str(s.data), "state-dir": str(s.state)})
        for s in silos
    }
    return folder, settings_record, real


def _serve(nodes: dict[int, Handler], settings_record: dict) -> None:
    serve(InstantGrid(nodes), Context(1, 0, {}, RecordDict(), dict(settings_record)))


def _outcome(folder):
    return json.loads((folder / "server" / "outcome.json").read_text())


def _log(folder) -> str:
    return (folder / "server" / "server.log").read_text()


def test_honest_silos_train_through_the_instant_grid(federation):
    folder, settings_record, real = federation
    _serve({n: silo_handler(node) for n, node in real.items()}, settings_record)
    history = _outcome(folder)["history"]
    assert [r["clients"] for r in history] == [[0, 1, 2], [0, 1, 2]]
    # A silo's hello says who it is, not how many customers it has (only its noisy count, under
    # DP, says anything of its size).
    assert set(real[101].hello()["silo"]) == {"silo", "name", "n-items", "catalogue", "dataset"}


def test_a_deployments_server_needs_delta_in_the_config():
    from fedshop.experiment import record_level_plan

    config = load_config(overrides={"privacy.mode": "record", "privacy.epsilon": 4.0})
    with pytest.raises(FedShopError, match="delta is needed"):
        record_level_plan(config, None)
    stated = load_config(overrides={"privacy.mode": "record", "privacy.epsilon": 4.0,
                                    "privacy.delta": 2e-5})  # fmt: skip
    assert record_level_plan(stated, None).delta == 2e-5
    # The same ε as the simulator's plan, which knows the counts, for the same δ.
    assert record_level_plan(stated, None).planned_epsilon() == pytest.approx(
        record_level_plan(stated, [3000, 1000]).planned_epsilon()
    )


def test_a_malformed_update_is_a_failed_reply_and_the_round_goes_on(federation):
    """Silo 2's node sends NaN in round 1, a tensor of the wrong shape in round 2: both rounds are
    applied with silos 0 and 1, and the log says why silo 2 was left out."""
    folder, settings_record, real = federation
    honest = silo_handler(real[103])

    def broken(message: Message) -> RecordDict:
        reply = honest(message)
        if message.metadata.message_type != MessageType.TRAIN:
            return reply
        update = wire.record_params(reply["update"])
        name = sorted(update)[0]
        if int(message.content["task"]["round"]) == 1:
            update[name] = torch.full_like(update[name], float("nan"))
        else:
            update[name] = torch.zeros(3, 3)
        reply["update"] = wire.params_record(update)
        return reply

    nodes = {n: silo_handler(node) for n, node in real.items()} | {103: broken}
    settings_record = {**settings_record, "min-silos": 2}
    _serve(nodes, settings_record)
    assert [r["clients"] for r in _outcome(folder)["history"]] == [[0, 1], [0, 1]]
    log = _log(folder)
    assert "silo 2's reply refused" in log and "NaN" in log and "layout" in log


def test_a_node_cannot_answer_for_another_silo(federation):
    """Silo 2's node claims to be silo 0 in its hello, then files its update under silo 1: the
    server takes it for silo 2 (the key it registered) or not at all."""
    folder, settings_record, real = federation
    honest = silo_handler(real[103])

    def impostor(message: Message) -> RecordDict:
        reply = honest(message)
        if message.metadata.message_type == MessageType.QUERY:
            reply["silo"]["silo"] = 0
        return reply

    nodes = {n: silo_handler(node) for n, node in real.items()} | {103: impostor}
    with pytest.raises(FedShopError, match="only 2 of the 3 silos"):
        _serve(nodes, settings_record)
    assert "serves silo 2 but says it is silo 0: refused" in _log(folder)

    def misfiling(message: Message) -> RecordDict:
        reply = honest(message)
        if "meta" in reply:
            reply["meta"]["silo"] = 1
        return reply

    nodes[103] = misfiling
    _serve(nodes, {**settings_record, "min-silos": 2})
    assert [r["clients"] for r in _outcome(folder)["history"]] == [[0, 1], [0, 1]]
    assert "claims silo 1, but its node serves silo 2" in _log(folder)


def test_an_unregistered_node_is_ignored(federation):
    """A node the operator did not register for any silo (the SuperLink let it in: a key registered
    by someone else) is never asked anything and never counted."""
    folder, settings_record, real = federation
    asked = []

    def stranger(message: Message) -> RecordDict:
        asked.append(message.metadata.message_type)
        return real[101].hello()

    nodes = {n: silo_handler(node) for n, node in real.items()} | {999: stranger}
    _serve(nodes, settings_record)
    assert asked == []
    assert "node 999 is not registered for any silo: ignored" in _log(folder)


def test_the_node_map_refuses_duplicates_and_bad_names(tmp_path):
    nodes = SiloNodes()
    nodes.add(0, 11)
    nodes.add(0, 11)  # the same pair again: fine (a resumed registration)
    with pytest.raises(IdentityError, match="already served"):
        nodes.add(0, 12)
    with pytest.raises(IdentityError, match="already serves"):
        nodes.add(1, 11)
    path = tmp_path / "nodes.json"
    path.write_text('{"0": 11, "1": 11}')
    with pytest.raises(IdentityError, match="already serves"):
        SiloNodes.read(path)
    path.write_text("[1, 2]")
    with pytest.raises(IdentityError, match="cannot read"):
        SiloNodes.read(path)
    nodes.write(path)
    assert SiloNodes.read(path) == nodes and path.stat().st_mode & 0o077 == 0
    assert silo_of_key(tmp_path / "silo-12.pub") == 12
    with pytest.raises(IdentityError, match=r"silo-<index>\.pub"):
        silo_of_key(tmp_path / "intruder.pub")


def test_record_update_checks_what_it_decodes():
    layout = [("items", (4, 2), "float32")]
    good = ClientMessage({"items": torch.ones(4, 2)}, 1.0, 3.0, 2)
    content = wire.update_record(0, good)
    assert wire.record_update(content, 0, layout).num_examples == 3.0
    content["meta"]["weight"] = float("inf")
    with pytest.raises(wire.BadReplyError, match="finite"):
        wire.record_update(content, 0, layout)
    del content["meta"]["weight"]
    with pytest.raises(wire.BadReplyError, match="malformed"):
        wire.record_update(content, 0, layout)
    content = wire.update_record(0, good)
    content["meta"]["dp-event"] = "{not json"
    with pytest.raises(wire.BadReplyError, match="malformed"):
        wire.record_update(content, 0, layout)
    metrics = RecordDict({"metrics": ConfigRecord({"silo": 1, "users": 5})})
    with pytest.raises(wire.BadReplyError, match="malformed"):
        wire.record_metrics(metrics, 1)


# ---- silos enforce their own protection ------------------------------------------------------


def test_a_silo_whose_policy_requires_secagg_refuses_a_plain_task(federation, capsys):
    """Silo 2's policy asks for secure aggregation; the coordinator sends plain tasks. Silo 2
    never trains; both logs say why; the rounds go on with silos 0 and 1."""
    folder, settings_record, real = federation
    policy = policy_path(folder / "silos" / "silo-2.npz")
    policy.write_text(SiloPolicy(require_secagg=True).to_toml())
    strict = SiloNode({"silo-data": str(folder / "silos" / "silo-2.npz"),
                       "state-dir": str(folder / "silos" / "silo-2-state")})  # fmt: skip
    nodes = {101: silo_handler(real[101]), 102: silo_handler(real[102]), 103: silo_handler(strict)}
    _serve(nodes, {**settings_record, "min-silos": 2})
    assert [r["clients"] for r in _outcome(folder)["history"]] == [[0, 1], [0, 1]]
    assert "node 103 failed: the silo's policy requires secure aggregation" in _log(folder)
    assert (
        "fedshop silo refused a task: the silo's policy requires secure" in capsys.readouterr().err
    )
    assert not list((folder / "silos" / "silo-2-state").glob("round-*.pt"))  # it never trained


def test_a_silo_without_a_policy_file_does_not_start(federation):
    folder, _, _ = federation
    policy_path(folder / "silos" / "silo-0.npz").unlink()
    with pytest.raises(PolicyError, match="no policy file"):
        SiloNode({"silo-data": str(folder / "silos" / "silo-0.npz"), "state-dir": str(folder)})


def _plan(**privacy):
    from fedshop.experiment import record_level_plan

    overrides = {"privacy.mode": "record", "privacy.epsilon": 4.0, "federated.rounds": 5}
    return record_level_plan(load_config(overrides={**overrides, **privacy}), [600, 400])


def test_the_policy_checks_a_task_with_its_own_accountant():
    plan = _plan()
    policy = SiloPolicy(require_dp=True, min_noise_multiplier=plan.noise_multiplier,
                        max_delta=plan.delta, max_epsilon_per_run=4.0, budget_epsilon=10.0)  # fmt: skip
    policy.check_task(plan, None)
    with pytest.raises(PolicyError, match="requires record-level DP"):
        policy.check_task(None, None)
    weaker = replace(plan, noise_multiplier=plan.noise_multiplier / 2)
    with pytest.raises(PolicyError, match="noise multiplier"):
        policy.check_task(weaker, None)
    # More rounds at the same noise: the server may state any ε; the silo computes it.
    longer = replace(plan, rounds=plan.rounds * 4)
    with pytest.raises(PolicyError, match="accepts at most 4 per run"):
        replace(policy, min_noise_multiplier=0.0).check_task(longer, None)
    with pytest.raises(PolicyError, match="above the silo's maximum"):
        policy.check_task(replace(plan, delta=plan.delta * 10), None)
    setup = SecAggSum(threshold=1).setup_for(3, 10, 1.0)
    with pytest.raises(PolicyError, match="threshold 1 is below the silo's minimum 2"):
        policy.check_task(plan, setup)
    with pytest.raises(PolicyError, match="requires secure aggregation"):
        replace(policy, require_secagg=True).check_task(plan, None)


def test_a_policy_file_with_a_mistake_is_a_clear_error(tmp_path):
    path = tmp_path / "silo-0.policy.toml"
    for text, message in [
        ("[policy]\nrequire_secag = true\n", "unknown policy settings"),
        ("[policy]\nrequire_secagg = 1\n", "is not a bool"),
        ("[policy]\nbudget_epsilon = -1.0\n", "finite number"),
        ("[policy\n", "cannot read"),
    ]:
        path.write_text(text)
        with pytest.raises(PolicyError, match=message):
            SiloPolicy.read(path)


def test_the_silo_ledger_composes_every_release_and_refuses_past_its_budget(tmp_path):
    from fedshop.privacy.accounting import epsilon, repeated

    plan = _plan()
    event = plan.round_event
    # A budget between two releases and three, as the accountant composes them (not 3 × one).
    two, three = (epsilon(repeated(event, n), plan.delta) for n in (2, 3))
    policy = SiloPolicy(max_delta=plan.delta, budget_epsilon=(two + three) / 2)
    ledger = SiloLedger(tmp_path / "ledger.sqlite")
    first = ledger.spend("a", event, policy)
    assert ledger.spend("a", event, policy) == first  # the same bytes again tell nothing new
    ledger.spend("b", event, policy)
    with pytest.raises(PolicyError, match="past its budget"):
        ledger.spend("c", event, policy)
    assert ledger.releases() == 2
    # Another run, another process: the same file, the same total.
    with pytest.raises(PolicyError, match="2 releases so far"):
        SiloLedger(tmp_path / "ledger.sqlite").spend("d", event, policy)
    assert (tmp_path / "ledger.sqlite").stat().st_mode & 0o077 == 0


def test_under_dp_no_metric_sums_leave_a_silo(federation):
    """A task with a DP plan: the reply carries the update and its DP event, no metric sums (they
    are not an accounted release); the silo keeps them in its own folder."""
    folder, _, _ = federation
    config = load_config(overrides={**SMALL, "privacy.mode": "record", "privacy.epsilon": 8.0})
    silo_file = folder / "silos" / "silo-0.npz"
    plan = _plan(**{"privacy.epsilon": 8.0, "federated.rounds": 2})
    policy_path(silo_file).write_text(
        SiloPolicy(
            require_dp=True, max_delta=plan.delta, max_epsilon_per_run=100.0, budget_epsilon=100.0
        ).to_toml()
    )
    node = SiloNode({"silo-data": str(silo_file), "state-dir": str(folder / "s0")})
    shared = wire.params_record(_shared(config, node))
    run = "0123456789abcdef" * 2
    task = ConfigRecord({"round": 2, "config": config.to_toml(), "evaluate": True, "run": run,
                         "final": False, "dp-plan": json.dumps(asdict(plan))})  # fmt: skip
    reply = node.train(RecordDict({"task": task, "shared": shared}))
    assert "update" in reply and "metrics" not in reply
    assert wire.record_dp_event(reply["meta"]) is not None
    kept = folder / "s0" / "runs" / run
    assert (kept / "metrics-round-1.json").exists()
    evaluation = ConfigRecord({"round": 2, "config": config.to_toml(), "evaluate": False, "run": run,
                               "final": True, "private": True})  # fmt: skip
    reply = node.evaluate(RecordDict({"task": evaluation, "shared": shared}))
    assert "metrics" not in reply and "final" not in reply
    assert (kept / "metrics-final.json").stat().st_mode & 0o077 == 0
    assert SiloLedger(folder / "s0" / LEDGER_FILE).releases() == 2  # the count and the update


def _shared(config, node: SiloNode):
    from fedshop.models.spec import get_model
    from fedshop.seeding import torch_generator

    spec = get_model(config.model.name)
    return spec.init_shared(int(node.meta["n_items"]), config.model, torch_generator(1, "x"))
