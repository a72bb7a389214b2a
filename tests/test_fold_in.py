"""Fold-in: a new shopper's vector fitted to a basket against a frozen model (models/fold_in.py)."""

import pytest
import torch

from fedshop.config import ModelConfig
from fedshop.models.fold_in import FoldInSettings, contributions, fold_in, interaction_vectors
from fedshop.models.spec import get_model, score_all

N_ITEMS = 300
BASKET = torch.tensor([3, 41, 150, 299])
MODELS = ("mf-bpr", "gmf", "neumf")


def model(name: str, seed: int = 0):
    """A model with item vectors spread enough that a basket has a direction to fit."""
    spec = get_model(name)
    config = ModelConfig(name=name, dim=16, init_std=0.5, silo_item_bias=False)
    return spec, spec.init_shared(N_ITEMS, config, torch.Generator().manual_seed(seed))


def scores(spec, shared, user, offsets=None) -> torch.Tensor:
    private = dict(user)
    if offsets is not None:
        private["silo_item_bias"] = offsets.reshape(1, -1)
    return score_all(spec, shared, private, torch.tensor([0]))[0]


def objective(spec, shared, user, basket, settings, offsets=None) -> float:
    """The loss fold-in minimises, computed independently of it."""
    log_p = torch.log_softmax(scores(spec, shared, user, offsets), dim=0)
    penalty = sum(float(v.pow(2).sum()) for v in user.values())
    return float(-log_p[basket.unique()].mean()) + 0.5 * settings.l2 * penalty


def zeros_like_user(spec, user):
    return {name: torch.zeros_like(user[name]) for name in spec.user_tables}


@pytest.mark.parametrize("name", MODELS)
def test_fold_in_is_deterministic_and_shaped_like_a_user(name):
    spec, shared = model(name)
    first = fold_in(spec, shared, BASKET)
    second = fold_in(spec, shared, BASKET.flip(0))  # order does not matter
    assert set(first) == set(spec.user_tables)
    for table in spec.user_tables:
        assert first[table].shape[0] == 1
        assert torch.equal(first[table], second[table])
        assert not first[table].requires_grad


@pytest.mark.parametrize("name", MODELS)
def test_fold_in_reduces_the_loss_and_ranks_the_basket_high(name):
    spec, shared = model(name)
    settings = FoldInSettings()
    user = fold_in(spec, shared, BASKET, settings=settings)
    start = objective(spec, shared, zeros_like_user(spec, user), BASKET, settings)
    end = objective(spec, shared, user, BASKET, settings)
    assert end < start - 0.3, (start, end)
    # Four random items have no common direction, yet one vector puts them in the top fifth of
    # 300 items on average (149.5 at random), one of them in the top five.
    rank = torch.argsort(torch.argsort(scores(spec, shared, user), descending=True))
    assert float(rank[BASKET].float().mean()) < 60, rank[BASKET]
    assert int(rank[BASKET].min()) < 5, rank[BASKET]


@pytest.mark.parametrize("name", ("mf-bpr", "gmf"))
def test_the_default_settings_reach_the_minimum(name):
    """For MF and GMF the objective is convex in u (log-sum-exp of linear scores plus a ridge): the
    default steps end at its minimum, where the gradient vanishes."""
    spec, shared = model(name)
    user = fold_in(spec, shared, BASKET)
    assert gradient_norm(spec, shared, user, BASKET) < 1e-4
    assert gradient_norm(spec, shared, zeros_like_user(spec, user), BASKET) > 0.5


def gradient_norm(spec, shared, user, basket) -> float:
    settings = FoldInSettings()
    free = {name: value.clone().requires_grad_(True) for name, value in user.items()}
    log_p = torch.log_softmax(scores(spec, shared, free), dim=0)
    penalty = sum(value.pow(2).sum() for value in free.values())
    loss = -log_p[basket].mean() + 0.5 * settings.l2 * penalty
    grads = torch.autograd.grad(loss, list(free.values()))
    return float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))


@pytest.mark.parametrize("name", ("mf-bpr", "gmf"))
def test_a_basket_of_one_taste_recommends_that_taste(name):
    """Items in six tastes (clusters of 50); a basket of four items of one taste: the ten best
    items outside the basket are of that taste."""
    spec, shared = model(name)
    generator = torch.Generator().manual_seed(5)
    centres = torch.randn(6, 16, generator=generator)
    taste = torch.arange(N_ITEMS) % 6
    shared["item_embedding"] = centres[taste] + 0.3 * torch.randn(N_ITEMS, 16, generator=generator)
    basket = torch.tensor([2, 8, 14, 20])  # taste 2
    ranked = torch.argsort(scores(spec, shared, fold_in(spec, shared, basket)), descending=True)
    recommended = [int(i) for i in ranked if int(i) not in set(basket.tolist())][:10]
    assert [int(taste[i]) for i in recommended] == [2] * 10


@pytest.mark.parametrize("name", MODELS)
def test_more_steps_fit_the_basket_better(name):
    spec, shared = model(name)
    losses = []
    for steps in (1, 5, 30):
        settings = FoldInSettings(steps=steps, lr=0.5, l2=0.1)
        user = fold_in(spec, shared, BASKET, settings=settings)
        losses.append(objective(spec, shared, user, BASKET, settings))
    assert losses[0] > losses[1] > losses[2]


def test_storefront_offsets_enter_the_fit():
    spec, shared = model("mf-bpr")
    # A storefront whose offsets already favour the basket leaves less for the vector to explain.
    offsets = torch.zeros(N_ITEMS)
    offsets[BASKET] = 3.0
    plain = fold_in(spec, shared, BASKET)["user_embedding"]
    helped = fold_in(spec, shared, BASKET, item_offsets=offsets)["user_embedding"]
    assert float(helped.norm()) < float(plain.norm())
    settings = FoldInSettings()
    with_offsets = fold_in(spec, shared, BASKET, item_offsets=offsets.reshape(1, -1))
    assert objective(spec, shared, with_offsets, BASKET, settings, offsets) < objective(
        spec, shared, {"user_embedding": plain}, BASKET, settings, offsets
    )


def test_an_empty_basket_is_refused():
    spec, shared = model("mf-bpr")
    with pytest.raises(ValueError, match="at least one item"):
        fold_in(spec, shared, torch.tensor([], dtype=torch.int64))
    with pytest.raises(ValueError, match="at least one item"):
        fold_in(spec, shared, [])


@pytest.mark.parametrize("name", MODELS)
def test_contributions_are_inner_products_of_interaction_vectors(name):
    spec, shared = model(name)
    vectors = interaction_vectors(spec, shared)
    assert vectors.shape[0] == N_ITEMS
    weights = contributions(vectors, BASKET, 7)
    assert weights.shape == (len(BASKET),)
    assert torch.allclose(weights, torch.stack([vectors[j] @ vectors[7] for j in BASKET]))
