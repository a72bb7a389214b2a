"""DP-FedAvg stages, each alone and in the aggregation pipeline."""

import pytest
import torch

from fedshop.messages import AggregationPipeline, ClientMessage
from fedshop.privacy.noise import (
    ClipUpdate,
    GaussianNoise,
    clip_per_client,
    fixed_denominator,
    global_norm,
)


def message(scale: float, examples: int = 10) -> ClientMessage:
    g = torch.Generator().manual_seed(int(scale * 1000))
    tensors = {
        "a": torch.randn(5, 3, generator=g) * scale,
        "b": torch.randn(4, generator=g) * scale,
    }
    return ClientMessage(tensors, weight=float(examples), num_examples=examples, local_steps=1)


def test_clip_bounds_the_whole_update_and_leaves_small_ones_alone():
    big, small = message(10.0), message(0.01)
    clipped = ClipUpdate(1.0)(big)
    assert global_norm(clipped.tensors) == pytest.approx(1.0, rel=1e-6)
    # Direction is kept: every tensor scaled by the same factor.
    ratio = clipped.tensors["a"] / big.tensors["a"]
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio))
    untouched = ClipUpdate(1.0)(small)
    assert all(torch.equal(untouched.tensors[k], small.tensors[k]) for k in small.tensors)
    assert clipped.weight == untouched.weight == 1.0  # example weights would break the sensitivity


def test_dp_pipeline_sums_clipped_updates_adds_noise_and_divides_by_the_expected_count():
    messages = [message(s) for s in (0.01, 5.0, 20.0)]
    quiet = AggregationPipeline(
        client_stages=(ClipUpdate(1.0),), server_stages=(fixed_denominator(4.0),)
    )
    mean = quiet.aggregate([quiet.on_client(m) for m in messages])
    expected = sum(ClipUpdate(1.0)(m).tensors["a"] for m in messages) / 4.0
    torch.testing.assert_close(mean["a"], expected)

    noisy = AggregationPipeline(
        client_stages=(ClipUpdate(1.0),),
        server_stages=(
            GaussianNoise(2.0, 1.0, torch.Generator().manual_seed(0)),
            fixed_denominator(4.0),
        ),
    )
    samples = torch.stack(
        [
            noisy.aggregate([noisy.on_client(m) for m in messages])["a"] - mean["a"]
            for _ in range(400)
        ]
    )
    # Noise std 2 on the sum, so 0.5 on the mean, on every coordinate.
    assert samples.std().item() == pytest.approx(0.5, rel=0.05)
    assert samples.mean().abs().item() < 0.02


def test_vectorised_clip_equals_the_per_message_clip():
    g = torch.Generator().manual_seed(3)
    row_owner = torch.tensor([0, 0, 1, 2, 2, 2])
    items = {"emb": torch.randn(6, 4, generator=g) * 3, "bias": torch.randn(6, generator=g)}
    dense = {"w": torch.randn(3, 1, 5, generator=g)}
    per_client = []
    for c in range(3):
        mine = {"emb": items["emb"][row_owner == c], "bias": items["bias"][row_owner == c]}
        mine["w"] = dense["w"][c]
        per_client.append(ClipUpdate(2.0)(ClientMessage(mine, 1.0, 1, 1)).tensors)
    norms = clip_per_client(items, row_owner, dense, clients=3, clip=2.0)
    assert norms.shape == (3,)
    for c in range(3):
        torch.testing.assert_close(items["emb"][row_owner == c], per_client[c]["emb"])
        torch.testing.assert_close(items["bias"][row_owner == c], per_client[c]["bias"])
        torch.testing.assert_close(dense["w"][c], per_client[c]["w"])
