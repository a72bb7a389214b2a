"""SASRec and its federated training (fl/sequences.py) on a slice of the real Toys file."""

import dataclasses

import numpy as np
import pytest
import torch
from tests.test_cli import assert_one_line_error, fedshop

from fedshop.config import DataConfig, load_config
from fedshop.data.datasets import load_dataset
from fedshop.errors import ConfigError
from fedshop.fl.sequences import (
    Examples,
    SeqSettings,
    client_message,
    evaluate_params,
    evaluate_silos,
    popularity_scores,
    round_sum,
    run_federated_sequences,
    summarise,
    trainable_users,
)
from fedshop.messages import AggregationPipeline
from fedshop.models import sasrec

SHAPE = sasrec.SasRecShape(dim=16, maxlen=20, blocks=2, dropout=0.0)


@pytest.fixture(scope="module")
def toys_slice(data_dir, tmp_path_factory):
    """The first 1,500 shoppers of the S3-Rec Toys file, validation item held out."""
    lines = (data_dir / "amazon-2014-5core" / "Toys_and_Games.txt").read_text().splitlines()
    path = tmp_path_factory.mktemp("toys") / "toys_slice.txt"
    path.write_text("\n".join(lines[:1500]) + "\n")
    config = DataConfig(dataset="amazon-sequential", path=str(path), validation=True, silos=3)
    return load_dataset(config, seed=1)


def params_for(n_items, seed=0, shape=SHAPE):
    return sasrec.init_params(n_items, shape, torch.Generator().manual_seed(seed))


def test_sequences_follow_the_split(toys_slice):
    seqs = toys_slice.sequences
    for user in range(toys_slice.n_users):
        assert set(seqs.train(user).tolist()) == set(toys_slice.train[user].indices.tolist())
        test = toys_slice.test[user].indices
        if len(test):  # the test input ends with the validation item (when it is in the catalogue)
            full = seqs.items[seqs.indptr[user] : seqs.indptr[user + 1]]
            assert full[-1] == test[0]
            assert len(seqs.history(user, "test")) == len(seqs.train(user)) + (full[-2] >= 0)


def test_attention_is_causal_and_padding_is_invisible():
    params = params_for(50)
    items = torch.tensor([[3, 7, 1, 9, 4, 12, 8, 5]])
    mask = torch.ones_like(items, dtype=torch.bool)
    before = sasrec.hidden_states(params, items, mask)
    changed = items.clone()
    changed[0, 5:] = torch.tensor([30, 31, 32])
    after = sasrec.hidden_states(params, changed, mask)
    torch.testing.assert_close(after[0, :5], before[0, :5])  # positions ≤ 4 never read later ones
    assert not torch.allclose(after[0, 5:], before[0, 5:])
    # The same sequence left-padded in a longer batch gives the same last state.
    padded = torch.cat([torch.zeros(1, 6, dtype=torch.long), items], 1)
    padded_mask = torch.cat([torch.zeros(1, 6, dtype=torch.bool), mask], 1)
    torch.testing.assert_close(
        sasrec.last_state(params, padded, padded_mask), sasrec.last_state(params, items, mask)
    )


def _loop_reference(params, examples, settings):
    """Each client alone: its own SGD steps with plain autograd, then the example-weighted sum."""
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for x_seq, y_seq in zip(examples.inputs, examples.targets, strict=True):
        p = {k: v.clone() for k, v in params.items()}
        x, m = torch.tensor(x_seq)[None], torch.ones(1, len(x_seq), dtype=torch.bool)
        y = torch.tensor(y_seq)[None]
        for _ in range(settings.local_epochs):
            leaves = {k: v.requires_grad_(True) for k, v in p.items()}
            loss, count = sasrec.sequence_loss(leaves, x, y, m, settings.loss)
            grads = torch.autograd.grad(loss / count, list(leaves.values()))
            p = {k: (v - settings.client_learning_rate * g).detach()
                 for (k, v), g in zip(leaves.items(), grads, strict=True)}  # fmt: skip
        for k in total:
            total[k] += len(y_seq) * (p[k] - params[k])
    return total


