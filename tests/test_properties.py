"""Property tests (hypothesis) of the partitioners and the compression codecs: pure numpy, no Ray.

Every property runs a fixed, derandomized set of examples, so CI is deterministic and the whole file
takes a few seconds.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from raysim.compression.codec import (
    CompressionSpec,
    compress,
    decompress,
    dense_bytes,
    keep_count,
    shared_mask_indices,
)
from raysim.compression.error_feedback import compress_with_feedback
from raysim.data import partition
from raysim.errors import ScenarioError

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

seeds = st.integers(0, 2**32 - 1)


# --------------------------------------------------------------------------------------------------
# Partitions
# --------------------------------------------------------------------------------------------------


@st.composite
def label_arrays(draw, max_samples: int = 1500, max_classes: int = 12) -> np.ndarray:
    """Labels 0..C−1 (some classes possibly absent), as the data layer hands them over."""
    num_classes = draw(st.integers(1, max_classes))
    size = draw(st.integers(1, max_samples))
    rng = np.random.default_rng(draw(seeds))
    skew = rng.dirichlet(np.full(num_classes, draw(st.sampled_from([0.1, 1.0, 100.0]))))
    return rng.choice(num_classes, size=size, p=skew).astype(np.int64)


def assert_csr(p: partition.Partition, num_clients: int) -> None:
    """The CSR layout: int64 arrays, num_clients + 1 offsets from 0 to len(indices), never decreasing."""
    assert p.indices.dtype == np.int64 and p.offsets.dtype == np.int64
    assert p.offsets.shape == (num_clients + 1,) and p.num_clients == num_clients
    assert p.offsets[0] == 0 and p.offsets[-1] == p.indices.size
    assert np.all(np.diff(p.offsets) >= 0)
    np.testing.assert_array_equal(p.sizes(), np.diff(p.offsets))


def assert_disjoint_cover(p: partition.Partition, num_samples: int) -> None:
    """Every sample index appears in exactly one client."""
    assert p.indices.size == num_samples
    np.testing.assert_array_equal(np.sort(p.indices), np.arange(num_samples))


def assert_same(a: partition.Partition, b: partition.Partition) -> None:
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.offsets, b.offsets)


@PROPERTY
@given(num_samples=st.integers(1, 5000), num_clients=st.integers(1, 400), seed=seeds)
def test_iid_is_a_seeded_disjoint_cover_with_sizes_within_one(num_samples, num_clients, seed):
    p = partition.iid(num_samples, num_clients, seed=seed)
    assert_csr(p, num_clients)
    assert_disjoint_cover(p, num_samples)
    sizes = p.sizes()
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == num_samples
    assert_same(p, partition.iid(num_samples, num_clients, seed=seed))


@PROPERTY
@given(labels=label_arrays(), num_clients=st.integers(1, 60), alpha=st.sampled_from([1e-3, 0.1, 0.5, 1.0, 10.0, 1e4]),
       min_size=st.integers(0, 8), balance=st.booleans(), seed=seeds)
def test_dirichlet_is_a_seeded_disjoint_cover_that_respects_min_size(labels, num_clients, alpha, min_size, balance, seed):
    assume(num_clients * min_size <= labels.size)
    try:
        p = partition.dirichlet(labels, num_clients, alpha=alpha, seed=seed, min_size=min_size, balance=balance,
                                max_tries=20)
    except ScenarioError as err:  # allowed only as the documented redraw-budget failure
        assert str(err).startswith("partition.min_size: after 20 Dirichlet draws")
        assume(False)
    assert_csr(p, num_clients)
    assert_disjoint_cover(p, labels.size)
    assert p.sizes().min() >= min_size
    again = partition.dirichlet(labels, num_clients, alpha=alpha, seed=seed, min_size=min_size, balance=balance,
                                max_tries=20)
    assert_same(p, again)


@PROPERTY
@given(labels=label_arrays(), num_clients=st.integers(1, 60), alpha=st.sampled_from([1e-3, 0.5, 1e4]),
       balance=st.booleans(), seed=seeds)
def test_dirichlet_without_a_min_size_never_fails(labels, num_clients, alpha, balance, seed):
    p = partition.dirichlet(labels, num_clients, alpha=alpha, seed=seed, min_size=0, balance=balance, max_tries=1)
    assert_csr(p, num_clients)
    assert_disjoint_cover(p, labels.size)


@PROPERTY
@given(labels=label_arrays(), num_clients=st.integers(1, 80), spc=st.integers(1, 4), seed=seeds)
def test_shards_deal_each_client_its_shards_of_the_label_sorted_order(labels, num_clients, spc, seed):
    num_shards = num_clients * spc
    assume(num_shards <= labels.size)
    p = partition.shards(labels, num_clients, shards_per_client=spc, seed=seed)
    assert_csr(p, num_clients)
    assert_disjoint_cover(p, labels.size)
    # Shards are near-equal cuts of the label-sorted order, so a client holds spc of them.
    low, high = labels.size // num_shards, -(-labels.size // num_shards)
    sizes = p.sizes()
    assert np.all(sizes >= spc * low) and np.all(sizes <= spc * high)
    # Each client's samples form at most spc contiguous runs of the (stable) label-sorted order.
    rank = np.empty(labels.size, dtype=np.int64)
    rank[np.argsort(labels, kind="stable")] = np.arange(labels.size)
    for c in range(num_clients):
        positions = np.sort(rank[p.client_indices(c)])
        runs = 1 + int(np.count_nonzero(np.diff(positions) != 1))
        assert runs <= spc
    assert_same(p, partition.shards(labels, num_clients, shards_per_client=spc, seed=seed))


@PROPERTY
@given(keys=hnp.arrays(np.int64, st.integers(1, 600), elements=st.integers(-5, 40)), min_size=st.integers(0, 6))
def test_natural_gives_one_client_per_kept_key_in_sorted_order(keys, min_size):
    values, counts = np.unique(keys, return_counts=True)
    kept = values[counts >= min_size]
    assume(kept.size > 0)
    p = partition.natural(keys, min_size=min_size)
    assert_csr(p, kept.size)
    np.testing.assert_array_equal(np.sort(p.indices), np.flatnonzero(np.isin(keys, kept)))
    for c, key in enumerate(kept):
        own = p.client_indices(c)
        assert np.all(keys[own] == key)
        assert own.size == np.count_nonzero(keys == key) >= max(min_size, 1)
        assert np.all(np.diff(own) > 0)  # a client's samples keep their order


@PROPERTY
@given(labels=label_arrays(), num_clients=st.integers(1, 150), seed=seeds)
def test_summary_statistics_agree_with_the_partition(labels, num_clients, seed):
    p = partition.dirichlet(labels, num_clients, alpha=0.5, seed=seed, min_size=0)
    num_classes = int(labels.max()) + 1
    s = partition.summarize(p, labels, num_classes, max_listed=50, seed=seed)
    sizes = p.sizes()
    assert s["num_clients"] == num_clients and s["num_samples"] == labels.size
    assert s["sizes"]["min"] == sizes.min() and s["sizes"]["max"] == sizes.max()
    assert s["empty_clients"] == int(np.count_nonzero(sizes == 0))
    assert s["label_histogram"] == np.bincount(labels, minlength=num_classes).tolist()
    assert 0.0 <= s["mean_label_entropy"] <= 1.0 + 1e-9
    listed = s["listed_clients"]
    assert len(listed["ids"]) == min(num_clients, 50) and listed["ids"] == sorted(set(listed["ids"]))
    for cid, size, hist in zip(listed["ids"], listed["sizes"], listed["label_histograms"]):
        assert size == sizes[cid] == sum(hist)
        assert hist == np.bincount(labels[p.client_indices(cid)], minlength=num_classes).tolist()


# --------------------------------------------------------------------------------------------------
# Codecs
# --------------------------------------------------------------------------------------------------

_finite32 = st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)


@st.composite
def vectors(draw) -> np.ndarray:
    """Float32 update vectors: small adversarial ones (zeros, ties, signed zeros, subnormals) from
    hypothesis, and seeded Gaussian ones up to 70,000 coordinates (all three top-k index widths)."""
    if draw(st.booleans()):
        return draw(hnp.arrays(np.float32, st.integers(1, 300), elements=_finite32))
    dim = draw(st.one_of(st.integers(1, 300), st.integers(257, 5000), st.sampled_from([256, 257, 65536, 65537, 70000])))
    rng = np.random.default_rng(draw(seeds))
    v = rng.standard_normal(dim).astype(np.float32) * np.float32(draw(st.sampled_from([1e-4, 1.0, 1e3])))
    if draw(st.booleans()):  # many ties
        v = np.round(v, 0 if abs(v).max() > 10 else 1).astype(np.float32)
    return v


fractions = st.one_of(st.sampled_from([1e-6, 0.01, 0.07, 0.5, 1.0]), st.floats(1e-4, 1.0, exclude_min=False))


def _index_width(dim: int) -> int:
    return 1 if dim <= 2**8 else 2 if dim <= 2**16 else 4


def _header(message: bytes) -> tuple[int, int]:
    return struct.unpack_from("<BI", message)


@PROPERTY
@given(dim=st.integers(1, 10**7), fraction=fractions)
@example(dim=100, fraction=0.07)  # 7.000000000000001 coordinates: keeps 7
@example(dim=10_000, fraction=0.01)
@example(dim=3, fraction=1e-6)  # at least one
def test_keep_count_is_the_ceiling_clamped_to_one_and_dim(dim, fraction):
    """k = max(1, ceil(fraction · d)) clamped to d, where float noise of one part in 10^12 above an
    integer is forgiven (0.07 · 100 keeps 7, not 8)."""
    k, x = keep_count(dim, fraction), fraction * dim
    assert 1 <= k <= dim
    n = round(x)
    if abs(x - n) <= 0.5e-12 * x:
        allowed = {n}
    elif abs(x - n) >= 2e-12 * x:
        allowed = {math.ceil(x)}
    else:  # too close to the documented tolerance to call
        allowed = {n, math.ceil(x)}
    assert k in {min(dim, max(1, a)) for a in allowed}


@PROPERTY
@given(v=vectors())
def test_none_round_trips_exactly_in_5_plus_4d_bytes(v):
    message = compress(v, CompressionSpec("none"), np.random.default_rng(0))
    assert len(message) == 5 + 4 * v.size == dense_bytes(v.size)
    assert _header(message) == (0, v.size)
    np.testing.assert_array_equal(decompress(message), v)


@PROPERTY
@given(v=vectors(), fraction=fractions)
def test_topk_keeps_exactly_the_k_largest_magnitudes(v, fraction):
    dim, k = v.size, keep_count(v.size, fraction)
    message = compress(v, CompressionSpec("topk", fraction=fraction), np.random.default_rng(0))
    width = _index_width(dim)
    assert len(message) == 9 + k * (width + 4)
    assert _header(message) == (1, dim) and struct.unpack_from("<I", message, 5) == (k,)
    kept = np.frombuffer(message, dtype=f"<u{width}", count=k, offset=9).astype(np.int64)
    assert np.all(np.diff(kept) > 0) and kept.size == k  # k distinct indices, ascending
    magnitude = np.abs(v)
    dropped = np.setdiff1d(np.arange(dim), kept)
    if dropped.size:
        assert magnitude[kept].min() >= magnitude[dropped].max()
        # ties at the threshold go to the lower index
        threshold = magnitude[kept].min()
        if np.any(magnitude[dropped] == threshold):
            assert kept[magnitude[kept] == threshold].max() < dropped[magnitude[dropped] == threshold].min()
    out = decompress(message)
    expected = np.zeros(dim, np.float32)
    expected[kept] = v[kept]
    np.testing.assert_array_equal(out, expected)  # the kept values are exact, the rest zero


@PROPERTY
@given(v=vectors(), fraction=fractions, unbiased=st.booleans(), seed=seeds)
def test_randk_sends_k_values_and_a_seed_and_decodes_them_in_place(v, fraction, unbiased, seed):
    dim, k = v.size, keep_count(v.size, fraction)
    spec = CompressionSpec("randk", fraction=fraction, unbiased=unbiased)
    message = compress(v, spec, np.random.default_rng(seed))
    assert len(message) == 17 + 4 * k
    assert message == compress(v, spec, np.random.default_rng(seed))  # deterministic under the rng
    (index_seed,) = struct.unpack_from("<Q", message, 9)
    kept = np.sort(np.random.default_rng(index_seed).choice(dim, size=k, replace=False))
    scale = np.float32(dim / k) if unbiased else np.float32(1)
    expected = np.zeros(dim, np.float32)
    expected[kept] = v[kept] * scale
    np.testing.assert_array_equal(decompress(message), expected)


@PROPERTY
@given(v=vectors(), fraction=fractions, unbiased=st.booleans(), shared_seed=seeds, seed=seeds)
def test_random_mask_keeps_the_public_coordinates_whatever_the_client_rng(v, fraction, unbiased, shared_seed, seed):
    dim, k = v.size, keep_count(v.size, fraction)
    spec = CompressionSpec("random_mask", fraction=fraction, unbiased=unbiased)
    message = compress(v, spec, np.random.default_rng(seed), shared_seed=shared_seed)
    assert len(message) == 9 + 4 * k
    assert message == compress(v, spec, np.random.default_rng(seed + 1), shared_seed=shared_seed)
    kept = shared_mask_indices(dim, fraction, shared_seed)
    assert kept.size == k and np.all(np.diff(kept) > 0)
    expected = np.zeros(dim, np.float32)
    expected[kept] = v[kept] * (np.float32(dim / k) if unbiased else np.float32(1))
    np.testing.assert_array_equal(decompress(message, shared_seed=shared_seed), expected)


@PROPERTY
@given(v=vectors(), bits=st.integers(1, 16), stochastic=st.booleans(), seed=seeds)
def test_quantization_stays_within_its_step_in_14_plus_packed_bytes(v, bits, stochastic, seed):
    dim = v.size
    spec = CompressionSpec("quantize", bits=bits, stochastic=stochastic)
    message = compress(v, spec, np.random.default_rng(seed))
    assert len(message) == 14 + math.ceil(dim * bits / 8)
    assert message == compress(v, spec, np.random.default_rng(seed))
    out = decompress(message).astype(np.float64)
    low, high = float(v.min()), float(v.max())
    step = (high - low) / ((1 << bits) - 1)
    # nearest-level rounding errs by at most half a step, stochastic rounding by less than one step;
    # the slack covers float32 rounding of the decoded value
    bound = (step if stochastic else step / 2) * (1 + 1e-6) + 2 * np.finfo(np.float32).eps * max(abs(low), abs(high))
    assert np.all(np.abs(out - v) <= bound)
    slack = 2 * np.finfo(np.float32).eps * max(abs(low), abs(high))
    assert out.min() >= low - slack and out.max() <= high + slack


@PROPERTY
@given(v=vectors())
def test_sign_sends_one_bit_per_coordinate_and_the_mean_magnitude(v):
    dim = v.size
    message = compress(v, CompressionSpec("sign"), np.random.default_rng(0))
    assert len(message) == 9 + math.ceil(dim / 8)
    (scale,) = struct.unpack_from("<f", message, 5)
    assert scale == pytest.approx(float(np.abs(v.astype(np.float64)).mean()), rel=1e-6, abs=1e-45)
    np.testing.assert_array_equal(decompress(message), np.where(v >= 0, np.float32(scale), np.float32(-scale)))


@PROPERTY
@given(v=vectors(), kind=st.sampled_from(["topk", "randk", "random_mask", "sign", "quantize"]),
       fraction=fractions, bits=st.integers(1, 16), rounds=st.integers(1, 4), seed=seeds)
def test_error_feedback_loses_nothing(v, kind, fraction, bits, rounds, seed):
    """Σ sent + final residual = Σ updates (up to float32 rounding), for any contractive codec."""
    spec = CompressionSpec(kind, fraction=fraction, bits=bits, unbiased=False)
    rng = np.random.default_rng(seed)
    residual, sent_total, delta_total = None, np.zeros(v.size), np.zeros(v.size)
    for r in range(rounds):
        delta = v * np.float32(1 + r)
        sent, residual, nbytes = compress_with_feedback(delta, residual, spec, rng, shared_seed=seed)
        assert sent.dtype == residual.dtype == np.float32 and sent.shape == residual.shape == (v.size,)
        assert nbytes == len(compress(delta + 0, spec, np.random.default_rng(0), shared_seed=seed))
        sent_total += sent
        delta_total += delta
    scale = float(np.abs(delta_total).max()) + 1.0
    np.testing.assert_allclose(sent_total + residual, delta_total, rtol=0, atol=1e-5 * scale * rounds)
