"""From a scenario to the he backend's run-level parameters: the largest cohort a sum holds and the update's words.

The key pair is made once per run, so its parameters must hold every round's sum: the largest cohort
(a round's sampled clients, or FedBuff's buffer) and the longest vector a client encrypts.
"""

from __future__ import annotations

from raysim.compression.codec import keep_count
from raysim.config import Scenario, oversample_count
from raysim.privacy.he.params import HEParams, choose_params


def largest_cohort(scenario: Scenario) -> int:
    """The most clients one secure sum can hold in ``scenario``."""
    if scenario.asynchronous is not None:
        return scenario.asynchronous.buffer_size
    cohort = scenario.max_clients_per_round
    if scenario.over_selected:
        cohort = oversample_count(cohort, scenario.system.over_selection, scenario.num_clients)
    return cohort


def update_words(scenario: Scenario, dim: int) -> int:
    """The values one client encrypts: its update (the shared mask's k coordinates of it), SCAFFOLD's Δc, and
    the weight, which DP-FedAvg's fixed denominator leaves out."""
    words = dim if scenario.compression is None or scenario.compression.kind != "random_mask" \
        else keep_count(dim, scenario.compression.fraction)
    if scenario.strategy.name == "scaffold":
        words += dim
    user_level_dp = scenario.privacy is not None and scenario.privacy.mechanism in ("central", "distributed")
    return words + (0 if user_level_dp else 1)


def run_params(scenario: Scenario, dim: int) -> tuple[HEParams, int]:
    """The run's encryption parameters and the words per update (ScenarioError naming the field to change)."""
    words = update_words(scenario, dim)
    return choose_params(scenario.secure_aggregation, largest_cohort(scenario), words), words
