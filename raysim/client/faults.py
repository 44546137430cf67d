"""Injected client faults (the ``faults:`` block's client half): a client that raises, or sends NaN, Inf or a huge update.

Client faults are drawn from one uniform u per (seed, round, client), on a stream of their own, and
take consecutive intervals of it: an exception, then a NaN, an Inf or a huge update. A scenario
therefore always hits the same clients, whichever worker trains them, and the same fraction of two
different faults hits the same clients. ``FaultInjection`` draws the fault before training (local
training raises an injected error) and corrupts the update after it. Worker faults (dying and slow
workers) are the engine's: ``raysim.engine.faults``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from raysim.client.pipeline import Chunk, ClientUpdate, Stage
from raysim.config import FaultsConfig, Scenario

if TYPE_CHECKING:
    import torch

_STREAM = 23


class InjectedClientError(RuntimeError):
    """The exception a client raises when ``faults.client_error_fraction`` picks it."""


def client_fault(faults: FaultsConfig | None, seed: int, round_index: int, client_id: int) -> str | None:
    """``"error"``, ``"nan"``, ``"inf"``, ``"huge"`` or None for this client in this round."""
    if faults is None or not faults.client_faults:
        return None
    u = float(np.random.default_rng([seed, round_index, client_id, _STREAM]).random())
    for kind, fraction in (("error", faults.client_error_fraction), ("nan", faults.nan_fraction),
                           ("inf", faults.inf_fraction), ("huge", faults.huge_fraction)):
        if u < fraction:
            return kind
        u -= fraction
    return None


def corrupt_update(delta: torch.Tensor, kind: str, huge_scale: float) -> torch.Tensor:
    """The update a faulty client sends instead of ``delta``."""
    import torch

    if kind == "nan":
        return torch.full_like(delta, float("nan"))
    if kind == "inf":
        return torch.full_like(delta, float("inf"))
    if kind == "huge":
        return delta * huge_scale
    raise ValueError(f"not an update fault: {kind!r}")


class FaultInjection(Stage):
    def __init__(self, scenario: Scenario) -> None:
        self.faults, self.seed = scenario.faults, scenario.seed

    def before_training(self, update: ClientUpdate, chunk: Chunk) -> None:
        update.fault = client_fault(self.faults, self.seed, chunk.round_index, update.client_id)

    def client(self, update: ClientUpdate, chunk: Chunk) -> bool:
        if update.fault is not None:
            update.delta = corrupt_update(update.delta, update.fault, self.faults.huge_scale)
        return True
