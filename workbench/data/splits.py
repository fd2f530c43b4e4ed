"""The low-resource protocol (from the MixPHM code): N shots, dev of the same size, 5 seeds."""

from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np

SHOTS = (16, 32, 64, 100, 500, 1000)
SEEDS = (13, 21, 42, 87, 100)

T = TypeVar("T")


def low_resource_split(pool: Sequence[T], n: int, seed: int) -> tuple[list[T], list[T]]:
    """Draw a low-resource (train, dev) split from a training pool.

    Shuffle the pool with ``seed``; train = the first ``n`` items, dev = the next ``n``. A pure
    function of ``(pool, n, seed)``: the permutation comes from NumPy's legacy ``RandomState``,
    whose stream is frozen, so the same inputs give the same ids on any machine and process.

    Raises:
        ValueError: ``n`` is not a positive int, or ``2 * n`` exceeds the pool size.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if 2 * n > len(pool):
        raise ValueError(
            f"n = {n} needs a pool of at least 2n = {2 * n} items (train + dev of the same size), "
            f"but the pool has {len(pool)}; use n <= {len(pool) // 2} or a larger pool"
        )
    order = np.random.RandomState(int(seed)).permutation(len(pool))
    train = [pool[int(i)] for i in order[:n]]
    dev = [pool[int(i)] for i in order[n : 2 * n]]
    return train, dev
