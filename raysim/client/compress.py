"""The compression stage: each client sends its update through an exact codec, with error feedback.

Client half: the update plus the client's carried residual is encoded (top-k, rand-k, the round's
shared random mask, or quantization; ``raysim.compression``), the decoded vector goes on, and what it
lost becomes the client's new residual (error feedback, Seide et al. 2014; Karimireddy et al. 2019).
The message's bytes are counted. In async modes the clients that start from one model version share
that version's mask, and a client's residual is read when it is launched and written back when its
update is used. Server half: under secure aggregation with the shared random mask
only the mask's k coordinates enter the protocol, and their sums (and under DP their noised mean: the
other d − k coordinates are zero in every update, by a public mask, so they need no noise) go back to
those coordinates. Under distributed DP the clients' discrete noise is sized to the k words' sensitivity.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from raysim.client.pipeline import Chunk, ClientUpdate, Released, Stage
from raysim.client.rng import client_rng
from raysim.compression import CompressionSpec, compress_roundtrip, compress_with_feedback, shared_mask_indices
from raysim.config import CompressionConfig, Scenario

if TYPE_CHECKING:
    import torch


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
        import torch

        k = update.position
        residual = None if chunk.residuals is None else chunk.residuals[k]
        rng = client_rng(self.seed, chunk.round_index, update.client_id, stream=17)
        delta = update.delta.cpu().numpy()
        if chunk.residuals is None:  # no error feedback: the unbiased kinds keep their d/k scaling
            sent, update.bytes_up = compress_roundtrip(delta, self.spec, rng, chunk.plan.mask_seed)
        else:
            sent, chunk.residuals[k], update.bytes_up = compress_with_feedback(
                delta, residual, self.spec, rng, shared_seed=chunk.plan.mask_seed)
        update.delta = torch.from_numpy(sent).to(update.delta.device)
        return True

    def server(self, released: Released, context: Any) -> Released:
        mask_seed = context.plan.mask_seed
        if context.plan.secure is None or mask_seed is None or released.total is None:
            return released
        mask = self.mask(context.dim, mask_seed)
        total = np.zeros(context.dim, dtype=np.float64)
        total[mask] = released.total
        released.total = total
        if released.mean is not None and released.mean.size == mask.size:  # DP's mean of the k coordinates
            mean = np.zeros(context.dim, dtype=released.mean.dtype)
            mean[mask] = released.mean
            released.mean = mean
        return released

    def mask(self, dim: int, mask_seed: int) -> np.ndarray:
        """The coordinates of the round's shared random mask."""
        return shared_mask_indices(dim, self.config.fraction, mask_seed)
