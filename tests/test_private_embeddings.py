"""The guarantee: a silo's private parameters (user embeddings, item-bias offsets) never leave it.

We inspect exactly what a silo sends."""

import dataclasses

import torch

from fedshop.config import RunConfig, load_config
from fedshop.fl.aggregation import STEPS_KEY
from fedshop.fl.client import LocalTask
from fedshop.fl.in_process import build_federation
from fedshop.messages import ClientMessage
from fedshop.models.mf import PRIVATE_PARAMETERS, SHARED_PARAMETERS


def small_config() -> RunConfig:
    return load_config(overrides={"model.dim": 8, "federated.rounds": 1, "seed": 3})


def test_a_silo_sends_only_shared_parameters(retail):
    config = small_config()
    run = build_federation(retail, config)
    silo = run.clients[2]  # a small storefront
    before_state = silo.private_state()
    sent = silo.fit(run.server.shared, LocalTask(epochs=1))
    after_state = silo.private_state()
    before, after = before_state["user_embedding"], after_state["user_embedding"]

    # The message type has exactly these fields: tensors, weight, example and step counts, and
    # the DP event of the noise the silo added (none here: a plan's public parameters under DP).
    assert [f.name for f in dataclasses.fields(ClientMessage)] == [
        "tensors",
        "weight",
        "num_examples",
        "local_steps",
        "dp_event",
    ]
    assert sent.dp_event is None
    assert set(before_state) == set(PRIVATE_PARAMETERS)
    assert set(sent.tensors) - {STEPS_KEY} == set(SHARED_PARAMETERS)
    assert not set(sent.tensors) & set(PRIVATE_PARAMETERS)
    assert sent.tensors["item_embedding"].shape == (retail.n_items, config.model.dim)
    assert sent.tensors["item_bias"].shape == (retail.n_items,)
    assert sent.num_examples == silo.data.n_train
    # The user embeddings did train, yet no sent tensor contains any user's vector.
    assert not torch.equal(before, after)
    offsets = after_state["silo_item_bias"]
    assert offsets.abs().sum() > 0  # the silo's local-taste offsets trained too
    for tensor in sent.tensors.values():
        if tensor.shape == offsets.shape[1:]:
            assert not torch.allclose(tensor / sent.weight, offsets[0])
        rows = tensor.reshape(tensor.shape[0], -1)
        for user_vector in (before, after):
            if rows.shape[1] == user_vector.shape[1]:
                matches = torch.cdist(user_vector, rows / sent.weight).min(dim=1).values
                assert bool((matches > 1e-6).all())
    assert all(t.shape[0] == retail.n_items for k, t in sent.tensors.items() if k != STEPS_KEY)


def test_the_server_only_ever_holds_what_silos_sent(retail):
    config = small_config()
    run = build_federation(retail, config)
    received: list[ClientMessage] = []
    original_apply = run.server.apply

    def recording_apply(messages):
        received.extend(messages)
        return original_apply(messages)

    run.server.apply = recording_apply
    shared = run.server.shared
    run.server.apply([client.fit(shared, LocalTask(1)) for client in run.clients])
    assert len(received) == retail.n_silos
    for message in received:
        assert set(message.tensors) - {STEPS_KEY} == set(SHARED_PARAMETERS)
    # Nothing on the server is shaped like a silo's user table.
    server_tensors = list(run.server.shared.values())
    assert all(t.shape[0] == retail.n_items for t in server_tensors)
    names = ("user_embedding", "silo_item_bias", "users", "clients")
    assert not any(hasattr(run.server, name) for name in names)
