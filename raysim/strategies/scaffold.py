"""SCAFFOLD (Karimireddy et al., ICML 2020), Algorithm 1 with option II control variates: both halves.

Client:  the local step is y ← y − η_l(g − c_i + c), and afterwards c_i⁺ = c_i − c + (x − y)/(K·η_l),
         K the local steps taken, so Δc_i = c_i⁺ − c_i = −c + (x − y)/(K·η_l).
Server:  x ← x + η_g·mean(Δy)   and   c ← c + (1/N)·Σ_{i∈S} Δc_i,   N the population.
c and every c_i start at zero. The clients' c_i live in a per-client state store owned by the server
(``raysim.client.state``): each sampled client's c_i is shipped with its task, and its Δc_i comes back
and is added to the store, so the state follows the client to whichever worker or node trains it.
Under secure aggregation the server may not see Δc_i: the store holds each c_i sealed by its client
(``privacy.secagg.sealed_state``), the client returns its new c_i sealed, and only Σ Δc_i reaches the
server, inside the secure sum. mean(Δy) is the engine's aggregate (weighted by
``strategy.client_weighting``; ``uniform`` is the paper's plain mean), and Σ Δc_i is a plain vector sum,
so both can be aggregated securely.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from raysim.strategies.base import Aggregate, ClientHalf, Strategy

if TYPE_CHECKING:
    import torch


class RowStore(Protocol):
    """What SCAFFOLD needs of a per-client state store (``raysim.client.state.ClientStateStore``)."""

    def get(self, client_ids: np.ndarray) -> np.ndarray: ...
    def add(self, client_ids: np.ndarray, rows: np.ndarray) -> None: ...
    def put(self, client_ids: np.ndarray, rows: np.ndarray) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...


class Scaffold(Strategy):
    def __init__(self, server_lr: float, num_clients: int, store: RowStore, dim: int) -> None:
        """``dim``: the model's; the store's rows may be wider (sealed under secure aggregation)."""
        super().__init__(server_lr)
        self.num_clients = num_clients
        self.store = store
        self.control = np.zeros(dim, dtype=np.float32)

    def server_state(self) -> np.ndarray:
        """The server control variate c, shipped to every client of the round."""
        return self.control

    def client_states(self, client_ids: np.ndarray) -> np.ndarray:
        """Each client's c_i (zeros for a client never sampled)."""
        return self.store.get(client_ids)

    def apply(self, global_vec: np.ndarray, aggregate: Aggregate) -> np.ndarray:
        new_global = super().apply(global_vec, aggregate)
        update = aggregate.control
        if update is not None and len(update.client_ids):
            self.control = (self.control + update.delta_sum / self.num_clients).astype(np.float32)
            if update.sealed is not None:  # c_i + Δc_i, sealed by each client
                self.store.put(update.client_ids, update.sealed)
            else:
                self.store.add(update.client_ids, update.deltas)
        return new_global

    def state_dict(self) -> dict[str, Any]:
        return {"control": self.control, "store": self.store.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.control = state["control"]


class ScaffoldClient(ClientHalf):
    """The correction c − c_i during training, and Δc_i after it."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def gradient_hook(self, anchor: torch.Tensor, server_state: torch.Tensor | None,
                      client_state: torch.Tensor | None):
        correction = server_state - client_state
        return lambda grad, weights: grad.add_(correction)

    def state_delta(self, client_state: torch.Tensor, server_state: torch.Tensor, anchor: torch.Tensor,
                    local: torch.Tensor, steps: int) -> torch.Tensor:
        """Δc_i = −c + (x − y)/(K·η_l); zero for a client that took no step."""
        import torch

        if steps == 0:
            return torch.zeros_like(client_state)
        return (anchor - local) / (steps * self.lr) - server_state
