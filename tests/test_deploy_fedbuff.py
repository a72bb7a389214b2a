"""FedBuff in a deployment (`[communication] schedule = "fedbuff"`): the server keeps training
messages in flight across steps and steps on the first `buffer_size` replies; a slow storefront no
longer holds every round (`deploy/fedbuff.py`, `server_app.GridTransport._buffered`)."""

from __future__ import annotations

import json

import pytest

from fedshop.config import load_config
from fedshop.deploy.fedbuff import Arrived, InFlight


def test_in_flight_keeps_messages_across_steps_and_forgets_the_late():
    flight = InFlight(timeout=10.0)
    flight.add("a", silo=0, node=100, round_number=1, now=0.0)
    flight.add("b", silo=1, node=101, round_number=1, now=0.0)
    flight.add("c", silo=2, node=102, round_number=2, now=5.0)
    assert flight.busy() == {0, 1, 2} and flight.occupied() == 3
    # A reply from another node than the one asked answers the message but is ignored.
    assert flight.answer("b", src_node=999) is None and "b" not in flight.ids()
    assert flight.answer("unknown", src_node=100) is None
    sent = flight.answer("a", src_node=100)
    assert sent is not None and (sent.silo, sent.round) == (0, 1)
    flight.arrived.append(Arrived(sent.silo, sent.round, update=None))
    assert flight.busy() == {0, 2}  # silo 0's reply waits for a step: it is not sent another
    assert Arrived(0, 1, None).staleness(3) == 2 and Arrived(0, 3, None).staleness(3) == 0
    # Unanswered for longer than the timeout: given up, never pulled again.
    assert [s.silo for s in flight.give_up(now=12.0)] == []
    assert [s.silo for s in flight.give_up(now=15.5)] == [2] and flight.ids() == []
    flight.arrived.append(Arrived(3, 2, None))
    assert [a.silo for a in flight.take(1)] == [0] and [a.silo for a in flight.arrived] == [3]
    flight.add("d", silo=1, node=101, round_number=4, now=16.0)
    sent_left, arrived_left = flight.drop()
    assert [s.silo for s in sent_left] == [1] and [a.silo for a in arrived_left] == [3]
    assert flight.occupied() == 0 and flight.answer("d", src_node=101) is None


@pytest.mark.slow
@pytest.mark.usefixtures("nginx", "data_dir")
def test_a_deployed_fedbuff_run_steps_without_its_slowest_storefront(tmp_path):
    from deployed_runs import deploy_local, verified_audit

    rounds = 4
    config = load_config(
        overrides={
            "methods": ["federated"], "model.dim": 8, "federated.rounds": rounds,
            "data.max_silos": 4, "federated.personalise_epochs": 1,
            "communication.schedule": "fedbuff", "communication.buffer_size": 2,
        }
    )  # fmt: skip
    out, _ = deploy_local(config, tmp_path, timeout=1500)
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    assert [h["round"] for h in history] == list(range(1, rounds + 1))
    assert all(h["clients"] == 2 and len(h["staleness"]) == 2 for h in history)
    # The UK storefront (by far the most purchases) trains slowest: some steps go on without it.
    assert any("United Kingdom" not in h["staleness"] for h in history)
    # Replies that missed a step arrive in a later one, discounted: trained on an older model.
    assert any(s > 0 for h in history for s in h["staleness"].values())
    assert all("hr@10" in h for h in history)  # each step's model evaluated in its own exchange
    assert metrics["federated"]["hr@10"] >= 0
    # Every participant's acknowledgement verifies against the model of the round it started from.
    verified_audit(out, 4, rounds=rounds)
    # What was still in flight at the end was dropped, said so in the server's log.
    server_log = next(out.rglob("server.log")).read_text()
    assert "FedBuff: the run is over" in server_log
