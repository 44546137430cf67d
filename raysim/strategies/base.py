"""The strategy interface and FedAvg (McMahan et al. 2017), the rule every other strategy extends.

A strategy owns both halves of an algorithm. Its client half (``ClientHalf``) adjusts each client's
local training and may return a per-client state delta; its server half (``Strategy.apply``) sees the
round's aggregate, never individual clients: the engine has already reduced the clients' weighted
deltas in client-id order. That keeps every strategy compatible with secure aggregation, which only
ever releases sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Aggregate:
    """The reduced updates of one round.

    ``mean_delta`` is Σ w_k Δ_k / Σ w_k over the kept clients, where Δ_k = y_k − x is the client's
    local model minus the global model, and w_k its number of training samples.
    """

    mean_delta: np.ndarray
    total_weight: float
    num_clients: int
    control: ControlUpdate | None = None  # SCAFFOLD: the kept clients' control-variate updates


@dataclass(frozen=True)
class ControlUpdate:
    """The per-client state a round's kept clients hand back (SCAFFOLD's c_i).

    ``delta_sum`` is Σ Δc_i, a plain or a secure sum. The rows are either each client's Δc_i in the clear
    (``deltas``) or, under secure aggregation, each client's new c_i sealed under its storage key
    (``sealed``); exactly one of them is set.
    """

    client_ids: np.ndarray
    delta_sum: np.ndarray
    deltas: np.ndarray | None = None
    sealed: np.ndarray | None = None


class ClientHalf:
    """A strategy's client half: plain local SGD (FedAvg and the server optimizers change nothing here)."""

    def gradient_hook(self, anchor: torch.Tensor, server_state: torch.Tensor | None,
                      client_state: torch.Tensor | None):
        """What to add to the flat gradient between ``backward`` and the optimizer step, or None.

        The hook is called as ``hook(grad, weights)`` and changes ``grad`` in place.
        """
        return None

    @property
    def hooks_gradients(self) -> bool:
        """Whether ``gradient_hook`` may return a hook (a half that overrides it)."""
        return type(self).gradient_hook is not ClientHalf.gradient_hook

    def state_delta(self, client_state: torch.Tensor, server_state: torch.Tensor, anchor: torch.Tensor,
                    local: torch.Tensor, steps: int) -> torch.Tensor | None:
        """The change to the client's own state after training (SCAFFOLD's Δc_i), or None."""
        return None


def weighted_mean(deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Σ w_k Δ_k / Σ w_k in float64, summed in row order; the reference the engine is tested against."""
    weights = np.asarray(weights, dtype=np.float64)
    total = np.zeros(deltas.shape[1], dtype=np.float64)
    for row, w in zip(deltas, weights):
        total += w * row.astype(np.float64)
    return (total / weights.sum()).astype(np.float32)


class Strategy:
    """FedAvg: x ← x + η·mean Δ, with server learning rate η (1 gives McMahan et al.'s average)."""

    def __init__(self, server_lr: float = 1.0) -> None:
        self.server_lr = server_lr

    def apply(self, global_vec: np.ndarray, aggregate: Aggregate) -> np.ndarray:
        """The next global vector. ``global_vec`` is not modified."""
        if self.server_lr == 1.0:
            return (global_vec + aggregate.mean_delta).astype(np.float32)
        return (global_vec + np.float32(self.server_lr) * aggregate.mean_delta).astype(np.float32)

    def server_state(self) -> np.ndarray | None:
        """A vector every client of the round receives besides the model (SCAFFOLD's c), or None."""
        return None

    def client_states(self, client_ids: np.ndarray) -> np.ndarray | None:
        """Per-client state rows shipped with each client's task (SCAFFOLD's c_i), or None."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Server optimizer state, for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
