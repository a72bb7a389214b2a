"""The item-inference attack: the server guesses which items a client bought from its update.

In matrix factorisation a client's update touches only the item rows it trained on, and the rows of
its own purchases move in every local epoch while each sampled negative moves about once, so ranking
rows by the size of their update and guessing the top m (m = the number of items the client bought)
recovers most purchases from a plain update. Under secure aggregation the server holds a masked
vector instead, and the same ranking is a blind guess (accuracy ≈ m / catalogue size).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def row_sizes(item_rows: np.ndarray) -> np.ndarray:
    """Per item, the L2 norm of its row of the update (item tables stacked column-wise)."""
    rows = item_rows.reshape(item_rows.shape[0], -1)
    return np.linalg.norm(rows, axis=1)


def guess_items(item_rows: np.ndarray, how_many: int) -> np.ndarray:
    """The attacker's guess: the `how_many` items whose rows moved most."""
    sizes = row_sizes(item_rows)
    return np.argpartition(-sizes, how_many - 1)[:how_many] if how_many else np.array([], int)


def item_inference_accuracy(views: Sequence[np.ndarray], purchased: Sequence[np.ndarray]) -> float:
    """Mean over clients of the fraction of guessed items that the client really bought.

    `views[c]`: what the server saw of client c, as (n_items, ...) item rows; `purchased[c]`: the
    items client c trained on (the attacker is told how many, a generous assumption)."""
    if len(views) != len(purchased) or not views:
        raise ValueError("need one view per client and at least one client")
    scores = []
    for view, items in zip(views, purchased, strict=True):
        items = np.unique(items)
        if len(items) == 0:
            continue
        guess = guess_items(view, len(items))
        scores.append(np.isin(guess, items).mean())
    return float(np.mean(scores))


def chance_accuracy(purchased: Sequence[np.ndarray], n_items: int) -> float:
    """What a blind guess scores: the expected share of bought items among m random items."""
    return float(np.mean([len(np.unique(items)) / n_items for items in purchased]))
