"""Byzantine-robust aggregation: median and trimmed mean (Yin et al. 2018), Krum and Multi-Krum
(Blanchard et al. 2017; El Mhamdi et al. 2018) and norm bounding (Sun et al. 2019)."""

import numpy as np
import pytest

from raysim.errors import ScenarioError
from raysim.strategies import robust
from raysim.strategies.robust import (
    check_krum,
    coordinate_median,
    krum,
    krum_scores,
    norm_bound,
    pairwise_sq_distances,
    robust_aggregate,
    trimmed_mean,
)

# Four honest rows and one outlier. Pairwise squared distances, worked by hand:
#   d(0,1)=6  d(0,2)=11  d(0,3)=11  d(1,2)=9  d(1,3)=17  d(2,3)=36
#   d(4,0)=10254  d(4,1)=9940  d(4,2)=9677  d(4,3)=10389
ROWS = np.array(
    [[1, 2, 3], [2, 0, 4], [0, 1, 6], [4, 3, 2], [20, -20, 100]], dtype=np.float32
)


def test_coordinate_median_of_odd_rows_is_the_middle_value():
    # x: 0 1 [2] 4 20   y: -20 0 [1] 2 3   z: 2 3 [4] 6 100
    np.testing.assert_array_equal(coordinate_median(ROWS), np.array([2, 1, 4], dtype=np.float32))


def test_coordinate_median_of_even_rows_averages_the_two_middle_values():
    # first four rows — x: 0 [1 2] 4   y: 0 [1 2] 3   z: 2 [3 4] 6
    out = coordinate_median(ROWS[:4])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.array([1.5, 1.5, 3.5], dtype=np.float32))


def test_trimmed_mean_drops_floor_beta_n_from_each_end():
    # β = 0.2, n = 5 → drop 1 per end: x (1+2+4)/3, y (0+1+2)/3, z (3+4+6)/3
    np.testing.assert_allclose(trimmed_mean(ROWS, 0.2), [7 / 3, 1.0, 13 / 3], rtol=1e-6)


def test_trimmed_mean_with_beta_zero_is_the_plain_mean():
    np.testing.assert_allclose(trimmed_mean(ROWS, 0.0), ROWS.astype(np.float64).mean(axis=0), rtol=1e-6)


@pytest.mark.parametrize("beta", [-0.1, 0.5, 0.7])
def test_trimmed_mean_refuses_a_fraction_outside_zero_to_half(beta):
    with pytest.raises(ScenarioError, match="aggregation.trim_fraction"):
        trimmed_mean(ROWS, beta)


def test_krum_scores_sum_the_n_minus_f_minus_2_nearest_squared_distances():
    # f = 1: each row sums its 2 nearest neighbours
    np.testing.assert_array_equal(krum_scores(ROWS, 1), [6 + 11, 6 + 9, 9 + 11, 11 + 17, 9677 + 9940])


def test_krum_selects_the_lowest_score_row():
    aggregate, selected = krum(ROWS, f=1)
    np.testing.assert_array_equal(selected, [1])
    np.testing.assert_array_equal(aggregate, ROWS[1])


def test_multikrum_averages_the_m_lowest_score_rows():
    aggregate, selected = krum(ROWS, f=1, m=3)  # scores 17, 15, 20, 28, … → rows 1, 0, 2
    np.testing.assert_array_equal(selected, [0, 1, 2])
    np.testing.assert_allclose(aggregate, [1.0, 1.0, 13 / 3], rtol=1e-6)


def test_krum_breaks_score_ties_toward_the_lower_index():
    rows = np.array([[1], [-1], [5], [-5], [100]], dtype=np.float32)  # rows 0 and 1 both score 4 + 16
    assert krum_scores(rows, 1)[0] == krum_scores(rows, 1)[1]
    _, selected = krum(rows, f=1)
    np.testing.assert_array_equal(selected, [0])


@pytest.mark.parametrize("n,f", [(4, 1), (6, 2), (2, 0)])
def test_krum_refuses_rounds_with_n_at_most_2f_plus_2(n, f):
    with pytest.raises(ScenarioError, match=rf"aggregation.byzantine: .*n={n}, f={f}"):
        check_krum(n, f)
    with pytest.raises(ScenarioError, match="aggregation.byzantine"):
        krum(np.zeros((n, 3), dtype=np.float32), f)


