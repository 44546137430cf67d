"""Simulated adversaries: which clients are malicious, and how they poison their updates or their data.

The package owns the attacks only; the defences (robust aggregation, norm bounding) live in
``raysim.strategies.robust``. Nothing here imports Ray.
"""

from raysim.adversary.attacks import (
    ATTACKS,
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

__all__ = [
    "ATTACKS",
    "add_trigger",
    "backdoor_data",
    "backdoor_test_set",
    "flip_labels",
    "gaussian_noise",
    "is_malicious",
    "malicious_clients",
    "poison_update",
    "scale_update",
    "sign_flip",
]
