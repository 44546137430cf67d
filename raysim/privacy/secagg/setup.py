"""From a scenario's ``secure_aggregation`` block and a round's cohort to runnable protocol parameters.

Also the client-side encoding of a training update into the ring: the update, scaled by the client's
weight over a public bound on weights, then (for SCAFFOLD) its control delta, then the weight itself,
so one secure sum yields Σ w·Δ, Σ Δc and Σ w together.

Under differential privacy (DP-FedAvg's clipping, central or distributed) the ring vector is exactly
the d words of w·Δ: the fixed denominator needs no weight word, and a weight word in the sum would
release Σ w with no noise. Its rounding is the conditional randomized rounding of Kairouz, Liu and
Steinke (ICML 2021), which bounds each client's rounded vector by Δ₂ (``quantized_sensitivity``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from raysim.config import SecureAggregationConfig
from raysim.privacy.secagg.dropout import DropoutModel
from raysim.privacy.secagg.params import SecAggParams
from raysim.privacy.dp.distributed import add_discrete_noise, quantized_sensitivity
from raysim.privacy.secagg.quantize import dequantize, quantize

if TYPE_CHECKING:
    from raysim.privacy.he.params import HEParams


@dataclass(frozen=True)
class SecureRound:
    """What every client of one secure round needs besides the model: the settings, the session and
    the public bound W on client weights (the largest client's weight), so that w/W ≤ 1."""

    config: SecureAggregationConfig
    params: SecAggParams
    session_id: bytes
    weight_bound: float
    round_index: int | None = None  # the session's round (a FedBuff step); None: the chunk's round
    he: HEParams | None = None  # backend: he's encryption parameters; None: pairwise masking


def round_params(config: SecureAggregationConfig, num_clients: int) -> SecAggParams:
    """Validated parameters for a round of ``num_clients`` (raises ScenarioError naming the field)."""
    sparse = config.neighbours is not None
    quant_bits = config.quant_bits or max(1, config.modulus_bits - 1 - max(num_clients, 1).bit_length())
    settings = dict(modulus_bits=config.modulus_bits, quant_bits=quant_bits, clip_range=config.clip_range,
                    consistency_check=config.consistency_check,
                    corrupt_clients=math.ceil(config.corrupt_fraction * num_clients) if config.consistency_check else 0)
    if config.threshold is None or config.neighbours == "auto":
        derived = SecAggParams.derive(num_clients, expected_dropout=config.expected_dropout,
                                      corrupt_fraction=config.corrupt_fraction, sparse=sparse, **settings)
        neighbours = config.neighbours
        if neighbours == "auto":  # the derived degree, or the full graph when the cohort is smaller than it
            neighbours = derived.neighbours if derived.neighbours is not None and derived.neighbours < num_clients else None
        threshold = derived.threshold if config.threshold is None else _count(config.threshold, num_clients)
        if neighbours is not None and config.threshold is None:
            threshold = min(threshold, neighbours + 1)
    else:
        neighbours, threshold = config.neighbours, _count(config.threshold, num_clients)
    return SecAggParams(num_clients=num_clients, threshold=threshold, neighbours=neighbours, **settings).validate()


def _count(threshold: int | float, num_clients: int) -> int:
    return threshold if isinstance(threshold, int) else max(1, math.ceil(threshold * num_clients))


def dropout_model(config: SecureAggregationConfig) -> DropoutModel:
    return DropoutModel(probabilities=dict(config.dropout), schedule={k: frozenset(v) for k, v in config.schedule.items()},
                        late=frozenset(config.late))


def encode_update(
    delta: np.ndarray, weight: float, weight_bound: float, control_delta: np.ndarray | None,
    config: SecureAggregationConfig, params: SecAggParams, rng: np.random.Generator,
    *, dp_clip_norm: float | None = None, noise_variance: float = 0.0, noise_kind: str = "discrete_gaussian",
) -> np.ndarray:
    """The client's private ring vector: [w/W·Δ, (c/c_Δ)·Δc, w/W] quantized with stochastic rounding.

    Under DP (``dp_clip_norm`` S: w/W·Δ has norm ≤ S) the vector is [w/W·Δ] alone, d words, rounded
    conditionally to the norm bound Δ₂ of ``quantized_sensitivity``; with distributed DP the client
    then adds its share of discrete noise (``noise_variance``, ring units) to every word before masking.
    """
    scaled = (weight / weight_bound) * delta.astype(np.float64)
    if dp_clip_norm is None:
        if control_delta is not None:
            scaled = np.concatenate([scaled, control_delta.astype(np.float64) * (config.clip_range / config.control_clip_range)])
        return quantize(scaled, weight / weight_bound, params, rng)
    if control_delta is not None:
        raise ValueError("DP's ring vector carries no control delta (SCAFFOLD with DP is refused by the scenario)")
    norm = math.sqrt(float(np.dot(scaled, scaled)))
    if norm > dp_clip_norm * (1 + 1e-9):
        raise ValueError(f"a DP update must be clipped to {dp_clip_norm} before encoding (its weighted norm is {norm})")
    bound = quantized_sensitivity(dp_clip_norm, quantization_scale(params), scaled.size)
    ring = quantize(scaled, None, params, rng, norm_bound=bound)
    if noise_variance > 0:
        ring = add_discrete_noise(ring, noise_variance, noise_kind, rng, modulus=_noise_modulus(params))
    return ring


def _noise_modulus(params: SecAggParams) -> int | None:
    """Reduce noisy words mod 2^b, unless b is the word size, where the dtype's wraparound already does."""
    return None if params.modulus_bits == 8 * params.dtype.itemsize else 1 << params.modulus_bits


def quantization_scale(params: SecAggParams) -> float:
    """Ring units per unit of the encoded values: (2^q − 1)/(2c)."""
    return ((1 << params.quant_bits) - 1) / (2.0 * params.clip_range)


def decode_sum(
    total: np.ndarray, count: int, dim: int, weight_bound: float, config: SecureAggregationConfig, params: SecAggParams,
) -> tuple[np.ndarray, float | None, np.ndarray | None]:
    """(Σ w·Δ, Σ w, Σ Δc or None) from the unmasked ring sum of ``count`` encoded updates.

    A sum of exactly ``dim`` words is DP's encoding, which has no weight word: Σ w is then None (DP
    divides by its fixed denominator). DP never carries control deltas, so the length tells them apart.
    """
    weight_word = np.size(total) > dim
    values, weight = dequantize(_centered(total, count, params), count, params, weight_word=weight_word)
    weighted = values[:dim] * weight_bound
    control = values[dim:] * (config.control_clip_range / config.clip_range) if values.size > dim else None
    return weighted, None if weight is None else weight * weight_bound, control


def _centered(total: np.ndarray, count: int, params: SecAggParams) -> np.ndarray:
    """The ring sum with noise that wrapped below zero (or past 2^b) brought back next to its expected value.

    Without noise the sum of ``count`` inputs lies in [0, count·2^q) and this is the identity; distributed
    DP noise can push a word across the modulus, so each word is read as the representative nearest to
    the midpoint count·(2^q − 1)/2 (noise far below 2^(b−1) decodes exactly).
    """
    modulus = 1 << params.modulus_bits
    midpoint = count * ((1 << params.quant_bits) - 1) // 2
    shifted = (total.astype(object) - midpoint) % modulus if params.modulus_bits > 62 else \
        (total.astype(np.int64) - midpoint) % modulus
    signed = np.where(shifted >= modulus // 2, shifted - modulus, shifted)
    return (signed + midpoint).astype(np.float64)
