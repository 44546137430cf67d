"""What a client encrypts, and how the decrypted sum goes back to Σ w·Δ, Σ w and Σ Δc.

BFV reuses masking's encoding (``raysim.privacy.secagg.setup.encode_update``): the same quantized words,
conditional rounding and discrete noise, read as signed integers so that distributed DP's noise, which may
wrap a word below zero in Z_(2^b), adds up exactly in Z_t. The decrypted sum, reduced mod 2^b, is the ring
sum masking unmasks, and ``decode_sum`` reads it the same way, so the two backends release the same sum.

CKKS encrypts the same layout as floats without quantizing: [w/W·Δ, (c/c_Δ)·Δc, w/W], clipped to [−c, c]
(under DP [w/W·Δ] alone, already clipped to norm S).
"""

from __future__ import annotations

import math

import numpy as np

from raysim.config import SecureAggregationConfig
from raysim.privacy.secagg.params import SecAggParams
from raysim.privacy.secagg.setup import encode_update


def he_input(
    delta: np.ndarray, weight: float, weight_bound: float, control_delta: np.ndarray | None,
    config: SecureAggregationConfig, params: SecAggParams, rng: np.random.Generator,
    *, dp_clip_norm: float | None = None, noise_variance: float = 0.0, noise_kind: str = "discrete_gaussian",
) -> np.ndarray:
    """What a client encrypts (``encode_update``'s arguments): CKKS's clipped floats, or BFV's signed words."""
    if config.he.scheme == "ckks":
        return encode_floats(delta, weight, weight_bound, control_delta, config, dp_clip_norm=dp_clip_norm)
    return signed_words(encode_update(delta, weight, weight_bound, control_delta, config, params, rng,
                                      dp_clip_norm=dp_clip_norm, noise_variance=noise_variance, noise_kind=noise_kind),
                        params)


def signed_words(ring: np.ndarray, params: SecAggParams) -> np.ndarray:
    """Ring words in [0, 2^b) as the integers in [−2^(b−1), 2^(b−1)) they stand for (noise may wrap below 0)."""
    words = ring.astype(np.int64) if params.modulus_bits < 64 else ring.view(np.int64).copy()
    half = 1 << (params.modulus_bits - 1)
    if params.modulus_bits < 64:
        words[words >= half] -= 1 << params.modulus_bits
    return words


def ring_of_sum(total: np.ndarray, params: SecAggParams) -> np.ndarray:
    """An exact integer sum reduced mod 2^b into ring words, as masking's unmasking returns it."""
    return np.mod(total, 1 << params.modulus_bits).astype(params.dtype)


def encode_floats(delta: np.ndarray, weight: float, weight_bound: float, control_delta: np.ndarray | None,
                  config: SecureAggregationConfig, *, dp_clip_norm: float | None = None) -> np.ndarray:
    """CKKS's input: the scaled update (and control delta and weight), clipped to [−c, c], in float64."""
    scaled = (weight / weight_bound) * delta.astype(np.float64)
    if dp_clip_norm is not None:
        norm = math.sqrt(float(np.dot(scaled, scaled)))
        if norm > dp_clip_norm * (1 + 1e-9):
            raise ValueError(f"a DP update must be clipped to {dp_clip_norm} before encoding (its weighted norm is {norm})")
        return scaled
    parts = [scaled]
    if control_delta is not None:
        parts.append(control_delta.astype(np.float64) * (config.clip_range / config.control_clip_range))
    parts.append(np.array([weight / weight_bound]))
    return np.clip(np.concatenate(parts), -config.clip_range, config.clip_range)


def decode_floats(total: np.ndarray, dim: int, weight_bound: float,
                  config: SecureAggregationConfig) -> tuple[np.ndarray, float | None, np.ndarray | None]:
    """(Σ w·Δ, Σ w or None under DP, Σ Δc or None) from CKKS's decrypted sum of ``encode_floats`` vectors."""
    if total.size == dim:
        return total * weight_bound, None, None
    weighted, weight = total[:dim] * weight_bound, float(total[-1]) * weight_bound
    control = total[dim:-1] * (config.control_clip_range / config.clip_range) if total.size > dim + 1 else None
    return weighted, weight, control
