"""Error feedback: what compression drops this round is added back to the next round's update.

EF-SGD (Seide et al. 2014, "1-bit SGD"; Karimireddy et al. 2019, "Error Feedback Fixes SignSGD",
Algorithm 2): a client keeps a residual e_t and sends C(Δ_t + e_t); the new residual is
e_{t+1} = Δ_t + e_t − C(Δ_t + e_t). Summed over rounds, Σ sent + e_T = Σ Δ, so no part of an update is
lost, only delayed. The argument needs a contractive compressor, ‖C(x) − x‖² ≤ (1 − δ)‖x‖² (their
Assumption A): top-k and scaled sign are; rand-k scaled by d/k is not (the residual would grow by a
factor of about d/k − 1 each round), so error feedback refuses it and asks for ``unbiased: false``.
"""

from __future__ import annotations

import numpy as np

from raysim.compression.codec import CompressionSpec, compress_roundtrip
from raysim.errors import ScenarioError


def check_error_feedback(spec: CompressionSpec) -> None:
    """Raise ``ScenarioError`` when ``spec`` is not a contraction, which makes error feedback diverge."""
    if spec.kind in ("randk", "random_mask") and spec.unbiased:
        raise ScenarioError(f"compression.unbiased: error feedback with {spec.kind} needs unbiased: false "
                            f"(the d/k scaling makes the residual grow every round)")


def compress_with_feedback(delta: np.ndarray, residual: np.ndarray | None, spec: CompressionSpec,
                           rng: np.random.Generator,
                           shared_seed: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Compress ``delta`` plus the carried ``residual`` (None means zeros).

    Returns (what the receiver decodes, the new residual, the message's bytes), all float32 vectors
    of ``delta``'s flat length.
    """
    check_error_feedback(spec)
    corrected = np.ravel(delta).astype(np.float32)  # a fresh copy, so the caller's delta is untouched
    if residual is not None:
        if np.size(residual) != corrected.size:
            raise ValueError(f"compress_with_feedback: residual has {np.size(residual)} coordinates, "
                             f"delta has {corrected.size}")
        corrected += np.ravel(residual)
    sent, nbytes = compress_roundtrip(corrected, spec, rng, shared_seed)
    return sent, corrected - sent, nbytes
