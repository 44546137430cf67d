"""User-level DP (DP-FedAvg, McMahan et al. 2018; distributed DP, Kairouz et al. 2021): clip on the client,
noise on the server.

Client half: each client's delta is clipped to the round's L2 norm S (``clip_to_norm``; fixed or
adaptive, Andrew et al. 2021), and counted in ``unclipped`` when it was already within S. Under
SCAFFOLD (DP-SCAFFOLD, Noble et al., AISTATS 2022) its control delta Δc_i is clipped too, to S_c
(``privacy.control_clip_norm``), and the server noises Σ Δc_i as well as Σ w·Δy: the pair is one
Gaussian mechanism on [Δy/S, Δc/S_c], of sensitivity √2, so each block gets √2 times the noise of
DP-FedAvg at the same z and the accountant steps once with z (``CentralDP.blocks``). Server half:
the mechanism runs on whatever reached the sum, with the fixed denominator qW
(``raysim.privacy.dp.server.CentralDP``): the central server adds Gaussian noise; under distributed DP
the noise came from the clients, inside the secure sum, and a round that released nothing keeps the
model and only steps the accountant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from raysim.client.pipeline import Chunk, ClientUpdate, Released, Stage
from raysim.privacy.dp.clipping import clip_to_norm
from raysim.privacy.dp.distributed import quantized_sensitivity
from raysim.privacy.secagg.setup import SecureRound, quantization_scale

if TYPE_CHECKING:
    import torch


def ring_sensitivity(clip_norm: float, secure: SecureRound, dim: int) -> float:
    """Δ₂ in ring units: the bound that each DP client's conditionally rounded vector keeps."""
    return quantized_sensitivity(clip_norm, quantization_scale(secure.params), dim)


class DPClip(Stage):
    def __init__(self, mechanism: str, control_clip_norm: float | None = None) -> None:
        self.distributed = mechanism == "distributed"
        self.control_clip_norm = control_clip_norm  # SCAFFOLD's S_c; None without control deltas

    def client(self, update: ClientUpdate, chunk: Chunk) -> bool:
        import torch

        if chunk.plan.clip_norm is None:  # an async step: no DP plan
            return True
        clipped, _, within = clip_to_norm(update.delta.cpu().numpy(), chunk.plan.clip_norm)
        update.delta = torch.from_numpy(clipped).to(update.delta.device)
        chunk.unclipped += int(within)
        if update.state_delta is not None:
            update.state_delta = clip_to_norm(update.state_delta, self.control_clip_norm)[0]
        return True

    def server(self, released: Released, context: Any) -> Released:
        """The mechanism on ``released.total`` (None: nobody was sampled, or secure aggregation aborted)."""
        dp, reduction = context.central_dp, context.reduction
        if reduction is not None:
            released.metrics["dp_unclipped_fraction"] = reduction.unclipped / max(reduction.kept, 1)
        contributors = int(released.included.sum())
        empty = released.total is None or contributors == 0
        released.metrics["dp_empty_round"] = int(empty)
        if released.total is None and self.distributed:
            dp.account(empty=True)
            released.keep_model = True
            return released
        secure = context.plan.secure if context.plan is not None else None
        if self.distributed:
            from raysim.privacy.dp.server import effective_distributed_z

            released.metrics["dp_effective_noise_multiplier"] = effective_distributed_z(
                dp.update_noise_multiplier, contributors, secure.params.threshold)
            words = context.dim if released.total is None else released.total.size  # k under the shared random mask
            released.metrics["dp_l2_sensitivity"] = ring_sensitivity(dp.clip_norm, secure, words)
        total = np.zeros(context.dim, dtype=np.float64) if released.total is None else released.total
        released.mean = dp.aggregate(total, unclipped=0 if reduction is None else reduction.unclipped, empty=empty,
                                     rng=np.random.default_rng([context.seed, context.round_index, 13]),
                                     server_noise=not self.distributed)
        released.mean_weight = dp.expected_weight
        if released.control_sum is not None and not empty and not self.distributed:  # DP-SCAFFOLD: Σ Δc_i noised with the same mechanism
            released.control_sum = dp.noise_sum(released.control_sum, self.control_clip_norm,
                                                np.random.default_rng([context.seed, context.round_index, 14]))
        else:
            released.control_rows, released.control_sum = None, None
        return released
