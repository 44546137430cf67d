"""The seeded random streams of one client in one round: the same wherever, whenever and beside whichever
other clients it runs, so results depend on neither the worker nor the packing."""

from __future__ import annotations

import numpy as np


def client_rng(seed: int, round_index: int, client_id: int, stream: int = 0) -> np.random.Generator:
    """The generator for one client in one round: the same wherever and whenever the client runs."""
    return np.random.default_rng([seed, round_index, client_id, stream])
