import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedshop.eval.metrics import MetricSums, evaluate, per_user_metrics, summarise, topk_excluding


def csr(rows, n_items):
    data, r, c = [], [], []
    for i, items in enumerate(rows):
        for item in items:
            r.append(i)
            c.append(item)
            data.append(1.0)
    return sp.csr_matrix((data, (r, c)), shape=(len(rows), n_items))


def test_hand_computed_case():
    # 25 items; scores make the ranking 0, 1, 2, ..., 24 for both users.
    scores = torch.arange(25, 0, -1, dtype=torch.float32).repeat(2, 1)
    train = csr([[0], []], 25)  # user 0 bought item 0 in training: it is excluded from its ranking
    test = csr([[2, 12, 24], [15]], 25)
    top = topk_excluding(scores, train, 20)
    assert top[0, 0] == 1 and 0 not in top[0]
    m = per_user_metrics(top, test)
    # user 0: ranking 1,2,3,...: item 2 at rank 2, item 12 at rank 12, item 24 at rank 24 (outside)
    assert m["hr@10"][0] == 1.0
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg@10"][0] == pytest.approx((1 / math.log2(3)) / idcg)
    assert m["recall@20"][0] == pytest.approx(2 / 3)
    # user 1: item 15 at rank 16: a miss at 10, a hit at 20
    assert m["hr@10"][1] == 0.0 and m["ndcg@10"][1] == 0.0
    assert m["recall@20"][1] == 1.0


def test_perfect_ranking_has_ndcg_one():
    scores = torch.tensor([[0.1, 0.9, 0.8, 0.0]])
    top = topk_excluding(scores, csr([[]], 4), 4)
    m = per_user_metrics(top, csr([[1, 2]], 4))
    assert m["ndcg@10"][0] == pytest.approx(1.0)


def test_evaluate_skips_users_without_heldout_items():
    train = csr([[0], [1], [2]], 30)
    test = csr([[5], [], [25]], 30)
    scores = -torch.arange(30, dtype=torch.float32).repeat(3, 1)  # ranking 0, 1, 2, ...
    sums = evaluate(lambda rows: scores[rows], train, test, batch_size=1)
    assert sums.users == 2
    assert sums.means()["hr@10"] == 0.5  # user 0 hits at rank 5, user 2's item 25 is outside


def test_summarise_weights_silos_equally():
    big = MetricSums({"hr@10": 90.0, "ndcg@10": 45.0, "recall@20": 90.0}, 100)
    small = MetricSums({"hr@10": 0.0, "ndcg@10": 0.0, "recall@20": 0.0}, 10)
    empty = MetricSums.empty()
    out = summarise({"big": big, "small": small, "empty": empty})
    assert out["hr@10"] == pytest.approx(90 / 110)
    assert out["silo_mean_hr@10"] == pytest.approx(0.45)
    assert out["users"] == 110 and out["silos_evaluated"] == 2
    assert np.isnan(empty.means()["hr@10"])


def test_sampled_protocol_ranks_heldout_among_its_negatives_only():
    # 300 items, scores descending with the index: item 0 is everyone's favourite.
    scores = torch.arange(300, 0, -1, dtype=torch.float32).repeat(2, 1)
    train = csr([[0, 1], [5]], 300)
    test = csr([[250], [40]], 300)
    # User 0's negatives all score below item 250, so it ranks first among its 101 candidates;
    # user 1's negatives include 30 items scored above item 40: rank 31, outside the top 10.
    negatives = np.stack([np.arange(251, 300).repeat(3)[:100], np.arange(10, 110)])
    negatives[1, :30] = np.arange(6, 36)
    sampled = evaluate(lambda rows: scores[rows], train, test, negatives=negatives[:, :100])
    assert sampled.users == 2
    assert sampled.sums["hr@10"] == 1.0
    assert sampled.sums["ndcg@10"] == pytest.approx(1.0)
    # Full ranking puts item 250 far down for user 0.
    assert evaluate(lambda rows: scores[rows], train, test).sums["hr@10"] == 0.0


def test_sampled_negatives_avoid_every_interaction_and_repeat_with_the_seed(retail):
    from fedshop.data.interactions import with_eval_negatives

    one = with_eval_negatives(retail, 100, seed=3)
    two = with_eval_negatives(retail, 100, seed=3)
    other = with_eval_negatives(retail, 100, seed=4)
    assert np.array_equal(one.eval_negatives, two.eval_negatives)
    assert not np.array_equal(one.eval_negatives, other.eval_negatives)
    interacted = (retail.train + retail.test).tocsr()
    evaluated = np.flatnonzero(np.diff(retail.test.indptr) > 0)
    for user in evaluated[:500]:
        row = one.eval_negatives[user]
        assert len(set(row.tolist())) == 100 and (row >= 0).all()
        assert not np.isin(row, interacted[user].indices).any()
    silent = np.setdiff1d(np.arange(retail.n_users), evaluated)
    assert (one.eval_negatives[silent] == -1).all()
    assert np.array_equal(one.silo(0).eval_negatives, one.eval_negatives[one.silo(0).users])
