"""A deployment's traffic: the bytes of the Flower messages between the server and each silo, as
serialised on the wire, in every round's history entry."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedshop.deploy import wire
from fedshop.deploy.server_app import TrafficMeter, message_bytes


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """A Flower message is made within a task (a ServerApp's): its run and node, as Flower sets
    them in the task's process."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _message(params: dict[str, torch.Tensor], node: int = 7) -> Message:
    content = RecordDict({"task": ConfigRecord({"round": 1}), "shared": wire.params_record(params)})
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id="round-1")


def test_a_message_measures_its_serialised_size_at_least_its_float32_model():
    small = _message({"w": torch.zeros(10)})
    large = _message({"w": torch.zeros(1000)})
    assert message_bytes(small) >= 10 * 4
    assert message_bytes(large) >= 1000 * 4
    # The model's bytes and a little framing: no more than what the arrays take and a few hundred.
    assert message_bytes(large) - message_bytes(small) == pytest.approx(990 * 4, abs=64)


def test_the_meter_counts_each_silos_messages_from_the_silos_side():
    meter = TrafficMeter()
    meter.start()
    to_silo = _message({"w": torch.zeros(100)})
    meter.sent(0, to_silo)
    meter.sent(0, to_silo)
    meter.sent(None, to_silo)  # a node serving no silo: not counted
    reply = Message(RecordDict({"x": ConfigRecord({"a": 1})}), reply_to=to_silo)
    meter.received(0, reply)
    traffic = meter.traffic()
    assert traffic.source == "flower"
    assert traffic.received == {0: 2 * message_bytes(to_silo)}  # what the silo received
    assert traffic.sent == {0: message_bytes(reply)}  # what it sent
    meter.start()
    assert meter.traffic().sent == {} and meter.traffic().received == {}


def model_bytes(shared: dict) -> int:
    """The float32 size of a model (safetensors `shared`)."""
    return sum(t.numel() * 4 for t in shared.values())


def check_history_traffic(metrics: dict, names: list[str], float32_model: int) -> None:
    """Every round's entry in a deployed run's metrics.json names each silo's bytes, counted by
    Flower: each silo received at least the model and sent something."""
    history = metrics["history"]
    assert history
    for entry in history:
        traffic = entry["traffic"]
        assert traffic["source"] == "flower", json.dumps(traffic)
        assert set(traffic["parties"]) == set(names)
        for party in traffic["parties"].values():
            assert party["received"] >= float32_model
            assert party["sent"] > 0


def test_a_dead_executor_is_started_again_while_its_supernode_runs(tmp_path):
    """`LocalFederation.supervise`: a silo whose SuperNode runs and whose executor exited gets a
    new executor; a silo whose SuperNode is gone does not."""
    import subprocess
    import sys

    from fedshop.deploy.processes import LocalFederation

    federation = object.__new__(LocalFederation)  # no processes of Flower's: only the bookkeeping
    federation.folder = tmp_path
    federation.runtimes = {0: (1, tmp_path / "s0"), 1: (2, tmp_path / "s1")}
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    federation.processes = {
        "silo-0": alive, "silo-0-executor": dead, "silo-1": dead, "silo-1-executor": dead,
    }  # fmt: skip
    started = []
    federation.start_executor = started.append
    try:
        federation.supervise()
    finally:
        alive.kill()
        alive.wait()
    assert started == [0]
    assert "starting it again" in (tmp_path / "logs" / "silo-0.log").read_text()
