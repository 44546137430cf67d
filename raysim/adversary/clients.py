"""The malicious clients of a run: who they are, and what they do to their data and their updates.

``MaliciousClients`` applies the ``adversary:`` block inside the worker that trains a client, so
an attack follows the client to whichever worker or node trains it: data attacks (label flipping,
a backdoor trigger) before local training, model attacks (sign flip, scaling, noise) on the update
after it. Every random choice comes from a generator keyed by (seed, round, client), so attacks
are deterministic under the seed.
"""

from __future__ import annotations

import numpy as np

from raysim.adversary.attacks import (backdoor_data, backdoor_test_set, flip_labels, is_malicious, malicious_clients,
                                      poison_update)
from raysim.config import AdversaryConfig
from raysim.errors import ScenarioError

_STREAM = 29
MODEL_ATTACKS = ("sign_flip", "scaling", "noise")


def check_labels(config: AdversaryConfig, num_classes: int, feature_shape: tuple[int, ...] | None = None) -> None:
    """The attack against the dataset's labels and shape, checked by the driver before any actor starts."""
    if config.attack == "backdoor" and feature_shape:
        room = feature_shape[-1] if len(feature_shape) == 1 else min(feature_shape[-2:])
        if config.trigger_size > room:
            raise ScenarioError(f"adversary.trigger_size: {config.trigger_size} does not fit samples of shape "
                                f"{tuple(feature_shape)}; use at most {room}")
    if config.attack in ("label_flip", "backdoor") and num_classes < 2:
        raise ScenarioError(f"adversary.attack: {config.attack} needs a classification task with labels")
    if config.attack == "backdoor" and config.target_label >= num_classes:
        raise ScenarioError(f"adversary.target_label: {config.target_label} is not a label of this dataset "
                            f"(0..{num_classes - 1}); pick one of them")


class MaliciousClients:
    """The seeded malicious set of a population and the attack its members run."""

    def __init__(self, config: AdversaryConfig, seed: int, num_clients: int, num_classes: int) -> None:
        check_labels(config, num_classes)
        self.config, self.seed, self.num_classes = config, seed, num_classes
        self.ids = malicious_clients(seed, num_clients, config.fraction)

    def contains(self, client_id: int) -> bool:
        return bool(is_malicious(np.asarray([client_id], dtype=np.int64), self.ids)[0])

    def _rng(self, round_index: int, client_id: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, round_index, client_id, _STREAM])

    def poison_data(self, x: np.ndarray, y: np.ndarray, round_index: int, client_id: int) -> tuple[np.ndarray, np.ndarray]:
        """A malicious client's training data under a data attack (unchanged under a model attack)."""
        config = self.config
        if config.attack == "label_flip":
            return x, flip_labels(y, self.num_classes)
        if config.attack == "backdoor":
            return backdoor_data(x, y, target_label=config.target_label, trigger_size=config.trigger_size,
                                 value=config.trigger_value, poison_fraction=config.poison_fraction,
                                 rng=self._rng(round_index, client_id))
        return x, y

    def poison_update(self, delta: np.ndarray, round_index: int, client_id: int) -> np.ndarray:
        """A malicious client's update under a model attack (unchanged under a data attack)."""
        config = self.config
        if config.attack not in MODEL_ATTACKS:
            return delta
        return poison_update(delta, config.attack, self._rng(round_index, client_id), scale=config.scale,
                             noise_std=config.noise_std)

    def backdoor_test(self, x_test: np.ndarray, y_test: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The triggered test samples (true label not the target), all labelled with the target."""
        config = self.config
        if config.attack != "backdoor":
            return None
        return backdoor_test_set(x_test, y_test, target_label=config.target_label, trigger_size=config.trigger_size,
                                 value=config.trigger_value)
