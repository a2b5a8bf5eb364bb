"""Seeded random subsets of a split for evaluation.

An evaluation on part of a split must use a random sample, never the first N points: MNIST's
first 5,000 test digits are cleaner than its last 5,000, so a head subset biases every number.
"""

from __future__ import annotations

import numpy as np

from amortjax.checks import check_int


def random_subset(num_datapoints: int, size: int | None, seed: int) -> np.ndarray:
    """Sorted indices of `size` datapoints drawn without replacement (all if size is None or
    at least num_datapoints)."""
    check_int("random_subset", 0, seed=seed, num_datapoints=num_datapoints)
    if size is not None:
        check_int("random_subset", 1, size=size)  # None: the whole split
    if size is None or size >= num_datapoints:
        return np.arange(num_datapoints)
    return np.sort(np.random.default_rng(seed).choice(num_datapoints, size, replace=False))
