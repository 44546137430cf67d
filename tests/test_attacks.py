"""Simulated attacks: the malicious set, model poisoning (sign flip, boosting, Gaussian) and data
poisoning (label flipping, BadNets-style backdoors)."""

import numpy as np
import pytest

from raysim.adversary import (
    add_trigger,
    backdoor_data,
    backdoor_test_set,
    flip_labels,
    gaussian_noise,
    is_malicious,
    malicious_clients,
    poison_update,
    scale_update,
    sign_flip,
)
from raysim.errors import ScenarioError

DELTA = np.array([1.0, -2.0, 0.5, 0.0], dtype=np.float32)


def test_malicious_set_is_deterministic_under_the_seed_and_changes_with_it():
    a = malicious_clients(7, 1000, 0.1)
    np.testing.assert_array_equal(a, malicious_clients(7, 1000, 0.1))
    assert not np.array_equal(a, malicious_clients(8, 1000, 0.1))


@pytest.mark.parametrize("num_clients,fraction", [(1000, 0.1), (10, 0.15), (7, 0.0), (1_000_000, 0.001)])
def test_malicious_set_is_sorted_unique_in_range_and_round_fraction_n_large(num_clients, fraction):
    ids = malicious_clients(3, num_clients, fraction)
    assert ids.dtype == np.int64
    assert ids.size == round(fraction * num_clients)
    assert (np.diff(ids) > 0).all()
    assert ids.size == 0 or (ids.min() >= 0 and ids.max() < num_clients)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_malicious_fraction_outside_zero_to_one_is_refused(fraction):
    with pytest.raises(ScenarioError, match="adversary.fraction"):
        malicious_clients(0, 100, fraction)


def test_is_malicious_marks_exactly_the_members():
    mask = is_malicious(np.array([9, 0, 2, 3, 5, 11]), np.array([2, 5, 9]))
    np.testing.assert_array_equal(mask, [True, False, True, False, True, False])
    np.testing.assert_array_equal(is_malicious(np.arange(3), np.array([], dtype=np.int64)), [False] * 3)


def test_sign_flip_is_minus_scale_times_delta():
    np.testing.assert_array_equal(sign_flip(DELTA), -DELTA)
    np.testing.assert_array_equal(sign_flip(DELTA, 3.0), np.array([-3.0, 6.0, -1.5, 0.0], dtype=np.float32))


def test_scaling_boosts_delta_by_the_factor():
    out = scale_update(DELTA, 10.0)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.array([10.0, -20.0, 5.0, 0.0], dtype=np.float32))


def test_gaussian_attack_replaces_the_delta_with_seeded_noise_of_the_given_std():
    delta = np.full(200_000, 1e3, dtype=np.float32)
    out = gaussian_noise(delta, 2.0, np.random.default_rng(5))
    assert out.dtype == np.float32 and out.shape == delta.shape
    assert abs(out.mean()) < 0.05 and out.std() == pytest.approx(2.0, rel=0.01)
    np.testing.assert_array_equal(out, gaussian_noise(delta, 2.0, np.random.default_rng(5)))


def test_poison_update_dispatches_to_each_attack():
    rng = np.random.default_rng(0)
    flipped = poison_update(DELTA, "sign_flip", rng, scale=2.0, noise_std=1.0)
    np.testing.assert_array_equal(flipped, sign_flip(DELTA, 2.0))
    boosted = poison_update(DELTA, "scaling", rng, scale=5.0, noise_std=1.0)
    np.testing.assert_array_equal(boosted, scale_update(DELTA, 5.0))
    np.testing.assert_array_equal(
        poison_update(DELTA, "noise", np.random.default_rng(4), scale=1.0, noise_std=0.5),
        gaussian_noise(DELTA, 0.5, np.random.default_rng(4)),
    )


@pytest.mark.parametrize(
    "attack,scale,noise_std,field",
    [("gradient_ascent", 1.0, 1.0, "adversary.attack"), ("scaling", 0.0, 1.0, "adversary.scale"),
     ("sign_flip", float("inf"), 1.0, "adversary.scale"), ("noise", 1.0, -1.0, "adversary.noise_std")],
)
def test_poison_update_refuses_bad_settings_by_field(attack, scale, noise_std, field):
    with pytest.raises(ScenarioError, match=field):
        poison_update(DELTA, attack, np.random.default_rng(0), scale=scale, noise_std=noise_std)


