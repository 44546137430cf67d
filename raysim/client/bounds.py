"""Two stages that guard the aggregate against bad updates: the finite check and the norm bound.

``FiniteCheck`` rejects an update with a NaN or an Inf (counted in ``rejected``), whatever produced it.
``NormBound`` (``aggregation.norm_bound``; Sun et al. 2019, "Can you really backdoor federated
learning?") scales an update whose L2 norm exceeds the bound down to it, or rejects it, and counts it
in ``norm_bounded``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raysim.client.pipeline import Chunk, ClientUpdate, Stage
from raysim.config import AggregationConfig

if TYPE_CHECKING:
    import torch


class FiniteCheck(Stage):
    def client(self, update: ClientUpdate, chunk: Chunk) -> bool:
        import torch

        # One reduction: a float64 sum of float32 values cannot overflow, and any NaN or Inf makes it non-finite.
        if bool(torch.isfinite(update.delta.sum(dtype=torch.float64))):
            return True
        chunk.rejected.append(update.client_id)
        return False


class NormBound(Stage):
    def __init__(self, aggregation: AggregationConfig) -> None:
        self.bound, self.reject = aggregation.norm_bound, aggregation.norm_bound_action == "reject"

    def client(self, update: ClientUpdate, chunk: Chunk) -> bool:
        import torch

        norm = float(torch.linalg.vector_norm(update.delta.to(torch.float64)))
        if norm <= self.bound:
            return True
        chunk.bounded += 1
        if self.reject:
            return False
        update.delta = update.delta * (self.bound / norm)
        return True
