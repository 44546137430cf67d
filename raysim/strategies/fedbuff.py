"""FedBuff's buffered pseudo-gradient (Nguyen et al. 2022, "Federated Learning with Buffered
Asynchronous Aggregation", Algorithm 1) over folded partial sums.

Nguyen et al. add s(t − τ)·Δ_k for each update as it arrives and, once K have arrived, divide
by K and step with the server learning rate η_g. The engine receives updates folded by
(start version, arrival step), so every update in one fold f has the same staleness d_f, as
Σ_{k∈f} w_k·Δ_k and Σ_{k∈f} w_k. The buffer's pseudo-gradient is then

    Δ̄ = Σ_f s(d_f)·Σ_{k∈f} w_k·Δ_k  /  Σ_f Σ_{k∈f} w_k,

which with uniform client weights (w_k = 1) is exactly Σ_k s(d_k)·Δ_k / K; with sample weights
it is the sample-weighted mean that FedAvg would take, shrunk per update by its staleness. The
strategy's ``apply`` takes it from there (FedAvg's server_lr is η_g; server optimizers compose).

Under a robust rule (``aggregation.rule``) the buffer holds its K updates one by one
(``fedbuff_robust``): each is shrunk by its own staleness, s(d_k)·Δ_k, and the rule replaces the
weighted mean over them; with ``rule: mean`` that is exactly Δ̄ above.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from raysim.strategies.robust import robust_aggregate
from raysim.strategies.staleness import StalenessFunction


def fedbuff_pseudo_gradient(
    folds: Iterable[tuple[int, np.ndarray, float]], fn: StalenessFunction,
) -> tuple[np.ndarray, float]:
    """(Δ̄ as float32, Σ w) from folds (staleness, Σ w_k·Δ_k in float64, Σ w_k), summed in the given order.

    Returns a zero vector and weight 0 when no fold carries weight (every update was rejected).
    """
    total: np.ndarray | None = None
    weight = 0.0
    for staleness, delta_sum, weight_sum in folds:
        if total is None:
            total = np.zeros(np.shape(delta_sum), dtype=np.float64)
        total += float(fn(staleness)) * np.asarray(delta_sum, dtype=np.float64)
        weight += float(weight_sum)
    if total is None:
        raise ValueError("a FedBuff step needs at least one fold")
    if weight <= 0:
        return np.zeros(total.shape, dtype=np.float32), 0.0
    return (total / weight).astype(np.float32), weight


def fedbuff_robust(
    buffered: Iterable[tuple[int, np.ndarray, np.ndarray]], fn: StalenessFunction, rule: str, **options: Any,
) -> tuple[np.ndarray, float, dict[str, Any]]:
    """(the robust rule over the buffer's staleness-shrunk updates, Σ w, the rule's metrics) from
    (staleness, rows Δ_k, weights w_k) in buffer order; ``options`` are ``robust_aggregate``'s."""
    rows, weights = [], []
    for staleness, deltas, ws in buffered:
        rows.append(float(fn(staleness)) * np.asarray(deltas, dtype=np.float64))
        weights.append(np.asarray(ws, dtype=np.float64))
    stacked, w = np.concatenate(rows), np.concatenate(weights)
    if not len(w) or w.sum() <= 0:
        return np.zeros(stacked.shape[1:], dtype=np.float32), 0.0, {}
    mean, details = robust_aggregate(stacked, w, rule, **options)
    return mean.astype(np.float32), float(w.sum()), details
