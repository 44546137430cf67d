"""Fixed-point encoding of a weighted update into Z_(2^b) before masking, and its inverse.

Secure aggregation sums integers mod R = 2^b (Bonawitz et al. 2017, §3), so each client clips its
vector to [−c, c], maps it affinely onto 2^q levels {0, …, 2^q − 1} with unbiased stochastic
rounding (E[round(v)] = v), and appends its weight encoded the same way. The sum of n such
vectors is below n · 2^q < 2^b (the overflow guard checked by ``SecAggParams.validate``), so it
decodes exactly to the sum of the rounded values: Σ w_u·x_u and Σ w_u come out together, which is
what weighted FedAvg needs. The engine passes w·x already scaled so that it lies in [−c, c].

Under differential privacy the vector carries no weight word (DP-FedAvg divides by a fixed
denominator) and the rounding is *conditional* (Kairouz, Liu, Steinke, ICML 2021): it is redrawn
until the rounded vector, measured from the public encoding of zero, lies within a norm bound Δ₂,
so that Δ₂ bounds each client's contribution to the sum, rounding included.
"""

from __future__ import annotations

import math

import numpy as np

from raysim.privacy.secagg.params import SecAggParams

# A draw lands within Kairouz et al.'s Δ₂ with probability ≥ 1 − β (≈ 0.39 at their β = e^−0.5), so this
# many misses in a row means the input broke the bound's premise (‖x‖ larger than the clip behind Δ₂).
MAX_ROUNDING_DRAWS = 200


def _scale(params: SecAggParams) -> float:
    # Levels per unit: [−c, c] ↦ [0, 2^q − 1].
    return ((1 << params.quant_bits) - 1) / (2.0 * params.clip_range)


def quantize(
    values: np.ndarray, weight: float | None, params: SecAggParams, rng: np.random.Generator,
    *, norm_bound: float | None = None,
) -> np.ndarray:
    """Clip ``values`` (and ``weight``) to [−c, c], round stochastically onto 2^q levels, return the ring words.

    With a ``weight`` the last of the m + 1 words is the weight; with None there are exactly m words.
    With ``norm_bound`` (ring units) the rounding of the m values is redrawn until ‖round − o‖₂ ≤
    ``norm_bound``, where o = c·(2^q − 1)/(2c) is the encoding of 0 (conditional randomized rounding).
    ``rng`` drives only the rounding (it is not a mask).
    """
    words = np.size(values) + (weight is not None)
    flat = np.empty(words, dtype=np.float64)
    flat[: np.size(values)] = np.ravel(values)
    if weight is not None:
        flat[-1] = weight
    np.clip(flat, -params.clip_range, params.clip_range, out=flat)
    flat += params.clip_range
    flat *= _scale(params)
    top = (1 << params.quant_bits) - 1
    if norm_bound is None:
        flat += rng.random(flat.size)
        np.floor(flat, out=flat)
        np.minimum(flat, top, out=flat)
        return flat.astype(params.dtype)
    offset = params.clip_range * _scale(params)
    for _ in range(MAX_ROUNDING_DRAWS):
        rounded = np.minimum(np.floor(flat + rng.random(flat.size)), top)
        centred = rounded[: np.size(values)] - offset
        if math.sqrt(float(np.dot(centred, centred))) <= norm_bound:
            return rounded.astype(params.dtype)
    raise ValueError(
        f"conditional rounding missed the norm bound {norm_bound:.6g} in {MAX_ROUNDING_DRAWS} draws: the input's norm "
        "exceeds the clip the bound was computed from"
    )


def dequantize(
    total: np.ndarray, count: int, params: SecAggParams, *, weight_word: bool = True,
) -> tuple[np.ndarray, float | None]:
    """Decode the ring sum of ``count`` quantized inputs into (Σ w·x as float64, Σ w, or None without a weight word)."""
    decoded = np.asarray(total).astype(np.float64) / _scale(params) - count * params.clip_range
    if not weight_word:
        return decoded, None
    return decoded[:-1], float(decoded[-1])
