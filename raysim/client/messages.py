"""What crosses between the server and a worker: a batch of clients, the round's plan, a chunk's result, and
an evaluation's sums.

These are plain dataclasses (pickled by Ray), shared by the sync round server and the async step server.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from raysim.privacy.secagg.setup import SecureRound


@dataclass(frozen=True)
class ClientBatch:
    """One call's worth of clients: their ids (sorted), local epochs, and per-client state rows."""

    client_ids: np.ndarray
    epochs: np.ndarray
    states: np.ndarray | None = None  # SCAFFOLD's c_i, one row per client
    residuals: np.ndarray | None = None  # error feedback: each client's residual, one row per client
    dp_states: list | None = None  # local DP-SGD: each client's accountant state (None before its first round)
    personal: np.ndarray | None = None  # personalization: each client's personal row ([flag, values])


@dataclass(frozen=True)
class RoundPlan:
    """Round-wide instructions to every client besides the model: secure aggregation, and DP clipping."""

    secure: SecureRound | None = None
    clip_norm: float | None = None  # central/distributed DP: clip each delta to this L2 norm
    weight_cap: float | None = None  # DP-FedAvg user weight w = min(n / cap, 1); None weighs users equally
    noise_variance: float = 0.0  # distributed DP: each client's discrete noise variance, in ring units
    noise_kind: str = "discrete_gaussian"
    per_client: bool = False  # robust aggregation: return each client's update instead of folding them
    mask_seed: int | None = None  # compression.kind random_mask: the round's shared mask, public to all
    update_scale: float = 1.0  # secure FedBuff: the staleness weight s ≤ 1 a client applies before encoding

    def weight(self, num_samples: int, client_weighting: str) -> float:
        if self.clip_norm is not None:
            return min(num_samples / self.weight_cap, 1.0) if self.weight_cap else 1.0
        return 1.0 if client_weighting == "uniform" else float(num_samples)


@dataclass
class ChunkResult:
    """The updates of one chunk of clients, folded (or kept as rows), and what happened to each client."""

    index: int
    delta_sum: np.ndarray  # float64: Σ w_k Δ_k over the chunk's kept clients, summed in client-id order
    weight_sum: float
    client_ids: np.ndarray
    weights: np.ndarray  # per client; 0 for a rejected or empty client
    losses: np.ndarray
    steps: np.ndarray
    rejected: list[int] = field(default_factory=list)
    seconds: float = 0.0
    state_deltas: np.ndarray | None = None  # SCAFFOLD's Δc_i per client (zero rows where weight is 0)
    unclipped: int = 0  # DP clipping: clients whose delta was already within the clip norm
    dp_states: list | None = None  # local DP-SGD: updated accountant states
    epsilons: np.ndarray | None = None  # local DP-SGD: each client's ε after this round
    tokens: int = 0  # text tasks: non-padding tokens trained on (samples × epochs)
    rss_mb: float = 0.0  # the worker process's peak resident memory so far
    failed: list[int] = field(default_factory=list)  # clients whose training raised
    error: str | None = None  # the first such exception, as one line
    bounded: int = 0  # updates clipped or rejected by aggregation.norm_bound
    malicious: int = 0  # malicious clients among the chunk's
    bytes_up: np.ndarray | None = None  # per client: the encoded update's bytes (0 where not sent)
    rows: np.ndarray | None = None  # plan.per_client: each client's update (zero rows where weight is 0)
    residuals: np.ndarray | None = None  # error feedback: each client's new residual (sealed under secure aggregation)
    sealed_states: np.ndarray | None = None  # SCAFFOLD with sealed state: each client's new c_i, sealed
    state_sum: np.ndarray | None = None  # ... and, outside a secure sum, Σ Δc_i over the chunk (float64)
    personal: np.ndarray | None = None  # personalization: each client's new personal row (sealed under secure aggregation)
    personal_done: np.ndarray | None = None  # ... for the clients whose row changed this round


@dataclass
class EvalResult:
    """Summed loss, correct predictions and count of one evaluation call."""

    index: int
    loss_sum: float
    correct: int
    samples: int

    def plus(self, loss_sum: float, correct: int, samples: int) -> EvalResult:
        return EvalResult(self.index, self.loss_sum + loss_sum, self.correct + correct, self.samples + samples)
