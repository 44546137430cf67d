"""SCAFFOLD (Karimireddy et al., ICML 2020), Algorithm 1 with option II control variates.

Server:  x ← x + η_g·mean(Δy)   and   c ← c + (1/N)·Σ_{i∈S} Δc_i,   N the population.
c and every c_i start at zero. The clients' c_i live in a ClientStateStore owned by the server: each
sampled client's c_i is shipped with its task, and its Δc_i comes back and is added to the store, so
the state follows the client to whichever worker or node trains it. Under secure aggregation the server
may not see Δc_i: the store holds each c_i sealed by its client (``privacy.secagg.sealed_state``), the
client returns its new c_i sealed, and only Σ Δc_i reaches the server, inside the secure sum. mean(Δy) is the engine's
aggregate (weighted by ``strategy.client_weighting``; ``uniform`` is the paper's plain mean), and
Σ Δc_i is a plain vector sum, so both can be aggregated securely.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raysim.client.state import ClientStateStore
from raysim.strategies.base import Aggregate, Strategy


class Scaffold(Strategy):
    def __init__(self, server_lr: float, num_clients: int, store: ClientStateStore, dim: int) -> None:
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
        ids = aggregate.extras["client_ids"]
        if len(ids):
            delta_sum = aggregate.extras["state_delta_sum"]  # Σ Δc_i: a plain or a secure sum
            self.control = (self.control + delta_sum / self.num_clients).astype(np.float32)
            if "sealed_states" in aggregate.extras:  # c_i + Δc_i, sealed by each client
                self.store.put(ids, aggregate.extras["sealed_states"])
            else:
                self.store.add(ids, aggregate.extras["state_deltas"])
        return new_global

    def state_dict(self) -> dict[str, Any]:
        return {"control": self.control, "store": self.store.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.control = state["control"]
