"""Specifications of the DP mechanisms on flat vectors: clipping, central DP-FedAvg, adaptive clipping, distributed noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from raysim.errors import ScenarioError
from raysim.privacy.dp.adaptive import AdaptiveClipping, update_noise_multiplier
from raysim.privacy.dp.central import dp_fedavg_aggregate, noise_stddev, user_weight, weighted_mean
from raysim.privacy.dp.clipping import clip_to_norm, l2_norm
from raysim.privacy.dp.distributed import (
    add_discrete_noise,
    effective_noise_multiplier,
    per_client_variance,
    quantized_sensitivity,
    sample_discrete_gaussian,
    target_variance,
)

ALPHA = 1e-6  # two-sided false-alarm rate of each statistical check (the seeds are fixed anyway)


def _variance_within_chi2_interval(samples: np.ndarray, variance: float) -> bool:
    n = samples.size
    low, high = stats.chi2.ppf([ALPHA / 2, 1 - ALPHA / 2], n - 1) / (n - 1) * variance
    return bool(low <= samples.var(ddof=1) <= high)


def _client_deltas(count: int, dim: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.uniform(-3, 3, count)
    return [(rng.standard_normal(dim) * s).astype(np.float32) for s in scales]


# --- clipping -----------------------------------------------------------------------------------


def test_clip_bound_holds_for_every_client():
    for delta in _client_deltas(300, 257, seed=1):
        clipped, norm, unclipped = clip_to_norm(delta, 1.0)
        assert clipped.dtype == np.float32
        assert l2_norm(clipped) <= 1.0
        assert norm == pytest.approx(l2_norm(delta))
        assert unclipped == (norm <= 1.0)
        if unclipped:
            assert clipped is delta
        else:
            assert l2_norm(clipped) == pytest.approx(1.0, rel=1e-5)
            cosine = np.dot(clipped.astype(np.float64), delta) / (l2_norm(clipped) * norm)
            assert cosine == pytest.approx(1.0, abs=1e-6)


def test_infinite_clip_leaves_every_update_bit_identical():
    for delta in _client_deltas(20, 64, seed=2):
        clipped, norm, unclipped = clip_to_norm(delta, math.inf)
        assert unclipped and norm == pytest.approx(l2_norm(delta))
        assert clipped.tobytes() == delta.tobytes()


def test_clip_rejects_a_non_positive_bound():
    with pytest.raises(ScenarioError, match="privacy.clip_norm"):
        clip_to_norm(np.ones(3, dtype=np.float32), 0.0)


# --- central DP-FedAvg --------------------------------------------------------------------------


@pytest.mark.parametrize("accumulate", [np.float32, np.float64])
def test_zero_noise_and_infinite_clip_reproduce_fedavg_bit_for_bit(accumulate):
    deltas = _client_deltas(17, 1000, seed=3)
    weights = np.random.default_rng(4).integers(1, 200, len(deltas)).astype(np.float64)

    def weighted_sum(updates: list[np.ndarray]) -> np.ndarray:
        total = np.zeros(updates[0].shape, dtype=accumulate)
        for w, d in zip(weights, updates):
            total += accumulate(w) * d.astype(accumulate)
        return total

    fedavg = (weighted_sum(deltas) / float(weights.sum())).astype(np.float32)  # the engine's plain reduction
    assert weighted_mean(weighted_sum(deltas), float(weights.sum())).astype(np.float32).tobytes() == fedavg.tobytes()
    clipped = [clip_to_norm(d, math.inf)[0] for d in deltas]
    rng = np.random.default_rng(5)
    untouched = rng.bit_generator.state
    dp = dp_fedavg_aggregate(
        weighted_sum(clipped),
        expected_total_weight=float(weights.sum()),
        clip_norm=math.inf,
        noise_multiplier=0.0,
        rng=rng,
    ).astype(np.float32)
    assert dp.tobytes() == fedavg.tobytes()
    assert rng.bit_generator.state == untouched


def test_central_noise_std_matches_sigma():
    clip, z, expected_weight = 0.7, 1.3, 4.5
    sigma = noise_stddev(clip_norm=clip, noise_multiplier=z, expected_total_weight=expected_weight)
    assert sigma == pytest.approx(z * clip / expected_weight)
    total = np.random.default_rng(6).standard_normal(200_000).astype(np.float32)
    noisy = dp_fedavg_aggregate(
        total, expected_total_weight=expected_weight, clip_norm=clip, noise_multiplier=z, rng=np.random.default_rng(7)
    )
    noise = noisy.astype(np.float64) - total.astype(np.float64) / expected_weight
    assert abs(noise.mean()) < 5 * sigma / math.sqrt(noise.size)
    assert _variance_within_chi2_interval(noise, sigma**2)


def test_central_noise_is_reproducible_from_the_callers_seed():
    total = np.ones(1000, dtype=np.float32)
    kwargs = dict(expected_total_weight=2.0, clip_norm=1.0, noise_multiplier=1.0)
    a = dp_fedavg_aggregate(total, rng=np.random.default_rng(8), **kwargs)
    b = dp_fedavg_aggregate(total, rng=np.random.default_rng(8), **kwargs)
    assert a.tobytes() == b.tobytes()


def test_user_weights_are_capped_at_one():
    assert user_weight(50, 100) == 0.5
    assert user_weight(500, 100) == 1.0


@pytest.mark.parametrize(
    "clip, z, field",
    [(math.inf, 1.0, "privacy.clip_norm"), (0.0, 1.0, "privacy.clip_norm"), (1.0, -0.5, "privacy.noise_multiplier")],
)
def test_central_rejects_unusable_noise_settings(clip, z, field):
    with pytest.raises(ScenarioError, match=field):
        dp_fedavg_aggregate(
            np.zeros(4, dtype=np.float32),
            expected_total_weight=1.0,
            clip_norm=clip,
            noise_multiplier=z,
            rng=np.random.default_rng(0),
        )


# --- adaptive clipping --------------------------------------------------------------------------


def _run_adaptive(clipper: AdaptiveClipping, update_scale: float, rounds: int, cohort: int) -> list[float]:
    rng = np.random.default_rng(9)
    history = [clipper.clip_norm]
    for _ in range(rounds):
        updates = [rng.standard_normal(32).astype(np.float32) * update_scale for _ in range(cohort)]
        unclipped = sum(clip_to_norm(u, clipper.clip_norm)[2] for u in updates)
        history.append(clipper.step(unclipped_count=unclipped, cohort_size=cohort, rng=rng))
    return history


def test_adaptive_clip_decreases_when_every_update_is_far_below_it():
    clipper = AdaptiveClipping.for_cohort(initial_clip_norm=10.0, noise_multiplier=1.0, expected_cohort_size=100)
    history = _run_adaptive(clipper, update_scale=1e-3, rounds=20, cohort=100)
    assert all(later < earlier for earlier, later in zip(history, history[1:]))
    assert history[-1] < 10.0 * math.exp(-0.2 * 0.4 * 20)  # b̄ ≈ 1 > γ = 0.5 every round


def test_adaptive_clip_increases_when_every_update_is_clipped():
    clipper = AdaptiveClipping.for_cohort(initial_clip_norm=0.01, noise_multiplier=1.0, expected_cohort_size=100)
    history = _run_adaptive(clipper, update_scale=100.0, rounds=20, cohort=100)
    assert all(later > earlier for earlier, later in zip(history, history[1:]))


def test_adaptive_step_follows_the_geometric_rule_with_a_noisy_count():
    clipper = AdaptiveClipping(clip_norm=2.0, noise_multiplier=1.0, count_stddev=3.0, target_quantile=0.3, learning_rate=0.5)
    draw = np.random.default_rng(10).normal(0.0, 3.0)
    new = clipper.step(unclipped_count=40, cohort_size=60, rng=np.random.default_rng(10))
    assert new == pytest.approx(2.0 * math.exp(-0.5 * ((40 + draw) / 60 - 0.3)))
    assert clipper.clip_norm == new
    assert AdaptiveClipping.from_state_dict(clipper.state_dict()) == clipper


def test_adaptive_noise_split_raises_the_update_noise():
    clipper = AdaptiveClipping.for_cohort(initial_clip_norm=1.0, noise_multiplier=1.0, expected_cohort_size=100)
    assert clipper.count_stddev == 5.0  # cohort / 20
    assert clipper.update_noise_multiplier == pytest.approx((1.0 - (2 * 5.0) ** -2) ** -0.5)
    assert clipper.update_noise_multiplier > 1.0
    assert update_noise_multiplier(0.0, 5.0) == 0.0


def test_adaptive_rejects_count_noise_too_small_for_z():
    with pytest.raises(ScenarioError, match="privacy.noise_multiplier"):
        AdaptiveClipping.for_cohort(initial_clip_norm=1.0, noise_multiplier=1.5, expected_cohort_size=10)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"target_quantile": 1.5}, "privacy.adaptive.target_quantile"),
        ({"learning_rate": 0.0}, "privacy.adaptive.learning_rate"),
        ({"initial_clip_norm": math.inf}, "privacy.clip_norm"),
    ],
)
def test_adaptive_rejects_bad_settings(overrides, field):
    kwargs = {"initial_clip_norm": 1.0, "noise_multiplier": 1.0, "expected_cohort_size": 100, **overrides}
    with pytest.raises(ScenarioError, match=field):
        AdaptiveClipping.for_cohort(**kwargs)


# --- distributed DP -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["discrete_gaussian", "skellam"])
def test_discrete_noise_of_the_minimum_survivors_sums_to_the_target_variance(kind):
    target, clients, min_survivors, dim = 180.0, 10, 6, 60_000
    share = per_client_variance(target, min_survivors)
    rng = np.random.default_rng(11)
    zeros = np.zeros(dim, dtype=np.int64)
    noises = [add_discrete_noise(zeros, share, kind, rng) for _ in range(clients)]
    assert all(n.dtype == np.int64 for n in noises)
    at_threshold = np.sum(noises[:min_survivors], axis=0)
    assert abs(at_threshold.mean()) < 5 * math.sqrt(target / dim)
    assert _variance_within_chi2_interval(at_threshold.astype(np.float64), target)
    everyone = np.sum(noises, axis=0)
    assert _variance_within_chi2_interval(everyone.astype(np.float64), target * clients / min_survivors)


def test_discrete_gaussian_sampler_matches_its_pmf():
    variance = 2.0
    draws = sample_discrete_gaussian(variance, 200_000, np.random.default_rng(12))
    support = np.arange(-6, 7)
    weights = np.exp(-np.arange(-60, 61) ** 2 / (2 * variance))
    pmf = np.exp(-(support**2) / (2 * variance)) / weights.sum()
    observed = np.array([np.count_nonzero(draws == k) for k in support] + [np.count_nonzero(np.abs(draws) > 6)])
    expected = np.append(pmf, 1.0 - pmf.sum()) * draws.size
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert stats.chi2.sf(chi2, len(observed) - 1) > ALPHA


def test_discrete_noise_on_field_elements_wraps_modulo():
    modulus = 2**20
    q = np.random.default_rng(13).integers(0, modulus, 5000).astype(np.uint64)
    noisy = add_discrete_noise(q, 50.0, "skellam", np.random.default_rng(14), modulus=modulus)
    noise = add_discrete_noise(np.zeros(5000, dtype=np.int64), 50.0, "skellam", np.random.default_rng(14))
    assert noisy.dtype == np.uint64 and int(noisy.max()) < modulus
    assert np.array_equal((noisy.astype(np.int64) - q.astype(np.int64)) % modulus, noise % modulus)
    wrapped = add_discrete_noise(q.astype(np.uint32), 50.0, "skellam", np.random.default_rng(14))
    assert np.array_equal(wrapped.astype(np.int64), (q.astype(np.int64) + noise) % 2**32)


def test_effective_noise_multiplier_reports_the_dropout_assumption():
    sensitivity = quantized_sensitivity(clip_norm=1.0, scale=64.0, dimension=100)
    variance = target_variance(1.2, sensitivity)
    worst_case = effective_noise_multiplier(target_variance=variance, min_survivors=8, sensitivity=sensitivity)
    assert worst_case == pytest.approx(1.2)
    with_all = effective_noise_multiplier(target_variance=variance, min_survivors=8, sensitivity=sensitivity, survivors=10)
    assert with_all == pytest.approx(1.2 * math.sqrt(10 / 8))


@pytest.mark.parametrize(("clip", "scale", "dim", "beta", "expected"), [
    # c = 64, d = 100, β = e^−0.5 (so √(2 ln 1/β) = 1): min{4096 + 25 + 1·(64 + 5), (64 + 10)²} = 4190
    (1.0, 64.0, 100, math.exp(-0.5), math.sqrt(4190.0)),
    # c = 1, d = 10⁴: min{1 + 2500 + 1·(1 + 50), 101²} = 2552
    (0.5, 2.0, 10_000, math.exp(-0.5), math.sqrt(2552.0)),
    # a tiny β makes the first bound loose: (c + √d)² = (1 + 1)² wins
    (1.0, 1.0, 1, 1e-10, 2.0),
    (1.0, 64.0, 100, 0.0, 74.0),  # β = 0: only the deterministic bound c + √d
])
def test_quantized_sensitivity_is_the_conditional_rounding_bound_of_kairouz_liu_steinke(clip, scale, dim, beta, expected):
    assert quantized_sensitivity(clip, scale, dim, beta) == pytest.approx(expected, rel=1e-12)


def test_distributed_rejects_an_unknown_noise_kind():
    with pytest.raises(ScenarioError, match="privacy.distributed.noise"):
        add_discrete_noise(np.zeros(3, dtype=np.int64), 1.0, "laplace", np.random.default_rng(0))
