import pytest
import torch

from fedshop.fl.aggregation import aggregation_pipeline
from fedshop.fl.server_opt import FedAdam, FedAvg, FedAvgM
from fedshop.messages import (
    Aggregate,
    AggregationPipeline,
    ClientMessage,
    sum_messages,
    weight_by_examples,
)


def message(value, n):
    return ClientMessage(
        {"w": torch.tensor([value, 2 * value])}, weight=1.0, num_examples=n, local_steps=1
    )


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
    other = ClientMessage({"v": torch.zeros(2)}, 1.0, 1, 1)
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


def test_fednova_normalises_by_local_steps():
    # Silo A: 30 examples, 10 steps, update 10 (1 per step). Silo B: 10 examples, 2 steps, update 4
    # (2 per step). Per-step mean = (30·1 + 10·2)/40 = 1.25; effective steps = (30·10 + 10·2)/40 = 8
    # → mean update 10. Plain FedAvg would give (30·10 + 10·4)/40 = 8.5.
    pipeline = aggregation_pipeline("fednova")
    a = ClientMessage({"w": torch.tensor([10.0])}, 1.0, num_examples=30, local_steps=10)
    b = ClientMessage({"w": torch.tensor([4.0])}, 1.0, num_examples=10, local_steps=2)
    mean = pipeline.aggregate([pipeline.on_client(a), pipeline.on_client(b)])
    assert set(mean) == {"w"}
    assert mean["w"].item() == pytest.approx(10.0)
    fedavg = aggregation_pipeline("fedavg")
    plain = fedavg.aggregate([fedavg.on_client(a), fedavg.on_client(b)])
    assert plain["w"].item() == pytest.approx(8.5)


def test_fednova_equals_fedavg_when_steps_are_equal():
    nova = aggregation_pipeline("fednova")
    avg = aggregation_pipeline("fedavg")
    msgs = [
        ClientMessage({"w": torch.tensor([1.0, -2.0])}, 1.0, num_examples=7, local_steps=5),
        ClientMessage({"w": torch.tensor([3.0, 0.5])}, 1.0, num_examples=2, local_steps=5),
    ]
    a = nova.aggregate([nova.on_client(m) for m in msgs])["w"]
    b = avg.aggregate([avg.on_client(m) for m in msgs])["w"]
    assert torch.allclose(a, b)


def test_server_weight_decay_shrinks_matrices_after_the_step_and_leaves_biases():
    from fedshop.config import load_config
    from fedshop.fl.server_opt import make_server_optimizer

    fed = load_config(overrides={"federated.server_weight_decay": 0.1}).federated
    optimizer = make_server_optimizer(fed)
    params = {"item_embedding": torch.ones(3, 2), "item_bias": torch.ones(3)}
    delta = {"item_embedding": torch.ones(3, 2), "item_bias": torch.ones(3)}
    out = optimizer.step(params, delta)
    assert torch.allclose(out["item_embedding"], torch.full((3, 2), 2.0 * 0.9))
    assert torch.allclose(out["item_bias"], torch.full((3,), 2.0))
