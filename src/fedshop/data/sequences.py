"""Each user's items in time order, for sequential models (SASRec), beside the split's matrices.

The split (`data/split.py`) keeps unique (user, item) pairs; a sequential model also needs the order
and the repeats. `UserSequences` keeps every user's whole sequence in catalogue indices and how many
trailing items the leave-last-out split held out, so that:
- the training sequence is everything before the held-out items;
- the input that predicts the validation item is the training sequence;
- the input that predicts the test item is everything before it (training + validation item), as in
  SASRec's and S3-Rec's evaluation code.
Items outside the training catalogue are dropped from the inputs (no model has a row for them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class UserSequences:
    indptr: np.ndarray  # (n_users + 1,) user u's events are items[indptr[u]:indptr[u + 1]]
    items: np.ndarray  # catalogue index of each event in time order; -1: not in the catalogue
    held: np.ndarray  # (n_users,) trailing events the split held out (0, 1 or 2)

    @property
    def n_users(self) -> int:
        return len(self.held)

    def _events(self, user: int, drop_last: int) -> np.ndarray:
        events = self.items[self.indptr[user] : self.indptr[user + 1] - drop_last]
        return events[events >= 0]

    def train(self, user: int) -> np.ndarray:
        """The user's training sequence (held-out items removed), in time order."""
        return self._events(user, int(self.held[user]))

    def history(self, user: int, split: str) -> np.ndarray:
        """What the model reads to predict the user's `split` ("test" or "validation") item."""
        if split == "test":
            return self._events(user, min(1, int(self.held[user])))
        return self.train(user)

    def subset(self, users: np.ndarray) -> UserSequences:
        """The sequences of `users` only, renumbered 0, 1, … in that order."""
        lengths = np.diff(self.indptr)[users]
        starts = self.indptr[users]
        take = (
            np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)])
            if len(users)
            else np.zeros(0, dtype=np.int64)
        )
        return UserSequences(
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            self.items[take],
            self.held[users],
        )


def build_sequences(
    events: pd.DataFrame, n_users: int, catalogue_codes: np.ndarray, held_count: int
) -> UserSequences:
    """`events` (user, item, order: codes as given to `leave_last_out`), ordered the way the split
    orders them; `catalogue_codes[i]` is the item code of catalogue row i; `held_count` is 2 with a
    validation item, else 1 (users with no more events than that keep everything in training)."""
    rows = np.lexsort(
        (np.arange(len(events)), events["order"].to_numpy(), events["user"].to_numpy())
    )
    users = events["user"].to_numpy()[rows]
    codes = events["item"].to_numpy()[rows]
    remap = np.full(int(codes.max()) + 1 if len(codes) else 1, -1, dtype=np.int64)
    inside = catalogue_codes[catalogue_codes < len(remap)]
    remap[inside] = np.flatnonzero(catalogue_codes < len(remap))
    counts = np.bincount(users, minlength=n_users)
    held = np.where(counts >= held_count + 1, held_count, 0).astype(np.int64)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return UserSequences(indptr, remap[codes], held)
