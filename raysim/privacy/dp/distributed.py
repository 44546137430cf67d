"""Distributed DP under secure aggregation: each client adds its share of integer noise before masking.

The server only ever sees the secure sum, so the noise must be in it already. Each client
adds discrete noise of variance ``target_variance / t`` to its quantized update, where t is
the minimum number of survivors that secure aggregation accepts; any t survivors then carry
at least the target variance, and more survivors only add noise. Two noise families:

* discrete Gaussian N_Z(0, σ²), drawn with the rejection sampler of Canonne, Kamath and
  Steinke (NeurIPS 2020, Algorithm 3): a discrete Laplace proposal of scale t = ⌊σ⌋ + 1,
  accepted with probability exp(−(|Y| − σ²/t)² / (2σ²)). It is vectorised over the vector,
  and its Bernoulli trials use floating-point uniforms (as vectorised implementations such as
  TensorFlow Privacy's do) instead of the paper's exact rational arithmetic. Its variance
  is below σ² by a term that vanishes exponentially in σ² (CKS20): negligible for σ² ≥ 1.
* Skellam, the difference of two Poisson(σ²/2) draws (Agarwal, Kairouz, Liu, NeurIPS 2021),
  whose sum over clients is again Skellam with the summed variance.

Accounting treats the summed noise as Gaussian noise of the same variance, with sensitivity
in quantized units: ``quantized_sensitivity`` is the bound Δ₂ that *conditional randomized
rounding* (Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian Mechanism for Federated
Learning with Secure Aggregation", ICML 2021) enforces on each client's rounded vector, so the
rounding term counts in the sensitivity. ``effective_noise_multiplier`` reports the resulting z
under the dropout assumption. Noise comes from a caller-seeded ``numpy.random.Generator`` (a
simulation device, not a secure source).
"""

from __future__ import annotations

import math

import numpy as np

from raysim.errors import ScenarioError

NOISE_KINDS = ("discrete_gaussian", "skellam")


def per_client_variance(target_variance: float, min_survivors: int) -> float:
    """Share of the variance each client adds so that any ``min_survivors`` of them reach the target."""
    if not target_variance >= 0:
        raise ValueError(f"target_variance must be >= 0 (got {target_variance})")
    if not min_survivors >= 1:
        raise ScenarioError(
            f"secagg.threshold: the minimum number of survivors must be >= 1 (got {min_survivors}); "
            "use the t of secure aggregation"
        )
    return target_variance / min_survivors


DEFAULT_BETA = math.exp(-0.5)  # the β of Kairouz, Liu, Steinke's experiments and reference code


def quantized_sensitivity(clip_norm: float, scale: float, dimension: int, beta: float = DEFAULT_BETA) -> float:
    """Δ₂: the L2 bound that conditional randomized rounding enforces on one client's rounded vector.

    With the update clipped to norm S and scaled to c = scale·S ring units in d coordinates,
    Kairouz, Liu, Steinke (ICML 2021; Thm. 1 / Eq. 2 of arXiv:2102.06387 with the deterministic
    bound of their Prop. 22, as their reference implementation labels them) give
        Δ₂² = min{ c² + d/4 + √(2·ln(1/β))·(c + √d/2), (c + √d)² }:
    unbiased rounding adds Σ p_i(1 − p_i) ≤ d/4 to the squared norm in expectation, with a
    sub-Gaussian tail, so one draw lands within Δ₂ with probability ≥ 1 − β and the client redraws
    until it does; the second term holds for every draw (no coordinate moves by 1 or more).
    """
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ScenarioError(f"privacy.clip_norm: must be finite and > 0 for distributed DP (got {clip_norm}); try 1.0")
    if not scale > 0:
        raise ScenarioError(f"secure_aggregation.quant_bits: the quantization scale must be > 0 (got {scale})")
    if not dimension >= 1:
        raise ValueError(f"dimension must be >= 1 (got {dimension})")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1) (got {beta})")
    c, d = scale * clip_norm, float(dimension)
    always = (c + math.sqrt(d)) ** 2
    if beta == 0.0:
        return math.sqrt(always)
    likely = c * c + d / 4.0 + math.sqrt(2.0 * math.log(1.0 / beta)) * (c + math.sqrt(d) / 2.0)
    return math.sqrt(min(likely, always))


