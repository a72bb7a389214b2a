"""Reproducible randomness without global state.

Every random stream is derived from the run seed and a stable label (e.g. ("silo", 3, "train")), so
adding a silo or reordering work never changes another component's stream.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def derive_seed(seed: int, *labels: str | int) -> int:
    key = [zlib.crc32(str(label).encode()) for label in labels]
    return int(
        np.random.SeedSequence(entropy=seed, spawn_key=key).generate_state(1, np.uint64)[0] >> 1
    )


def torch_generator(seed: int, *labels: str | int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *labels))
