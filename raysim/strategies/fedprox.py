"""FedProx (Li et al., MLSys 2020): FedAvg's server update with a proximal term in each client's objective.

Client: h(w) = F(w) + (μ/2)·‖w − w_t‖², the *squared* L2 norm of the whole flattened difference from
the round's global model w_t (eq. 2), so the hook adds μ(w − w_t) to the flat gradient. Stragglers'
partial work is handled by the engine (``training.straggler_fraction``). Server: FedAvg.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raysim.strategies.base import ClientHalf, Strategy

if TYPE_CHECKING:
    import torch


class FedProx(Strategy):
    """FedAvg on the server; the proximal term is the client half's (``ProximalClient``)."""


class ProximalClient(ClientHalf):
    def __init__(self, mu: float) -> None:
        self.mu = mu

    def gradient_hook(self, anchor: torch.Tensor, server_state: torch.Tensor | None,
                      client_state: torch.Tensor | None):
        if not self.mu:
            return None
        return lambda grad, weights: add_proximal_gradient(grad, weights, anchor, self.mu)


def add_proximal_gradient(grad: torch.Tensor, weights: torch.Tensor, anchor: torch.Tensor, mu: float) -> None:
    """grad += ∇_w (μ/2)·‖w − w_t‖² = μ(w − w_t), over the whole flat vector."""
    grad.add_(weights - anchor, alpha=mu)
