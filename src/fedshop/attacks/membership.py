"""An empirical privacy check: a loss-threshold membership-inference attack on the released model.

The question DP answers is whether the released shared model reveals that a given shopper's data was
used. The attack (Yeom et al., CSF 2018, at the level of a whole user):
- before training, a random set of shoppers is set aside (`hold_out_users`): they are *non-members*;
  an equal number of trained shoppers are the *members*;
- for every target shopper the attacker, holding that shopper's interactions and the released shared
  parameters, fits a fresh user vector against the frozen shared model (exactly what any client
  does) and measures how well the shopper's items are explained: the mean BPR loss of their items
  against every item they did not interact with;
- members should be explained better; the attack's AUC over members vs non-members is 0.5 when the
  model gives nothing away, and the with/without-DP pair shows what the noise buys.
User vectors that stayed on devices are not used: the attack sees only what was released.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy import stats

from fedshop.config import ModelConfig
from fedshop.data.interactions import RecDataset
from fedshop.fl.local_round import LocalTraining, draw_round
from fedshop.fl.vectorised import vectorised_round
from fedshop.models.spec import ModelSpec, Params, score_all
from fedshop.seeding import derive_seed, torch_generator


@dataclass(frozen=True)
class MembershipSplit:
    dataset: RecDataset  # what training sees: the non-members removed
    members: np.ndarray  # rows of `dataset` that were trained on
    member_train: sp.csr_matrix  # their interactions (the attacker's knowledge)
    nonmember_train: sp.csr_matrix  # the held-out shoppers' interactions


def hold_out_users(dataset: RecDataset, fraction: float, seed: int) -> MembershipSplit:
    """Remove a random `fraction` of the shoppers with training data from the dataset (non-members)
    and draw as many members from the rest."""
    if not 0 < fraction < 0.5:
        raise ValueError("fraction must be in (0, 0.5)")
    rng = np.random.default_rng(derive_seed(seed, "membership", "split"))
    active = np.flatnonzero(np.diff(dataset.train.indptr) > 0)
    count = max(1, round(fraction * len(active)))
    nonmembers = np.sort(rng.choice(active, count, replace=False))
    keep = np.setdiff1d(np.arange(dataset.n_users), nonmembers)
    kept = _restrict(dataset, keep)
    kept_active = np.flatnonzero(np.diff(kept.train.indptr) > 0)
    members = np.sort(rng.choice(kept_active, min(count, len(kept_active)), replace=False))
    return MembershipSplit(kept, members, kept.train[members], dataset.train[nonmembers])


def _restrict(dataset: RecDataset, users: np.ndarray) -> RecDataset:
    """The dataset with only `users` (rows); the catalogue and silos are unchanged."""
    rows = dict(
        user_ids=dataset.user_ids[users],
        user_silo=dataset.user_silo[users],
        train=dataset.train[users],
        test=dataset.test[users],
        validation=None if dataset.validation is None else dataset.validation[users],
        eval_negatives=None if dataset.eval_negatives is None else dataset.eval_negatives[users],
    )
    return replace(dataset, **rows)


def attack_scores(
    spec: ModelSpec,
    shared: Params,
    interactions: sp.csr_matrix,
    model: ModelConfig,
    fit: LocalTraining,
    seed: int,
) -> np.ndarray:
    """Per shopper (row of `interactions`), minus the mean BPR loss of their items against all other
    items after fitting a fresh user vector to them against the frozen `shared` model: higher means
    "looks like a member"."""
    shared = {k: v.detach().cpu() for k, v in shared.items()}
    users = torch.arange(interactions.shape[0])
    tables = spec.init_users(len(users), model, torch_generator(seed, "membership", "users"))
    batch = draw_round(
        interactions, users, fit.epochs, fit.negatives,
        torch_generator(seed, "membership", "negatives"),
    )  # fmt: skip
    _, fitted = vectorised_round(spec, shared, tables, batch, replace(fit, update_shared=False))
    scores = score_all(spec, shared, fitted, users)
    own = torch.from_numpy(interactions.toarray() > 0)
    losses = np.empty(len(users))
    for row in range(len(users)):
        positive, negative = scores[row][own[row]], scores[row][~own[row]]
        margins = positive.unsqueeze(1) - negative.unsqueeze(0)
        losses[row] = float(F.softplus(-margins).mean())
    return -losses


def attack_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """P(a random member scores above a random non-member), ties counted half (Mann–Whitney U)."""
    u = stats.mannwhitneyu(member_scores, nonmember_scores, alternative="two-sided").statistic
    return float(u) / (len(member_scores) * len(nonmember_scores))


def membership_auc(
    spec: ModelSpec,
    shared: Params,
    split: MembershipSplit,
    model: ModelConfig,
    fit: LocalTraining,
    seed: int,
) -> float:
    members = attack_scores(spec, shared, split.member_train, model, fit, seed)
    nonmembers = attack_scores(spec, shared, split.nonmember_train, model, fit, seed + 1)
    return attack_auc(members, nonmembers)