@pytest.mark.parametrize("local_epochs", [1, 3])
def test_vectorised_round_equals_a_loop_over_clients(toys_slice, local_epochs):
    settings = SeqSettings(shape=SHAPE, local_epochs=local_epochs, client_learning_rate=0.5)
    params = params_for(toys_slice.n_items)
    users = trainable_users(toys_slice.sequences)[[0, 3, 7, 11, 40]]
    examples = Examples.of(toys_slice.sequences, users, SHAPE.maxlen)
    expected = _loop_reference(params, examples, settings)
    for vectorised in (True, False) if local_epochs == 1 else (True,):
        got = round_sum(
            params, examples, toys_slice.n_items, settings, torch.Generator(), vectorised
        )
        assert got.weight == sum(len(t) for t in examples.targets)
        for k in expected:
            torch.testing.assert_close(got.tensors[k], expected[k], atol=1e-5, rtol=1e-4)


def test_only_shared_weights_leave_the_client(toys_slice):
    settings = SeqSettings(shape=SHAPE, local_epochs=2)
    params = params_for(toys_slice.n_items)
    sequence = toys_slice.sequences.train(5)
    message = client_message(params, sequence, settings, AggregationPipeline())
    assert message.tensors.keys() == params.keys()
    for name, tensor in message.tensors.items():
        assert tensor.shape == params[name].shape and tensor.dtype == torch.float32
    # Nothing of the shape of the sequence, and no integer data: the items stay on the device.
    assert message.num_examples == len(sequence) - 1  # the weight FedAvg needs, as for every model
    # Under BCE only the rows the client read change (the sparse part of the update).
    bce = dataclasses.replace(settings, loss="bce")
    sparse = client_message(params, sequence, bce, AggregationPipeline())
    changed = np.flatnonzero(sparse.tensors[sasrec.ITEM_TABLE].abs().sum(1).numpy() > 0)
    assert set(sequence.tolist()) <= set(changed.tolist()) and len(changed) <= 2 * len(sequence)


def test_a_short_federated_run_beats_popularity(toys_slice):
    config = load_config(
        overrides={
            "data.dataset": "amazon-sequential", "data.path": "unused.txt",
            "data.validation": True, "model.name": "sasrec", "model.dim": 32,
            "federated.mode": "cross-device", "federated.rounds": 300,
            "federated.clients_per_round": 64, "federated.server_learning_rate": 0.005,
            "federated.server_optimizer": "fedadam", "eval.eval_every": 1000,
        }
    )  # fmt: skip
    settings = SeqSettings.from_config(config, maxlen=20, dropout=0.1)
    fed = run_federated_sequences(toys_slice, config, settings)
    federated = summarise(fed.final)["hr@10"]
    popular = summarise(evaluate_silos(toys_slice, "test", popularity_scores(toys_slice)))["hr@10"]
    untrained = summarise(evaluate_params(params_for(toys_slice.n_items), toys_slice, "test", 20))
    assert federated > popular > untrained["hr@10"], (federated, popular)


def test_unsupported_combinations_are_config_errors():
    with pytest.raises(ConfigError, match="Amazon dataset"):
        load_config(overrides={"model.name": "sasrec"})  # online-retail
    with pytest.raises(ConfigError, match="full ranking only"):
        load_config(
            overrides={
                "model.name": "sasrec",
                "data.dataset": "amazon-toys",
                "eval.protocol": "sampled-100",
            }
        )
    defaults = load_config(
        overrides={
            "model.name": "sasrec",
            "data.dataset": "amazon-toys",
            "federated.mode": "cross-device",
        }
    )
    assert defaults.federated.server_optimizer == "fedadam"
    assert defaults.methods == ("federated", "centralized", "popularity")


def test_cli_refuses_unsupported_sasrec_runs_in_one_line(tmp_path):
    result = fedshop(
        "train", "--dataset", "amazon-toys", "--model", "sasrec", "--protocol", "sampled-100",
        "--out", tmp_path / "run",
    )  # fmt: skip
    assert_one_line_error(result, "full ranking only")
    result = fedshop("train", "--model", "sasrec", "--out", tmp_path / "run2")
    assert_one_line_error(result, "Amazon dataset")


def test_serve_refuses_a_sasrec_run_in_one_line(tmp_path):
    import json

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"fedshop_version": "x", "federated": {}}))
    (run / "serving.json").write_text(
        json.dumps(
            {"format": 1, "model": "sasrec", "mode": "cross-device", "n_items": 3, "silos": []}
        )
    )
    assert_one_line_error(fedshop("serve", run), "sasrec run")
