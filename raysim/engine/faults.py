"""Fault injection for chaos testing (the ``faults:`` block): misbehaving clients, dying and slow workers.

Client faults are drawn from one uniform u per (seed, round, client), on a stream of their own, and
take consecutive intervals of it: an exception, then a NaN, an Inf or a huge update. A scenario
therefore always hits the same clients, whichever worker trains them, and the same fraction of
two different faults hits the same clients. Worker faults are per process: a worker exits at
every ``kill_worker_every``-th train call of its life (Ray restarts it and the engine re-runs the
call), and the worker at position ``delay_worker`` sleeps before each call. Neither changes a
result, only the time and the failure count, which is what they exist to test.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from raysim.config import FaultsConfig

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
    if kind == "nan":
        return torch.full_like(delta, float("nan"))
    if kind == "inf":
        return torch.full_like(delta, float("inf"))
    if kind == "huge":
        return delta * huge_scale
    raise ValueError(f"not an update fault: {kind!r}")


class WorkerChaos:
    """What a worker process does before each train call when the scenario injects worker faults."""

    def __init__(self, faults: FaultsConfig | None, position: int) -> None:
        self.faults, self.position, self.calls = faults, position, 0

    def before_call(self) -> None:
        if self.faults is None:
            return
        self.calls += 1
        every = self.faults.kill_worker_every
        if every is not None and self.calls % every == 0:
            os._exit(1)  # a hard crash: no cleanup, exactly like the OOM killer or a lost node
        if self.faults.delay_worker == self.position and self.faults.delay_seconds > 0:
            time.sleep(self.faults.delay_seconds)
