"""Byzantine-robust aggregation rules, as pure functions on the round's client deltas.

Each rule reduces ``rows`` — one client delta per row, shape (n, d) float32, in client-id order —
to one float32 vector:

* ``coordinate_median`` and ``trimmed_mean``: Yin, Chen, Ramchandran & Bartlett 2018,
  "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates" (Definitions 1 and 2).
* ``krum`` with m = 1: Blanchard, El Mhamdi, Guerraoui & Stainer 2017, "Machine Learning with
  Adversaries: Byzantine Tolerant Gradient Descent" (§4); with m > 1 it is Multi-Krum as in
  El Mhamdi, Guerraoui & Rouault 2018, "The Hidden Vulnerability of Distributed Learning in
  Byzantium" (§3).
* ``norm_bound``: the server-side norm clipping of Sun, Kairouz, Suresh & McMahan 2019,
  "Can You Really Backdoor Federated Learning?" (§3).

The robust rules are unweighted, as in the papers: a client's sample count is self-reported and
would let one attacker outweigh everyone. Only ``"mean"`` (FedAvg) uses the weights.

Every rule here needs the individual updates, so none of them can run under secure aggregation,
where the server only ever sees the sum.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from raysim.errors import ScenarioError
from raysim.strategies.base import weighted_mean

RULES = ("mean", "median", "trimmed_mean", "krum", "multikrum")
_GRAM_BLOCK_BYTES = 64 * 1024**2  # float64 scratch per block of coordinates in the Gram product


def _check_rows(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError(f"robust aggregation needs a non-empty (clients, dims) array (got shape {rows.shape})")
    return rows


def coordinate_median(rows: np.ndarray) -> np.ndarray:
    """The coordinate-wise median (Yin et al. 2018, Def. 1); for even n, the mean of the two middle values."""
    rows = _check_rows(rows)
    return np.median(rows, axis=0).astype(np.float32)


def _trim_count(n: int, beta: float) -> int:
    if not (0.0 <= beta < 0.5):
        raise ScenarioError(
            f"aggregation.trim_fraction: must be in [0, 0.5) (got {beta}); use e.g. 0.1 to drop 10% at each end"
        )
    # k = ⌊βn⌋ (Yin et al. 2018, Def. 2); the 1e-9 keeps 0.29·100 = 28.999… at 29.
    k = math.floor(beta * n + 1e-9)
    if 2 * k >= n:
        raise ScenarioError(
            f"aggregation.trim_fraction: trimming 2·⌊{beta}·{n}⌋ = {2 * k} of {n} clients leaves none; "
            "lower aggregation.trim_fraction or raise sampling.clients_per_round"
        )
    return k


def trimmed_mean(rows: np.ndarray, beta: float) -> np.ndarray:
    """Per coordinate, drop the ⌊βn⌋ largest and smallest values and average the rest (Yin et al. 2018, Def. 2)."""
    rows = _check_rows(rows)
    n = rows.shape[0]
    k = _trim_count(n, beta)
    kept = np.sort(rows, axis=0)[k:n - k]
    return kept.astype(np.float64).mean(axis=0).astype(np.float32)


def check_krum(n: int, f: int) -> None:
    """Refuse a round Krum cannot defend: it needs n > 2f + 2 (Blanchard et al. 2017, Prop. 1)."""
    if f < 0:
        raise ScenarioError(
            f"aggregation.byzantine: must be >= 0 (got {f}); it is the number of Byzantine clients Krum tolerates"
        )
    if n <= 2 * f + 2:
        raise ScenarioError(
            f"aggregation.byzantine: Krum needs n > 2f + 2 clients per round (got n={n}, f={f}); "
            "lower aggregation.byzantine or raise sampling.clients_per_round"
        )


def pairwise_sq_distances(rows: np.ndarray) -> np.ndarray:
    """‖r_i − r_j‖² for all pairs in float64, via ‖r_i‖² + ‖r_j‖² − 2⟨r_i, r_j⟩ over blocks of coordinates.

    Rounding can make the Gram form slightly negative for near-identical rows; those are clipped to 0.
    """
    rows = _check_rows(rows)
    n, d = rows.shape
    gram = np.zeros((n, n), dtype=np.float64)
    block = max(1, _GRAM_BLOCK_BYTES // (8 * n))
    for start in range(0, d, block):
        part = rows[:, start:start + block].astype(np.float64)
        gram += part @ part.T
    sq_norms = np.diag(gram).copy()
    dist = sq_norms[:, None] + sq_norms[None, :] - 2.0 * gram
    np.clip(dist, 0.0, None, out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist


def krum_scores(rows: np.ndarray, f: int) -> np.ndarray:
    """score(i) = Σ of ‖r_i − r_j‖² over the n − f − 2 rows j ≠ i closest to r_i (Blanchard et al. 2017, §4)."""
    rows = _check_rows(rows)
    n = rows.shape[0]
    check_krum(n, f)
    dist = pairwise_sq_distances(rows)
    np.fill_diagonal(dist, np.inf)
    nearest = np.sort(dist, axis=1)[:, :n - f - 2]
    return nearest.sum(axis=1)


def krum(rows: np.ndarray, f: int, m: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Krum (m = 1) or Multi-Krum: the unweighted mean of the m lowest-score rows, and their sorted indices.

    Ties in score go to the lower index. m must lie in [1, n − f] (El Mhamdi et al. 2018, §3).
    """
    rows = _check_rows(rows)
    n = rows.shape[0]
    check_krum(n, f)
    if not (1 <= m <= n - f):
        raise ScenarioError(
            f"aggregation.multikrum: must be in [1, n - f] = [1, {n - f}] (got {m}); "
            "it is how many lowest-score updates Multi-Krum averages"
        )
    scores = krum_scores(rows, f)
    selected = np.sort(np.argsort(scores, kind="stable")[:m]).astype(np.int64)
    total = np.zeros(rows.shape[1], dtype=np.float64)
    for i in selected:
        total += rows[i].astype(np.float64)
    return (total / m).astype(np.float32), selected


