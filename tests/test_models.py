import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedshop.config import ModelConfig, TrainConfig
from fedshop.models.mf import init_private, init_shared, score_all
from fedshop.models.spec import get_model
from fedshop.models.spec import score_all as spec_score_all
from fedshop.models.train import effective_batch_size, train_bpr


def toy(n_users=20, n_items=30, seed=0):
    rng = np.random.default_rng(seed)
    rows, cols = [], []
    for u in range(n_users):
        # Two taste groups: even users buy items 0-9, odd users items 10-19.
        base = 0 if u % 2 == 0 else 10
        for i in rng.choice(10, 5, replace=False):
            rows.append(u)
            cols.append(base + i)
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, n_items))


def test_training_learns_and_leaves_inputs_untouched():
    train = toy()
    g = torch.Generator().manual_seed(0)
    shared = init_shared(30, 8, 0.1, g)
    private = init_private(20, 30, 8, 0.1, g)
    copies = {k: v.clone() for k, v in {**shared, **private}.items()}
    config = TrainConfig(learning_rate=0.05, batch_size=16)
    first = train_bpr(shared, private, train, 1, config, torch.Generator().manual_seed(1))
    later = train_bpr(shared, private, train, 30, config, torch.Generator().manual_seed(1))
    assert later.mean_loss < first.mean_loss
    for k, v in {**shared, **private}.items():
        assert torch.equal(v, copies[k]), k
    # Even users now prefer items 0-9 over items 10-19, odd users the reverse.
    scores = score_all(later.shared, later.private, torch.arange(20))
    assert (scores[0::2, :10].mean(1) > scores[0::2, 10:20].mean(1)).all()
    assert (scores[1::2, 10:20].mean(1) > scores[1::2, :10].mean(1)).all()


def test_personalisation_moves_only_private_parameters():
    g = torch.Generator().manual_seed(0)
    shared, private = init_shared(30, 4, 0.1, g), init_private(20, 30, 4, 0.1, g)
    result = train_bpr(
        shared, private, toy(), 3, TrainConfig(), torch.Generator().manual_seed(2),
        update_shared=False,
    )  # fmt: skip
    for k in shared:
        assert torch.equal(result.shared[k], shared[k])
    assert not torch.equal(result.private["user_embedding"], private["user_embedding"])
    assert result.private["silo_item_bias"].abs().sum() > 0


def test_silo_offsets_apply_to_their_own_silo_only():
    g = torch.Generator().manual_seed(0)
    shared = init_shared(5, 3, 0.1, g)
    private = init_private(4, 5, 3, 0.1, g, n_silos=2)
    user_silo = torch.tensor([0, 0, 1, 1])
    before = score_all(shared, private, torch.arange(4), user_silo)
    private["silo_item_bias"][1, 2] = 5.0
    after = score_all(shared, private, torch.arange(4), user_silo)
    assert torch.equal(after[:2], before[:2])
    assert torch.allclose(after[2:, 2] - before[2:, 2], torch.tensor([5.0, 5.0]))
    without = init_private(4, 5, 3, 0.1, g, silo_item_bias=False)
    assert set(without) == {"user_embedding"}


def test_small_data_gets_smaller_batches():
    config = TrainConfig(batch_size=1024, min_batches_per_epoch=20)
    assert effective_batch_size(200_000, config) == 1024
    assert effective_batch_size(1_000, config) == 50
    assert effective_batch_size(5, config) == 1


@pytest.mark.parametrize("name", ["mf-bpr", "gmf", "neumf"])
def test_every_model_learns_taste_groups_and_scores_consistently(name):
    spec = get_model(name)
    model = ModelConfig(name=name, dim=8, silo_item_bias=False)
    shared = spec.init_shared(30, model, torch.Generator().manual_seed(0))
    private = spec.init_private(20, 30, model, torch.Generator().manual_seed(1))
    config = TrainConfig(learning_rate=0.05, batch_size=16)
    result = train_bpr(
        shared, private, toy(), 40, config, torch.Generator().manual_seed(1), spec=spec
    )
    scores = spec_score_all(spec, result.shared, result.private, torch.arange(20))
    # Medians: one badly scored item must not decide a user's comparison.
    assert (scores[0::2, :10].median(1).values > scores[0::2, 10:20].median(1).values).all()
    assert (scores[1::2, 10:20].median(1).values > scores[1::2, :10].median(1).values).all()
    # The catalogue scores agree with scoring the same pairs one by one.
    users = {k: result.private[k][torch.tensor([3])] for k in spec.user_tables}
    items = {k: result.shared[k][torch.tensor([7])] for k in spec.item_tables}
    pair = spec.pair_scores(users, items, spec.dense_of(result.shared))
    torch.testing.assert_close(pair[0], scores[3, 7])
