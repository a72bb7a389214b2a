"""Privacy noise nobody can predict: the run seed is public (config.toml, the report), so DP noise and
the sampling its accounting amplifies on come from a secret key, two DP runs from the same config add
different noise, and only an explicit [privacy] noise_seed makes them repeatable, which the privacy
block then reports as not private. Everything else stays reproducible from the run seed."""

from __future__ import annotations

import pytest
import torch

from fedshop.config import load_config
from fedshop.experiment import open_privacy, run_experiment
from fedshop.fl.dp_local import DpSgdState
from fedshop.fl.in_process import make_server
from fedshop.messages import AggregationPipeline
from fedshop.report.html import privacy_section
from fedshop.report.run_folder import metrics_document
from fedshop.seeding import NoiseStream

RECORD = {
    "methods": ["federated"], "model.dim": 8, "federated.rounds": 1,
    "federated.personalise_epochs": 0, "privacy.mode": "record", "privacy.noise_multiplier": 1.0,
    "privacy.local_steps": 2, "privacy.budget": 1e6,
}  # fmt: skip
USER = {
    "methods": ["federated"], "model.dim": 8, "federated.rounds": 2,
    "federated.mode": "cross-device", "federated.clients_per_round": 300,
    "federated.personalise_epochs": 0, "eval.eval_every": 100, "privacy.mode": "user",
    "privacy.noise_multiplier": 1.0, "privacy.budget": 1e6,
}  # fmt: skip


def _run(dataset, overrides: dict, tmp_path):
    ledger = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    return run_experiment(
        load_config(overrides={**overrides, "privacy.ledger_url": ledger}), dataset
    )


def _same_model(a, b) -> bool:
    first, second = a.weights["federated/shared"], b.weights["federated/shared"]
    return all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("overrides", [RECORD, USER], ids=["record-level", "user-level"])
def test_two_dp_runs_from_one_config_and_seed_add_different_noise(retail, tmp_path, overrides):
    first = _run(retail, overrides, tmp_path)
    second = _run(retail, overrides, tmp_path)
    assert not _same_model(first, second)
    for result in (first, second):
        assert result.privacy.noise_seed_known is False
    if overrides is USER:
        # Who was sampled is secret too: the accountant's amplification depends on it.
        assert [r.clients for r in first.history] != [r.clients for r in second.history]


@pytest.mark.parametrize("overrides", [RECORD, USER], ids=["record-level", "user-level"])
def test_a_known_noise_seed_repeats_the_run_and_says_it_is_not_private(retail, tmp_path, overrides):
    seeded = {**overrides, "privacy.noise_seed": 11}
    first = _run(retail, seeded, tmp_path)
    second = _run(retail, seeded, tmp_path)
    assert _same_model(first, second)
    assert [r.clients for r in first.history] == [r.clients for r in second.history]
    block = metrics_document(first)["privacy"]
    assert block["noise_seed_known"] is True
    assert "not private: noise seed known" in privacy_section(block)


def test_runs_without_dp_stay_bit_identical_in_cross_device_mode(retail):
    overrides = {k: v for k, v in USER.items() if not k.startswith("privacy.")}
    config = load_config(overrides=overrides)
    assert _same_model(run_experiment(config, retail), run_experiment(config, retail))


def test_secret_streams_differ_and_seeded_ones_repeat():
    draw = lambda stream: stream.normal((1000,), torch.float64)  # noqa: E731
    assert not torch.equal(draw(NoiseStream.secret()), draw(NoiseStream.secret()))
    assert not torch.equal(draw(NoiseStream.of(None, "a")), draw(NoiseStream.of(None, "a")))
    assert torch.equal(draw(NoiseStream.of(3, "a")), draw(NoiseStream.from_seed(3, "a")))
    assert not torch.equal(draw(NoiseStream.of(3, "a")), draw(NoiseStream.of(3, "b")))
    assert not torch.equal(draw(NoiseStream.of(3, "a")), draw(NoiseStream.of(4, "a")))


def test_noise_stream_draws_standard_normals_and_uniforms():
    stream = NoiseStream.secret()
    normal = stream.normal((400_001,), torch.float64)  # odd: the last pair is cut
    assert normal.shape == (400_001,)
    assert abs(normal.mean().item()) < 0.01 and normal.std().item() == pytest.approx(1.0, abs=0.01)
    # Tails as a Gaussian's: about 4.6% beyond 2σ, 0.27% beyond 3σ.
    assert (normal.abs() > 2).double().mean().item() == pytest.approx(0.0455, abs=0.002)
    assert (normal.abs() > 3).double().mean().item() == pytest.approx(0.0027, abs=0.0005)
    uniform = stream.uniform(200_000)
    assert uniform.min().item() >= 0.0 and uniform.max().item() < 1.0
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.005)
    assert stream.normal((3, 4), torch.float32).dtype == torch.float32


def test_a_restored_stream_continues_where_it_stopped():
    """What a checkpoint keeps: a silo's DP-SGD streams and the server's sampling, restored into a
    fresh state (another secret key), continue the original streams instead of starting new ones."""
    config = load_config(overrides={"privacy.mode": "record", "privacy.noise_multiplier": 1.0})
    state = DpSgdState.of_run(config, 2)
    state.noise.normal((50,), torch.float32)
    state.sampling.uniform(7)
    saved = {name: getattr(state, name).get_state() for name in DpSgdState.STREAMS}
    restored = DpSgdState.of_run(config, 2)
    for name in DpSgdState.STREAMS:
        getattr(restored, name).set_state(saved[name])
    assert torch.equal(
        state.noise.normal((20,), torch.float32), restored.noise.normal((20,), torch.float32)
    )
    assert torch.equal(state.sampling.uniform(20), restored.sampling.uniform(20))
    assert torch.equal(
        torch.randint(100, (20,), generator=state.negatives),
        torch.randint(100, (20,), generator=restored.negatives),
    )


def test_a_retried_round_samples_the_same_shoppers(retail, tmp_path):
    """Under user-level DP the server's Poisson sampling is secret; the round driver rewinds it to
    retry a round, which must draw the very same shoppers (a retry releases nothing new)."""
    config = load_config(overrides={**USER, "privacy.ledger_url": f"sqlite:///{tmp_path}/l.db"})
    rate = open_privacy(config, retail).plan.sampling_rate
    server = make_server(config, retail.n_items, torch.arange(2000), AggregationPipeline(), rate)
    before = server.sampling_state()
    first = server.sample_clients()
    server.load_sampling_state(before)
    assert server.sample_clients() == first
    assert server.sample_clients() != first
