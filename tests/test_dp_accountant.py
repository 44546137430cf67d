"""Specifications of privacy accounting: Opacus's published vectors through PrivacyAccountant, state, budgets, errors."""

from __future__ import annotations

import math
import pickle

import pytest
from opacus.accountants import RDPAccountant

from raysim.errors import ScenarioError
from raysim.privacy.dp.accountant import PrivacyAccountant, check_budget, noise_for_target_epsilon


def test_rdp_report_reproduces_opacus_vector():
    accountant = PrivacyAccountant("rdp", 1e-5)
    accountant.step(1.5, 0.04, steps=2250)
    report = accountant.report()
    assert report == {
        "accountant": "rdp",
        "delta": 1e-5,
        "epsilon": pytest.approx(7.32911117143, abs=1e-10),
        "steps": 2250,
        "z": 1.5,
        "q": 0.04,
    }


def test_prv_report_reproduces_opacus_vector():
    accountant = PrivacyAccountant("prv", 1e-5)
    accountant.step(1.5, 0.04, steps=2249)
    # PRV's ε comes out of an FFT; its ninth digit moves between scipy builds (6.7773957100708 with
    # scipy 1.17.1), so the published value holds to 1e-8, far inside the accountant's eps_error of 0.01.
    assert accountant.report()["epsilon"] == pytest.approx(6.777395712150674, abs=1e-8)


def test_state_dict_resumes_the_history_after_pickling():
    accountant = PrivacyAccountant("rdp", 1e-5)
    accountant.step(1.5, 0.04, steps=1000)
    resumed = PrivacyAccountant("rdp", 1e-5)
    resumed.load_state_dict(pickle.loads(pickle.dumps(accountant.state_dict())))
    resumed.step(1.5, 0.04, steps=1250)
    assert resumed.steps == 2250
    assert resumed.epsilon() == pytest.approx(7.32911117143, abs=1e-10)


def test_rdp_epsilon_is_bit_identical_to_opacus_for_a_mixed_history():
    ours, theirs = PrivacyAccountant("rdp", 1e-6), RDPAccountant()
    for z, q, n in [(1.1, 0.01, 300), (0.9, 0.02, 40), (1.1, 0.01, 5)]:
        ours.step(z, q, steps=n)
        for _ in range(n):
            theirs.step(noise_multiplier=z, sample_rate=q)
        assert ours.epsilon() == theirs.get_epsilon(1e-6)


def test_epsilon_is_zero_before_any_step_and_infinite_without_noise():
    accountant = PrivacyAccountant("rdp", 1e-5)
    assert accountant.epsilon() == 0.0
    assert accountant.report()["z"] is None
    accountant.step(0.0, 0.1)
    assert accountant.epsilon() == math.inf


def test_a_history_cannot_resume_an_accountant_of_another_kind():
    rdp = PrivacyAccountant("rdp", 1e-5)
    rdp.step(1.0, 0.1)
    with pytest.raises(ScenarioError, match="privacy.accountant"):
        PrivacyAccountant("prv", 1e-5).load_state_dict(rdp.state_dict())


def test_noise_for_target_epsilon_meets_the_budget():
    z = noise_for_target_epsilon(8.0, 0.04, 2250, 1e-5, "rdp")
    accountant = PrivacyAccountant("rdp", 1e-5)
    accountant.step(z, 0.04, steps=2250)
    assert 8.0 - 0.01 <= accountant.epsilon() <= 8.0


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_unreachable_budget_names_target_epsilon():
    with pytest.raises(ScenarioError, match="privacy.target_epsilon"):
        noise_for_target_epsilon(1e-9, 1.0, 10_000, 1e-5, "rdp")


def test_budget_check_looks_ahead_without_stepping():
    accountant = PrivacyAccountant("rdp", 1e-5)
    accountant.step(1.0, 0.01, steps=100)
    before = accountant.state_dict()
    next_epsilon = accountant.epsilon_after(1.0, 0.01)
    allowed = check_budget(accountant, target_epsilon=next_epsilon, noise_multiplier=1.0, sample_rate=0.01)
    refused = check_budget(accountant, target_epsilon=next_epsilon * 0.999, noise_multiplier=1.0, sample_rate=0.01)
    assert allowed.allowed and not refused.allowed
    assert "privacy.target_epsilon" in refused.message
    assert accountant.state_dict() == before
    accountant.step(1.0, 0.01)
    assert accountant.epsilon() == next_epsilon


@pytest.mark.parametrize("delta", [1.0, 1.5, 0.0, -1e-5])
def test_delta_outside_the_open_unit_interval_is_rejected(delta):
    with pytest.raises(ScenarioError, match="privacy.delta"):
        PrivacyAccountant("rdp", delta)
    with pytest.raises(ScenarioError, match="privacy.delta"):
        noise_for_target_epsilon(1.0, 0.1, 10, delta)


@pytest.mark.parametrize("epsilon", [0.0, -1.0])
def test_non_positive_target_epsilon_is_rejected(epsilon):
    with pytest.raises(ScenarioError, match="privacy.target_epsilon"):
        noise_for_target_epsilon(epsilon, 0.1, 10, 1e-5)
    with pytest.raises(ScenarioError, match="privacy.target_epsilon"):
        check_budget(PrivacyAccountant("rdp", 1e-5), target_epsilon=epsilon, noise_multiplier=1.0, sample_rate=0.1)


def test_negative_noise_multiplier_is_rejected():
    with pytest.raises(ScenarioError, match="privacy.noise_multiplier"):
        PrivacyAccountant("rdp", 1e-5).step(-0.1, 0.1)


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.01])
def test_sampling_rate_outside_zero_one_is_rejected(rate):
    with pytest.raises(ScenarioError, match="sampling.rate"):
        PrivacyAccountant("rdp", 1e-5).step(1.0, rate)
    with pytest.raises(ScenarioError, match="sampling.rate"):
        noise_for_target_epsilon(1.0, rate, 10, 1e-5)


def test_full_participation_is_a_valid_rate():
    accountant = PrivacyAccountant("rdp", 1e-5)
    accountant.step(1.0, 1.0)
    assert 0 < accountant.epsilon() < math.inf


def test_unknown_accountant_is_rejected():
    with pytest.raises(ScenarioError, match="privacy.accountant"):
        PrivacyAccountant("gdp", 1e-5)