def target_variance(noise_multiplier: float, sensitivity: float) -> float:
    """Variance (z·Δ)² that the noise in the sum must carry for noise multiplier z at sensitivity Δ."""
    if not noise_multiplier >= 0:
        raise ScenarioError(f"privacy.noise_multiplier: must be >= 0 (got {noise_multiplier}); use a value such as 1.0")
    return (noise_multiplier * sensitivity) ** 2


def effective_noise_multiplier(
    *, target_variance: float, min_survivors: int, sensitivity: float, survivors: int | None = None
) -> float:
    """z actually achieved: √(survivors · per-client variance) / Δ.

    ``survivors=None`` assumes the worst case the protocol allows (exactly ``min_survivors``
    survive), which is the figure to account with before the round; pass the realised
    number of survivors to report what a round actually carried.
    """
    share = per_client_variance(target_variance, min_survivors)
    count = min_survivors if survivors is None else survivors
    if count < min_survivors:
        raise ValueError(f"survivors ({count}) below the minimum {min_survivors}: secure aggregation would have aborted")
    return math.sqrt(count * share) / sensitivity


def sample_discrete_gaussian(variance: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` i.i.d. draws from N_Z(0, variance) (Canonne, Kamath, Steinke 2020, Algorithm 3), as int64."""
    out = np.zeros(size, dtype=np.int64)
    if variance == 0 or size == 0:
        return out
    sigma = math.sqrt(variance)
    t = math.floor(sigma) + 1
    success = -math.expm1(-1.0 / t)  # discrete Laplace(t) = difference of two Geometric(1 − e^{−1/t})
    pending = np.arange(size)
    while pending.size:
        proposal = rng.geometric(success, pending.size) - rng.geometric(success, pending.size)
        accept = rng.random(pending.size) < np.exp(-((np.abs(proposal) - variance / t) ** 2) / (2.0 * variance))
        out[pending[accept]] = proposal[accept]
        pending = pending[~accept]
    return out


def sample_skellam(variance: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` i.i.d. draws of Poisson(variance/2) − Poisson(variance/2), as int64."""
    if variance == 0 or size == 0:
        return np.zeros(size, dtype=np.int64)
    mu = variance / 2.0
    return rng.poisson(mu, size).astype(np.int64) - rng.poisson(mu, size).astype(np.int64)


def add_discrete_noise(
    q_vec: np.ndarray, variance: float, kind: str, rng: np.random.Generator, *, modulus: int | None = None
) -> np.ndarray:
    """Return ``q_vec`` plus integer noise of the given per-client variance, in ``q_vec``'s dtype.

    Signed vectors get the plain sum. Unsigned vectors are field elements: with ``modulus``
    the result is reduced mod it (which must be ≤ 2^62), without it the sum wraps modulo
    2^bits of the dtype, which is the same thing when secure aggregation works mod 2^bits.
    """
    if not np.issubdtype(q_vec.dtype, np.integer):
        raise TypeError(f"add_discrete_noise needs a quantized integer vector (got dtype {q_vec.dtype})")
    if not variance >= 0:
        raise ValueError(f"variance must be >= 0 (got {variance})")
    if kind == "discrete_gaussian":
        noise = sample_discrete_gaussian(variance, q_vec.size, rng)
    elif kind == "skellam":
        noise = sample_skellam(variance, q_vec.size, rng)
    else:
        raise ScenarioError(
            f"privacy.distributed.noise: must be one of {list(NOISE_KINDS)} (got {kind!r}); "
            "use 'discrete_gaussian' or 'skellam'"
        )
    noise = noise.reshape(q_vec.shape)
    if modulus is not None:
        if not 1 < modulus <= 2**62:
            raise ValueError(f"modulus must be in (1, 2^62] (got {modulus})")
        return np.mod(q_vec.astype(np.int64) + noise, modulus).astype(q_vec.dtype)
    # Casting negative int64 noise to an unsigned dtype wraps modulo 2^bits, as does the sum.
    return q_vec + noise.astype(q_vec.dtype)