def test_label_flip_maps_c_to_num_classes_minus_one_minus_c_and_is_an_involution():
    y = np.arange(10, dtype=np.int64)
    flipped = flip_labels(y, 10)
    np.testing.assert_array_equal(flipped, np.arange(9, -1, -1))
    assert flipped.dtype == y.dtype
    np.testing.assert_array_equal(flip_labels(flipped, 10), y)
    labels = np.random.default_rng(0).integers(0, 7, size=500)
    out = flip_labels(labels, 7)
    assert out.min() >= 0 and out.max() < 7
    np.testing.assert_array_equal(flip_labels(out, 7), labels)


def test_label_flip_refuses_labels_outside_the_classes():
    with pytest.raises(ScenarioError, match="data.num_classes"):
        flip_labels(np.array([0, 3]), 3)


def test_trigger_on_tabular_rows_sets_exactly_the_last_features():
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    before = x.copy()
    out = add_trigger(x, 2, 9.0)
    np.testing.assert_array_equal(out[:, -2:], 9.0)
    np.testing.assert_array_equal(out[:, :-2], x[:, :-2])
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("shape", [(3, 8, 8), (3, 2, 8, 8)])
def test_trigger_on_images_sets_exactly_the_bottom_right_square_in_every_channel(shape):
    x = np.zeros(shape, dtype=np.float32)
    out = add_trigger(x, 3, 1.0)
    expected = np.zeros(shape, dtype=np.float32)
    expected[..., 5:, 5:] = 1.0
    np.testing.assert_array_equal(out, expected)
    assert out.sum() == shape[0] * (shape[1] if len(shape) == 4 else 1) * 9
    assert not x.any()


@pytest.mark.parametrize("size", [0, 9])
def test_trigger_larger_than_the_input_is_refused(size):
    with pytest.raises(ScenarioError, match="adversary.trigger_size"):
        add_trigger(np.zeros((2, 8, 8)), size, 1.0)


def _client_data(n=50):
    rng = np.random.default_rng(11)
    return rng.normal(size=(n, 10)).astype(np.float32), rng.integers(0, 5, size=n)


def test_backdoor_data_poisons_exactly_round_fraction_n_samples_and_relabels_them():
    x, y = _client_data()
    x_before, y_before = x.copy(), y.copy()
    xp, yp = backdoor_data(x, y, target_label=4, trigger_size=3, value=5.0, poison_fraction=0.3,
                           rng=np.random.default_rng(2))
    poisoned = (xp != x).any(axis=1)
    assert poisoned.sum() == round(0.3 * 50)
    np.testing.assert_array_equal(xp[poisoned], add_trigger(x[poisoned], 3, 5.0))
    np.testing.assert_array_equal(yp[poisoned], 4)
    np.testing.assert_array_equal(yp[~poisoned], y[~poisoned])
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(y, y_before)


def test_backdoor_data_is_deterministic_under_the_rng_seed():
    x, y = _client_data()
    kwargs = dict(target_label=0, trigger_size=2, value=3.0, poison_fraction=0.2)
    a = backdoor_data(x, y, rng=np.random.default_rng(9), **kwargs)
    b = backdoor_data(x, y, rng=np.random.default_rng(9), **kwargs)
    c = backdoor_data(x, y, rng=np.random.default_rng(10), **kwargs)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize(
    "kwargs,field",
    [(dict(poison_fraction=1.5), "adversary.poison_fraction"), (dict(target_label=-1), "adversary.target_label"),
     (dict(target_label=5, num_classes=5), "adversary.target_label")],
)
def test_backdoor_data_refuses_bad_settings_by_field(kwargs, field):
    x, y = _client_data()
    settings = dict(target_label=0, trigger_size=2, value=1.0, poison_fraction=0.1) | kwargs
    with pytest.raises(ScenarioError, match=field):
        backdoor_data(x, y, rng=np.random.default_rng(0), **settings)


def test_backdoor_test_set_triggers_every_non_target_sample_and_labels_it_target():
    x, y = _client_data()
    xb, yb = backdoor_test_set(x, y, target_label=2, trigger_size=4, value=-1.0)
    keep = y != 2
    assert xb.shape[0] == keep.sum() < len(y)
    np.testing.assert_array_equal(xb, add_trigger(x[keep], 4, -1.0))
    np.testing.assert_array_equal(yb, 2)
    assert yb.dtype == y.dtype
