import pytest
import torch

from fedshop.fl.server_opt import FedAdam, FedAvg, FedAvgM
from fedshop.fl.stages import (
    Aggregate,
    AggregationPipeline,
    ClientMessage,
    sum_messages,
    weight_by_examples,
)


def message(value, n):
    return ClientMessage({"w": torch.tensor([value, 2 * value])}, weight=1.0, num_examples=n)


def test_fedavg_weights_by_example_count():
    # Two silos: 30 examples with update 1, 10 examples with update 5 → (30·1 + 10·5)/40 = 2.
    pipeline = AggregationPipeline()
    sent = [pipeline.on_client(message(1.0, 30)), pipeline.on_client(message(5.0, 10))]
    mean = pipeline.aggregate(sent)
    assert torch.allclose(mean["w"], torch.tensor([2.0, 4.0]))
    new = FedAvg(1.0).step({"w": torch.tensor([1.0, 1.0])}, mean)
    assert torch.allclose(new["w"], torch.tensor([3.0, 5.0]))


def test_unweighted_pipeline_is_a_plain_mean():
    pipeline = AggregationPipeline(client_stages=())
    mean = pipeline.aggregate([message(1.0, 30), message(5.0, 10)])
    assert torch.allclose(mean["w"], torch.tensor([3.0, 6.0]))


def test_stages_run_in_order_on_both_sides():
    calls = []

    def clip(m):
        calls.append("clip")
        return m

    def noise(a: Aggregate):
        calls.append("noise")
        return Aggregate({k: v + 100 for k, v in a.tensors.items()}, a.weight, a.num_clients)

    pipeline = AggregationPipeline(client_stages=(clip, weight_by_examples), server_stages=(noise,))
    sent = pipeline.on_client(message(1.0, 4))
    assert torch.allclose(sent.tensors["w"], torch.tensor([4.0, 8.0])) and sent.weight == 4
    mean = pipeline.aggregate([sent])
    assert calls == ["clip", "noise"]
    assert torch.allclose(mean["w"], torch.tensor([104.0, 108.0]) / 4)


def test_mismatched_or_empty_rounds_are_rejected():
    with pytest.raises(ValueError, match="empty"):
        sum_messages([])
    other = ClientMessage({"v": torch.zeros(2)}, 1.0, 1)
    with pytest.raises(ValueError, match="different parameter names"):
        sum_messages([message(1.0, 1), other])


def test_server_momentum_and_adam():
    params = {"w": torch.zeros(1)}
    momentum = FedAvgM(learning_rate=1.0, momentum=0.5)
    params = momentum.step(params, {"w": torch.ones(1)})
    params = momentum.step(params, {"w": torch.ones(1)})
    assert params["w"].item() == pytest.approx(1 + 1.5)
    adam = FedAdam(learning_rate=0.1, beta1=0.0, beta2=0.0, tau=0.0)
    # With no averaging, Adam's step is lr·sign(delta).
    assert adam.step({"w": torch.zeros(1)}, {"w": torch.tensor([-3.0])})[
        "w"
    ].item() == pytest.approx(-0.1)
