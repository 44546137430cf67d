"""Server → client compression of the broadcast model, with the exact bytes each client downloads.

Two broadcasts (``downlink.of``), each through the same byte-exact codecs as the uplink
(``raysim.compression.codec``):

* ``model``: every round the server sends Q(x_t), the global model quantized afresh (stochastic
  rounding is unbiased, so E[x̂_t] = x_t), as in FedPAQ-style quantized broadcasts; a client needs
  nothing from earlier rounds.
* ``delta``: the clients hold a replica x̂ of the model, and the server sends m_t = C(x_t − x̂_{t−1}) and
  sets x̂_t = x̂_{t−1} + D(m_t). Whatever C dropped is still in x_t − x̂_t and goes out next time: error
  feedback on the server's side, as in DoubleSqueeze (Tang et al., ICML 2019) and Artemis (Philippenko
  and Dieuleveut, 2020). The random-k values are sent unscaled, the contraction error feedback needs.

Clients train from the decoded x̂_t, and their deltas are taken from it; the server steps its own x_t.
Bytes down, per trained client: under ``model``, the message; under ``delta``, the messages since the
broadcast it last received, or the dense replica (``dense_bytes``) when that is cheaper or it never
received one, since x̂ is then all it can start from. Randomness is seeded by (seed, broadcast).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raysim.compression.codec import CompressionSpec, compress, decompress, dense_bytes
from raysim.config import DownlinkConfig


class Downlink:
    """The broadcast's state: the clients' replica x̂ (``delta``), and which broadcast each client last received."""

    def __init__(self, config: DownlinkConfig, dim: int, num_clients: int, seed: int) -> None:
        self.config, self.dim, self.seed = config, dim, seed
        self.spec = CompressionSpec(kind=config.kind, fraction=config.fraction, bits=config.bits,
                                    stochastic=config.stochastic, unbiased=False)
        self.replica: np.ndarray | None = None  # x̂ (delta), from the first broadcast on
        self.sent = 0  # broadcasts so far
        self.cumulative = [0]  # bytes of broadcasts 1..b, summed
        self.received = np.full(num_clients, -1, dtype=np.int32)  # the broadcast each client last received

    def broadcast(self, global_vec: np.ndarray, client_ids: np.ndarray) -> tuple[np.ndarray, int]:
        """x̂_t for ``client_ids`` to train from, and the bytes they download in all."""
        rng = np.random.default_rng([self.seed, self.sent, 37])
        if self.config.of == "model":
            message = compress(global_vec, self.spec, rng)
            vector = decompress(message)
        else:
            base = global_vec if self.replica is None else self.replica  # the replica starts at x_0
            message = compress(global_vec - base, self.spec, rng)
            vector = self.replica = (base + decompress(message)).astype(np.float32)
        self.sent += 1
        self.cumulative.append(self.cumulative[-1] + len(message))
        return vector, self._download(client_ids, len(message))

    def _download(self, client_ids: np.ndarray, message_bytes: int) -> int:
        if self.config.of == "model":
            return message_bytes * len(client_ids)
        last = self.received[client_ids]
        catch_up = self.cumulative[-1] - np.asarray(self.cumulative)[np.maximum(last, 0)]
        cost = np.where(last < 0, dense_bytes(self.dim), np.minimum(catch_up, dense_bytes(self.dim)))
        self.received[client_ids] = self.sent
        return int(cost.sum())

    def state_dict(self) -> dict[str, Any]:
        return {"replica": self.replica, "sent": self.sent, "cumulative": list(self.cumulative),
                "received": self.received.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.replica, self.sent = state["replica"], state["sent"]
        self.cumulative, self.received = list(state["cumulative"]), state["received"].copy()
