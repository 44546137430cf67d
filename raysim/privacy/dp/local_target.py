"""Local DP-SGD's noise multiplier for a target ε (``privacy.target_epsilon`` under ``mechanism: local``).

Every client runs DP-SGD (Abadi et al., CCS 2016) with its own accountant: Poisson batches at
q = 1/k, k = ⌈n/B⌉ batches an epoch for its n training samples, so E epochs are E·k steps. In a
synchronous run a client trains at most once a round, so over R rounds it takes at most R·E·k steps
at rate 1/k; stragglers' shortened epochs only take fewer. One z serves every client, so it is the
largest of the z each client's worst case needs: the smallest z (Opacus's search) that keeps R·E·k
steps at 1/k within ε, over the distinct k of the partition.

Subsampling amplifies, so that z falls as k grows (more steps, each at a smaller rate) and the
client with the fewest batches usually needs the most noise. The solve starts there, then checks
every distinct k at the z found; a k still over the budget is solved for in turn, so the result does
not rest on that monotonicity. A client that takes part in fewer rounds than R ends below ε.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from raysim.privacy.dp.accountant import PrivacyAccountant, noise_for_target_epsilon


@dataclass(frozen=True)
class LocalNoise:
    """The z solved for every client's worst case, and the client shape that needs it."""

    noise_multiplier: float
    target_epsilon: float
    batches_per_epoch: int  # k of the worst-case client
    steps: int  # R·E·k: its steps if it trains in every round

    def describe(self, rounds: int) -> str:
        return (f"z = {self.noise_multiplier:.4g} solved for ε = {self.target_epsilon:g}: the worst case is a client of "
                f"{self.batches_per_epoch} batch(es) an epoch that trains in all {rounds} rounds "
                f"({self.steps} steps at q = 1/{self.batches_per_epoch}); clients that train less end below ε")


def local_noise_for_target(target_epsilon: float, train_sizes: np.ndarray, *, batch_size: int, epochs: int,
                           rounds: int, delta: float, accountant: str = "rdp") -> LocalNoise:
    """The smallest z keeping every client of ``train_sizes`` within ``target_epsilon`` over ``rounds`` rounds."""
    ks = sorted({max(1, math.ceil(int(n) / batch_size)) for n in np.asarray(train_sizes).tolist() if n > 0})
    if not ks:
        ks = [1]
    worst, z, pending = ks[0], 0.0, [ks[0]]
    while pending:  # the smallest k first; any k the z found still leaves over budget is solved for in turn
        k = pending.pop()
        solved = noise_for_target_epsilon(target_epsilon, 1.0 / k, rounds * epochs * k, delta, accountant)
        if solved > z:
            worst, z = k, solved
            pending = [j for j in ks if _epsilon(z, j, rounds * epochs * j, delta, accountant) > target_epsilon][:1]
    return LocalNoise(noise_multiplier=z, target_epsilon=target_epsilon, batches_per_epoch=worst,
                      steps=rounds * epochs * worst)


def _epsilon(noise_multiplier: float, k: int, steps: int, delta: float, accountant: str) -> float:
    trial = PrivacyAccountant(accountant, delta)
    return trial.epsilon_after(noise_multiplier, 1.0 / k, steps)