def test_multikrum_refuses_m_above_n_minus_f():
    with pytest.raises(ScenarioError, match="aggregation.multikrum"):
        krum(ROWS, f=1, m=5)


def test_pairwise_distances_in_blocks_match_the_direct_difference(monkeypatch):
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(7, 100)).astype(np.float32)
    direct = ((rows[:, None, :].astype(np.float64) - rows[None, :, :]) ** 2).sum(axis=2)
    monkeypatch.setattr(robust, "_GRAM_BLOCK_BYTES", 8 * 7 * 13)  # 13 coordinates per block
    np.testing.assert_allclose(pairwise_sq_distances(rows), direct, rtol=1e-9, atol=1e-9)


def test_pairwise_distances_of_identical_large_rows_are_never_negative():
    rows = np.full((5, 1000), 1e4, dtype=np.float32) + np.float32(1e-3) * np.arange(5, dtype=np.float32)[:, None]
    dist = pairwise_sq_distances(rows)
    assert (dist >= 0).all() and np.isfinite(dist).all()


def test_norm_bound_clips_long_rows_to_exactly_the_bound_and_keeps_short_ones():
    rows = np.array([[3, 4], [0.3, 0.4], [0, 0]], dtype=np.float32)
    before = rows.copy()
    out, clipped = norm_bound(rows, 1.0)
    assert clipped == 1
    np.testing.assert_allclose(out[0], [0.6, 0.8], rtol=1e-6)
    assert np.linalg.norm(out[0]) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_array_equal(out[1:], rows[1:])
    np.testing.assert_array_equal(rows, before)


def test_norm_bound_refuses_a_non_positive_bound():
    with pytest.raises(ScenarioError, match="aggregation.norm_bound"):
        norm_bound(ROWS, 0.0)


def test_mean_rule_is_the_weighted_mean():
    aggregate, info = robust_aggregate(ROWS[:4], np.array([1, 2, 3, 4]), "mean")
    # (1·[1,2,3] + 2·[2,0,4] + 3·[0,1,6] + 4·[4,3,2]) / 10 = [21, 17, 37] / 10
    np.testing.assert_allclose(aggregate, [2.1, 1.7, 3.7], rtol=1e-6)
    assert aggregate.dtype == np.float32 and info == {}


def test_robust_aggregate_dispatches_each_rule_and_reports_small_metrics():
    weights = np.ones(5)
    out, info = robust_aggregate(ROWS, weights, "median")
    np.testing.assert_array_equal(out, coordinate_median(ROWS))
    assert info == {}
    out, info = robust_aggregate(ROWS, weights, "trimmed_mean", trim_fraction=0.2)
    np.testing.assert_array_equal(out, trimmed_mean(ROWS, 0.2))
    assert info == {"robust_trimmed": 1}
    out, info = robust_aggregate(ROWS, weights, "krum", byzantine=1, multikrum=3)
    np.testing.assert_array_equal(out, ROWS[1])
    assert info == {"robust_selected": 1, "krum_selected": [1]}
    out, info = robust_aggregate(ROWS, weights, "multikrum", byzantine=1, multikrum=3)
    assert info == {"robust_selected": 3, "krum_selected": [0, 1, 2]}


def test_robust_aggregate_refuses_an_unknown_rule():
    with pytest.raises(ScenarioError, match="aggregation.rule"):
        robust_aggregate(ROWS, np.ones(5), "geomed")


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum", "multikrum"])
def test_robust_rules_resist_one_huge_outlier_that_moves_the_mean(rule):
    rng = np.random.default_rng(1)
    center = np.linspace(-1, 1, 20)
    rows = (center + 0.05 * rng.normal(size=(10, 20))).astype(np.float32)
    rows[3] = 1e6
    weights = np.ones(10)
    robust_out, _ = robust_aggregate(rows, weights, rule, trim_fraction=0.1, byzantine=1, multikrum=5)
    mean_out, _ = robust_aggregate(rows, weights, "mean")
    assert np.abs(robust_out - center).max() < 0.2
    assert np.abs(mean_out - center).max() > 1e4
