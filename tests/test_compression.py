"""Specification of the update compressors: what each keeps, that the unbiased ones are unbiased, that
error feedback loses nothing, and that every message has exactly the size its format says."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raysim.compression import (
    CompressionSpec,
    compress,
    compress_roundtrip,
    compress_with_feedback,
    decompress,
    dense_bytes,
    keep_count,
    shared_mask_indices,
)
from raysim.errors import ScenarioError

HEADER = 5  # kind code (uint8) + dimension (uint32)


def _vector(dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_topk_keeps_exactly_the_k_largest_magnitudes_with_their_exact_values():
    v = _vector(10_000)
    decoded = decompress(compress(v, CompressionSpec("topk", fraction=0.01), _rng()))
    kept = np.flatnonzero(decoded)
    assert kept.size == 100
    assert np.array_equal(decoded[kept], v[kept])
    assert np.abs(v[kept]).min() >= np.abs(np.delete(v, kept)).max()


def test_topk_breaks_ties_toward_the_lower_index():
    v = np.array([0.5, -1.0, 1.0, 1.0, -1.0], dtype=np.float32)
    decoded = decompress(compress(v, CompressionSpec("topk", fraction=0.4), _rng()))
    assert decoded.tolist() == [0.0, -1.0, 1.0, 0.0, 0.0]


def test_none_and_full_topk_round_trip_exactly():
    v = _vector(777)
    assert np.array_equal(decompress(compress(v, CompressionSpec("none"), _rng())), v)
    assert np.array_equal(decompress(compress(v, CompressionSpec("topk", fraction=1.0), _rng())), v)


def test_keep_count_is_the_ceiling_of_the_fraction_and_at_least_one():
    assert keep_count(10_000, 0.01) == 100
    assert keep_count(100, 0.07) == 7
    assert keep_count(1001, 0.01) == 11
    assert keep_count(10, 0.001) == 1


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_stochastic_quantization_is_unbiased(bits):
    v = _vector(40, seed=bits)
    spec, rng, draws = CompressionSpec("quantize", bits=bits), _rng(1), 4000
    mean = np.mean([compress_roundtrip(v, spec, rng)[0] for _ in range(draws)], axis=0, dtype=np.float64)
    step = (float(v.max()) - float(v.min())) / (2**bits - 1)
    # A draw lands on one of the two levels around v, so its variance is at most step²/4: allow 5σ of the mean.
    tolerance = 5 * (step / 2) / math.sqrt(draws) + 1e-6
    assert np.abs(mean - v).max() <= tolerance


@pytest.mark.parametrize("bits", [1, 3, 8, 12, 16])
def test_deterministic_quantization_errs_by_at_most_half_a_level(bits):
    v = _vector(1001, seed=bits)
    decoded = decompress(compress(v, CompressionSpec("quantize", bits=bits, stochastic=False), _rng()))
    step = (float(v.max()) - float(v.min())) / (2**bits - 1)
    assert np.abs(decoded - v).max() <= step / 2 + 1e-6 * np.abs(v).max()


@pytest.mark.parametrize("bits", range(1, 17))
def test_quantization_bit_packing_recovers_every_level_exactly(bits):
    levels = np.random.default_rng(bits).integers(0, 2**bits, size=2 * 8 + 3).astype(np.float32)
    levels[:2] = [0, 2**bits - 1]  # pin min = 0 and max = 2^b − 1, so the step is exactly 1
    spec = CompressionSpec("quantize", bits=bits, stochastic=False)
    assert np.array_equal(decompress(compress(levels, spec, _rng())), levels)


def test_quantization_packs_across_chunk_boundaries():
    dim = (1 << 20) + 13
    levels = np.random.default_rng(0).integers(0, 8, size=dim).astype(np.float32)
    levels[:2] = [0, 7]
    message = compress(levels, CompressionSpec("quantize", bits=3, stochastic=False), _rng())
    assert len(message) == HEADER + 9 + math.ceil(dim * 3 / 8)
    assert np.array_equal(decompress(message), levels)


def test_quantizing_a_constant_vector_returns_it():
    v = np.full(9, 2.5, dtype=np.float32)
    assert np.array_equal(compress_roundtrip(v, CompressionSpec("quantize", bits=4), _rng())[0], v)


def test_scaled_randk_is_unbiased():
    v = _vector(20, seed=3)
    spec, rng, draws = CompressionSpec("randk", fraction=0.25), _rng(2), 4000
    samples = np.array([compress_roundtrip(v, spec, rng)[0] for _ in range(draws)], dtype=np.float64)
    assert np.count_nonzero(samples, axis=1).max() == 5
    # Each coordinate is (d/k)·v with probability k/d, else 0: variance v²(d/k − 1); allow 5σ of the mean.
    tolerance = 5 * np.abs(v) * math.sqrt((20 / 5 - 1) / draws) + 1e-6
    assert np.all(np.abs(samples.mean(axis=0) - v) <= tolerance)


def test_unscaled_randk_sends_the_exact_values_it_keeps():
    v = _vector(500)
    decoded = decompress(compress(v, CompressionSpec("randk", fraction=0.1, unbiased=False), _rng()))
    kept = np.flatnonzero(decoded)
    assert kept.size == 50
    assert np.array_equal(decoded[kept], v[kept])


def test_sign_decodes_to_the_mean_magnitude_times_the_sign_with_zero_as_plus():
    v = np.array([3.0, -1.0, 0.0, 0.5, -0.25, 2.0, -7.0, 1.0, -0.5], dtype=np.float32)
    decoded = decompress(compress(v, CompressionSpec("sign"), _rng()))
    scale = np.float32(np.abs(v).mean())
    assert np.array_equal(decoded, np.where(v >= 0, scale, -scale))


def test_random_mask_is_shared_by_every_client_of_a_round_and_sends_only_values():
    spec, dim, seed = CompressionSpec("random_mask", fraction=0.05), 2000, 1234
    mask = shared_mask_indices(dim, spec.fraction, seed)
    assert mask.size == keep_count(dim, spec.fraction) == 100
    assert np.array_equal(mask, np.unique(mask))
    for client in range(2):
        message = compress(_vector(dim, seed=client), spec, _rng(client), shared_seed=seed)
        assert len(message) - (HEADER + 4) == 4 * mask.size
        assert np.array_equal(np.flatnonzero(decompress(message, shared_seed=seed)), mask)
    assert not np.array_equal(shared_mask_indices(dim, spec.fraction, seed + 1), mask)


def test_random_mask_needs_the_shared_seed():
    with pytest.raises(ValueError, match="shared_seed"):
        compress(_vector(10), CompressionSpec("random_mask", fraction=0.5), _rng())


@pytest.mark.parametrize(("dim", "width"), [(200, 1), (10_000, 2), (100_000, 4)])
def test_topk_message_size_is_header_count_and_k_index_value_pairs(dim, width):
    k = keep_count(dim, 0.01)
    assert len(compress(_vector(dim), CompressionSpec("topk", fraction=0.01), _rng())) == HEADER + 4 + k * (width + 4)


def test_topk_of_one_percent_of_ten_thousand_takes_609_bytes():
    assert len(compress(_vector(10_000), CompressionSpec("topk", fraction=0.01), _rng())) == 9 + 100 * (2 + 4)


@pytest.mark.parametrize(("spec", "expected"), [
    (CompressionSpec("none"), HEADER + 4 * 1001),
    (CompressionSpec("topk", fraction=0.01), HEADER + 4 + 11 * (2 + 4)),
    (CompressionSpec("randk", fraction=0.01), HEADER + 4 + 8 + 4 * 11),
    (CompressionSpec("random_mask", fraction=0.01), HEADER + 4 + 4 * 11),
    (CompressionSpec("quantize", bits=4), HEADER + 1 + 8 + math.ceil(1001 * 4 / 8)),
    (CompressionSpec("quantize", bits=5), HEADER + 1 + 8 + math.ceil(1001 * 5 / 8)),
    (CompressionSpec("sign"), HEADER + 4 + math.ceil(1001 / 8)),
])
def test_message_sizes_follow_the_documented_formulas(spec, expected):
    v = _vector(1001)
    message = compress(v, spec, _rng(), shared_seed=7)
    assert len(message) == expected
    assert compress_roundtrip(v, spec, _rng(), shared_seed=7)[1] == expected


def test_dense_bytes_is_the_size_of_the_uncompressed_message():
    assert dense_bytes(1001) == len(compress(_vector(1001), CompressionSpec("none"), _rng())) == 5 + 4004


@pytest.mark.parametrize("spec", [CompressionSpec("randk", fraction=0.1), CompressionSpec("quantize", bits=3)])
def test_compression_is_deterministic_for_a_seeded_rng(spec):
    v = _vector(300)
    assert compress(v, spec, _rng(5)) == compress(v, spec, _rng(5))
    assert compress(v, spec, _rng(5)) != compress(v, spec, _rng(6))


@pytest.mark.parametrize("spec", [
    CompressionSpec("topk", fraction=0.05),
    CompressionSpec("sign"),
    CompressionSpec("quantize", bits=4),
    CompressionSpec("randk", fraction=0.1, unbiased=False),
])
def test_error_feedback_loses_nothing_over_rounds(spec):
    rng, residual = _rng(9), None
    deltas = [_vector(1000, seed=round_ + 100) for round_ in range(30)]
    transmitted = np.zeros(1000, dtype=np.float64)
    for delta in deltas:
        sent, residual, nbytes = compress_with_feedback(delta, residual, spec, rng)
        assert sent.dtype == residual.dtype == np.float32
        assert nbytes < dense_bytes(1000)
        transmitted += sent
    assert np.allclose(transmitted + residual, np.sum(deltas, axis=0, dtype=np.float64), atol=1e-4)


def test_error_feedback_returns_what_the_codec_sends_and_the_remainder():
    delta, residual = _vector(100), _vector(100, seed=1)
    spec = CompressionSpec("topk", fraction=0.1)
    sent, new_residual, nbytes = compress_with_feedback(delta, residual, spec, _rng())
    expected, expected_bytes = compress_roundtrip(delta + residual, spec, _rng())
    assert np.array_equal(sent, expected) and nbytes == expected_bytes
    assert np.array_equal(new_residual, (delta + residual) - expected)


def test_error_feedback_refuses_scaled_random_sparsification():
    with pytest.raises(ScenarioError, match="compression.unbiased"):
        compress_with_feedback(_vector(10), None, CompressionSpec("randk", fraction=0.5), _rng())


@pytest.mark.parametrize(("fields", "field"), [
    ({"kind": "gzip"}, "compression.kind"),
    ({"kind": "topk", "fraction": 0.0}, "compression.fraction"),
    ({"kind": "topk", "fraction": 1.5}, "compression.fraction"),
    ({"kind": "randk", "fraction": float("nan")}, "compression.fraction"),
    ({"kind": "quantize", "bits": 0}, "compression.bits"),
    ({"kind": "quantize", "bits": 17}, "compression.bits"),
    ({"kind": "quantize", "stochastic": "yes"}, "compression.stochastic"),
])
def test_bad_specs_are_rejected_naming_the_field(fields, field):
    with pytest.raises(ScenarioError, match=field):
        CompressionSpec(**fields)


def test_bits_message_names_the_range():
    with pytest.raises(ScenarioError, match=r"compression\.bits: must be in 1\.\.16 \(got 0\)"):
        CompressionSpec("quantize", bits=0)


def test_truncated_messages_are_rejected():
    message = compress(_vector(50), CompressionSpec("sign"), _rng())
    with pytest.raises(ValueError, match="decompress"):
        decompress(message[:-1])
    with pytest.raises(ValueError, match="decompress"):
        decompress(message[:6])


def test_lossy_kinds_refuse_non_finite_vectors():
    v = _vector(10)
    v[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        compress(v, CompressionSpec("topk", fraction=0.5), _rng())