def norm_bound(rows: np.ndarray, bound: float) -> tuple[np.ndarray, int]:
    """Scale every row to L2 norm ≤ bound, r ← r · min(1, bound / ‖r‖) (Sun et al. 2019, §3).

    Returns the new rows and how many were clipped; ``rows`` is not modified.
    """
    rows = _check_rows(rows)
    if not (np.isfinite(bound) and bound > 0):
        raise ScenarioError(f"aggregation.norm_bound: must be a finite number > 0 (got {bound}); use e.g. 1.0")
    wide = rows.astype(np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", wide, wide))
    clipped = norms > bound
    factors = np.ones_like(norms)
    factors[clipped] = bound / norms[clipped]
    out = (wide * factors[:, None]).astype(np.float32)
    return out, int(clipped.sum())


def robust_aggregate(
    rows: np.ndarray,
    weights: np.ndarray,
    rule: str,
    *,
    trim_fraction: float = 0.1,
    byzantine: int = 0,
    multikrum: int = 1,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Reduce the round's deltas with ``rule``; returns the float32 aggregate and small per-round metrics.

    rule: "mean" (Σ w·row / Σ w, FedAvg), "median", "trimmed_mean" (β = trim_fraction),
      "krum" (f = byzantine) or "multikrum" (f = byzantine, m = multikrum).
    The metrics are {} for mean and median, {"robust_trimmed": ⌊βn⌋} for the trimmed mean, and for
    Krum {"robust_selected": m, "krum_selected": [row positions, in client-id order]}.
    """
    rows = _check_rows(rows)
    if rule == "mean":
        return weighted_mean(rows, weights), {}
    if rule == "median":
        return coordinate_median(rows), {}
    if rule == "trimmed_mean":
        return trimmed_mean(rows, trim_fraction), {"robust_trimmed": _trim_count(rows.shape[0], trim_fraction)}
    if rule in ("krum", "multikrum"):
        m = 1 if rule == "krum" else multikrum
        aggregate, selected = krum(rows, byzantine, m)
        return aggregate, {"robust_selected": int(selected.size), "krum_selected": selected.tolist()}
    raise ScenarioError(f"aggregation.rule: must be one of {', '.join(RULES)} (got {rule!r})")
