"""The pure reduction: chunk results to one round's sums and per-update metrics, in a fixed order, without Ray.

Sync rounds and async steps both reduce with ``reduce``: partial sums are added in the order the chunks
are given (chunk order, i.e. client-id order, in a round; (start version, client id) order in an async
step), so the result never depends on which worker returned first. ``update_metrics`` is what both report per update:
kept, rejected, client errors, norm-bounded, malicious, and bytes up and down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from raysim.client.messages import ChunkResult, RoundPlan
from raysim.compression import dense_bytes
from raysim.config import Scenario


@dataclass
class Reduction:
    """A round's (or step's) chunks, concatenated in order, and their scaled sum."""

    chunks: list[ChunkResult]
    client_ids: np.ndarray
    weights: np.ndarray
    losses: np.ndarray
    total: np.ndarray  # Σ_c Σ_{k∈c} w_k Δ_k, float64
    weight: float  # Σ w_k
    rows: np.ndarray | None  # per-client updates (robust rules)
    state_deltas: np.ndarray | None  # SCAFFOLD's Δc_i, in the clear
    sealed_states: np.ndarray | None  # SCAFFOLD's new c_i, sealed
    state_sum: np.ndarray | None  # Σ Δc_i over the chunks' sums (sealed c_i outside a secure sum)
    residuals: np.ndarray | None  # error feedback's new residuals

    @property
    def kept_mask(self) -> np.ndarray:
        return self.weights > 0

    @property
    def kept(self) -> int:
        return int(self.kept_mask.sum())

    def count(self, name: str) -> int:
        """Σ over the chunks of a tally (``bounded``, ``malicious``, ``unclipped``) or a list's length."""
        return sum(v if isinstance(v := getattr(c, name), int) else len(v) for c in self.chunks)

    @property
    def unclipped(self) -> int:
        return self.count("unclipped")


def _rows(chunks: Sequence[ChunkResult], name: str) -> np.ndarray | None:
    return np.concatenate([getattr(c, name) for c in chunks]) if getattr(chunks[0], name) is not None else None


def _sum(chunks: Sequence[ChunkResult], name: str) -> np.ndarray | None:
    if getattr(chunks[0], name) is None:
        return None
    total = np.zeros_like(getattr(chunks[0], name), dtype=np.float64)
    for chunk in chunks:  # in the order given, as ``total``
        total += getattr(chunk, name)
    return total


def reduce(chunks: Sequence[ChunkResult]) -> Reduction:
    """Reduce ``chunks`` (at least one) in the order given."""
    chunks = list(chunks)
    total, weight = np.zeros(np.shape(chunks[0].delta_sum), dtype=np.float64), 0.0
    for chunk in chunks:
        total += chunk.delta_sum
        weight += chunk.weight_sum
    return Reduction(chunks=chunks, client_ids=np.concatenate([c.client_ids for c in chunks]),
                     weights=np.concatenate([c.weights for c in chunks]), losses=np.concatenate([c.losses for c in chunks]),
                     total=total, weight=weight, rows=_rows(chunks, "rows"), state_deltas=_rows(chunks, "state_deltas"),
                     sealed_states=_rows(chunks, "sealed_states"), residuals=_rows(chunks, "residuals"),
                     state_sum=_sum(chunks, "state_sum"))


def update_metrics(reduction: Reduction, scenario: Scenario, dim: int, downloads: int) -> dict[str, Any]:
    """Per-update metrics of a round or a step. ``downloads``: vectors of ``dim`` floats each trained
    client received (the model, and SCAFFOLD's c)."""
    kept = reduction.kept
    out: dict[str, Any] = {"rejected": reduction.count("rejected"), "kept": kept,
                           "client_errors": reduction.count("failed"),
                           "compute_seconds": float(sum(c.seconds for c in reduction.chunks)),
                           **throughput_metrics(reduction.chunks, dim)}
    if scenario.aggregation.norm_bound is not None:
        out["norm_bounded"] = reduction.count("bounded")
    if scenario.adversary is not None:
        out["malicious"] = reduction.count("malicious")
    dense = dense_bytes(dim)
    out["bytes_down"] = dense * downloads * len(reduction.client_ids)
    if kept:
        up = int(np.concatenate([c.bytes_up for c in reduction.chunks])[reduction.kept_mask].sum())
        out.update(bytes_up=up, bytes_up_per_client=up / kept, compression_ratio=dense * kept / up if up else None)
        out["loss"] = float((reduction.weights * reduction.losses).sum() / reduction.weights.sum())
    return out


def throughput_metrics(chunks: Sequence[ChunkResult], num_parameters: int) -> dict[str, float]:
    """Text tasks' round metrics: tokens, tokens per second per worker (tokens over the chunks' summed
    training seconds), the exchanged vector's size and bytes per client (float32), and the largest
    worker's peak memory."""
    tokens = sum(c.tokens for c in chunks)
    if not tokens:
        return {}
    seconds = sum(c.seconds for c in chunks)
    return {"tokens": tokens, "tokens_per_second_per_worker": tokens / seconds if seconds > 0 else 0.0,
            "trainable_parameters": num_parameters, "adapter_bytes": 4 * num_parameters,
            "worker_rss_mb": max(c.rss_mb for c in chunks)}


@dataclass
class ServerRound:
    """What the stages' server halves read (``raysim.client.pipeline.Stage.server``)."""

    round_index: int
    plan: RoundPlan | None  # None: nobody was sampled
    reduction: Reduction | None
    secure_sum: Any  # the secure sum's release (``raysim.engine.secure.SecureSum``), or None
    central_dp: Any  # ``raysim.privacy.dp.server.CentralDP``, or None
    seed: int
    dim: int
