"""The compression stage: each client sends its update through an exact codec, with error feedback.

Client half: the update plus the client's carried residual is encoded (top-k, rand-k, the round's
shared random mask, or quantization; ``raysim.compression``), the decoded vector goes on, and what it
lost becomes the client's new residual (error feedback, Seide et al. 2014; Karimireddy et al. 2019).
The message's bytes are counted. In async modes the clients that start from one model version share
that version's mask, and a client's residual is read when it is launched and written back when its
update is used. Server half: under secure aggregation with the shared random mask
only the mask's k coordinates enter the protocol, and their sums go back to those coordinates.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from raysim.client.pipeline import Chunk, ClientUpdate, Released, Stage
from raysim.client.train import client_rng
from raysim.compression import CompressionSpec, compress_with_feedback, shared_mask_indices
from raysim.config import CompressionConfig, Scenario


def shared_mask_seed(scenario: Scenario, round_index: int) -> int | None:
    """The seed of the shared random mask of the clients that start from round (or model version)
    ``round_index``; None unless ``compression.kind`` is ``random_mask``."""
    if scenario.compression is None or scenario.compression.kind != "random_mask":
        return None
    return int(np.random.default_rng([scenario.seed, round_index, 31]).integers(2**63))


class Compression(Stage):
    def __init__(self, config: CompressionConfig, seed: int) -> None:
        self.config, self.seed = config, seed
        self.spec = CompressionSpec(kind=config.kind, fraction=config.fraction, bits=config.bits,
                                    stochastic=config.stochastic,
                                    unbiased=not config.error_feedback)  # d/k scaling would make error feedback diverge

    def client(self, update: ClientUpdate, chunk: Chunk) -> bool:
        k = update.position
        residual = None if chunk.residuals is None else chunk.residuals[k]
        rng = client_rng(self.seed, chunk.round_index, update.client_id, stream=17)
        sent, residual, update.bytes_up = compress_with_feedback(
            update.delta.cpu().numpy(), residual, self.spec, rng, shared_seed=chunk.plan.mask_seed)
        if chunk.residuals is not None:
            chunk.residuals[k] = residual
        update.delta = torch.from_numpy(sent).to(update.delta.device)
        return True

    def server(self, released: Released, context: Any) -> Released:
        mask_seed = context.plan.mask_seed
        if context.plan.secure is None or mask_seed is None or released.total is None:
            return released
        total = np.zeros(context.dim, dtype=np.float64)
        total[self.mask(context.dim, mask_seed)] = released.total
        released.total = total
        return released

    def mask(self, dim: int, mask_seed: int) -> np.ndarray:
        """The coordinates of the round's shared random mask."""
        return shared_mask_indices(dim, self.config.fraction, mask_seed)
