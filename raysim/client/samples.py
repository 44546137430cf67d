"""Which of a client's samples it trains on, and which it holds out for federated evaluation."""

from __future__ import annotations

import numpy as np

_HOLDOUT_STREAM = 7


def train_sizes(sizes: np.ndarray, holdout_fraction: float) -> np.ndarray:
    """How many of each client's ``sizes`` samples it trains on: ``split_holdout``'s train share."""
    sizes = np.asarray(sizes, dtype=np.int64)
    return sizes - np.where(sizes > 1, np.rint(sizes * holdout_fraction), 0).astype(np.int64)


def split_holdout(indices: np.ndarray, holdout_fraction: float, seed: int, client_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, holdout) index arrays; the split is a fixed function of (seed, client), the same every round.

    A client with a single sample keeps it for training. ``holdout_fraction`` 0 holds nothing out.
    """
    n = indices.shape[0]
    held = int(round(n * holdout_fraction)) if n > 1 else 0
    if held == 0:
        return indices, indices[:0]
    order = np.random.default_rng([seed, client_id, _HOLDOUT_STREAM]).permutation(n)
    return indices[np.sort(order[held:])], indices[np.sort(order[:held])]
