"""Simulated attacks: who is malicious, how they poison their model updates, and how they poison their data.

Model poisoning (applied to one malicious client's delta after local training):

* ``sign_flip``: Δ ← −s·Δ, the reversed-gradient attack used against Krum and the median
  (Fang, Cao, Jia & Gong 2020, "Local Model Poisoning Attacks to Byzantine-Robust FL").
* ``scale_update``: Δ ← λ·Δ, explicit boosting (Bhagoji, Chakraborty, Mittal & Calo 2019,
  "Analyzing Federated Learning through an Adversarial Lens", §3), which survives averaging.
* ``gaussian_noise``: Δ is *replaced* by N(0, σ²I) noise, the Gaussian Byzantine workers of
  Blanchard et al. 2017 (§5): the attacker sends noise instead of its update, not noise on top.

Data poisoning (applied to one malicious client's training samples before local training):

* ``flip_labels``: y ← C − 1 − y, the all-classes label flip of Fang et al. 2020 (§5) and
  Tolpegin, Truex, Gursoy & Liu 2020, "Data Poisoning Attacks Against FL Systems".
* ``backdoor_data``: a trigger stamped on a fraction of the samples, relabelled to a target class
  (Gu, Dolan-Gavitt & Garg 2017, "BadNets"; Bagdasaryan et al. 2020, "How To Backdoor FL").
  ``backdoor_test_set`` builds the set on which backdoor accuracy is measured.

Nothing here mutates its inputs; every random choice comes from a seeded numpy Generator.
"""

from __future__ import annotations

import numpy as np

from raysim.errors import ScenarioError

ATTACKS = ("sign_flip", "scaling", "noise")
_MALICIOUS_STREAM = 71  # keeps the malicious set independent of every other stream drawn from the seed


def malicious_clients(seed: int, num_clients: int, fraction: float) -> np.ndarray:
    """Sorted int64 ids of round(fraction·num_clients) clients drawn without replacement from the seed.

    ``round`` is Python's (half to even). numpy draws a sample under 2% of a population above 10,000
    with a hash set, in O(malicious) memory; larger shares shuffle an int64 range (8 MB per 10⁶ clients).
    """
    if not (0.0 <= fraction < 1.0):
        raise ScenarioError(
            f"adversary.fraction: must be in [0, 1) (got {fraction}); it is the share of clients that are malicious"
        )
    if num_clients < 1:
        raise ScenarioError(f"num_clients: must be >= 1 (got {num_clients})")
    count = round(fraction * num_clients)
    rng = np.random.default_rng([seed, _MALICIOUS_STREAM])
    chosen = rng.choice(num_clients, size=count, replace=False)
    return np.sort(chosen.astype(np.int64))


def is_malicious(ids: np.ndarray, malicious: np.ndarray) -> np.ndarray:
    """A bool mask over ``ids``: which of them are in the sorted array ``malicious``."""
    ids = np.asarray(ids, dtype=np.int64)
    malicious = np.asarray(malicious, dtype=np.int64)
    if malicious.size == 0:
        return np.zeros(ids.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(malicious, ids), malicious.size - 1)
    return malicious[pos] == ids


def sign_flip(delta: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """−scale·Δ: the attacker pushes the model opposite to its honest update."""
    return (-np.float32(scale) * np.asarray(delta, dtype=np.float32)).astype(np.float32)


def scale_update(delta: np.ndarray, factor: float) -> np.ndarray:
    """factor·Δ: boosting (Bhagoji et al. 2019, §3), so the update survives being averaged with n − 1 honest ones."""
    return (np.float32(factor) * np.asarray(delta, dtype=np.float32)).astype(np.float32)


def gaussian_noise(delta: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """A vector of N(0, std²) noise shaped like Δ, which replaces the update (Blanchard et al. 2017, §5)."""
    return rng.normal(0.0, std, size=np.shape(delta)).astype(np.float32)


def poison_update(
    delta: np.ndarray, attack: str, rng: np.random.Generator, *, scale: float, noise_std: float
) -> np.ndarray:
    """One malicious client's delta after ``attack``: "sign_flip" (−scale·Δ), "scaling" (scale·Δ) or "noise"."""
    if attack not in ATTACKS:
        raise ScenarioError(f"adversary.attack: must be one of {', '.join(ATTACKS)} (got {attack!r})")
    if attack == "noise":
        if not (np.isfinite(noise_std) and noise_std >= 0):
            raise ScenarioError(f"adversary.noise_std: must be a finite number >= 0 (got {noise_std}); use e.g. 1.0")
        return gaussian_noise(delta, noise_std, rng)
    if not (np.isfinite(scale) and scale > 0):
        raise ScenarioError(f"adversary.scale: must be a finite number > 0 (got {scale}); use e.g. 1.0 or 10.0")
    if attack == "sign_flip":
        return sign_flip(delta, scale)
    return scale_update(delta, scale)


def flip_labels(y: np.ndarray, num_classes: int) -> np.ndarray:
    """C − 1 − y: class c becomes class C − 1 − c, so every label changes unless C is odd and c = (C − 1)/2."""
    if num_classes < 2:
        raise ScenarioError(f"data.num_classes: label flipping needs >= 2 classes (got {num_classes})")
    y = np.asarray(y)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ScenarioError(
            f"data.num_classes: label flipping needs labels in [0, {num_classes}) "
            f"(got [{y.min()}, {y.max()}]); set it to the dataset's class count"
        )
    return (num_classes - 1 - y).astype(y.dtype)


def add_trigger(x: np.ndarray, trigger_size: int, value: float) -> np.ndarray:
    """A copy of ``x`` with the trigger stamped on every sample.

    Shape (n, features): the last ``trigger_size`` features are set to ``value``.
    Shape (n, H, W) or (n, C, H, W): a trigger_size × trigger_size square in the bottom-right
    corner, in every channel, is set to ``value`` (the BadNets pixel pattern).
    """
    x = np.asarray(x)
    if x.ndim not in (2, 3, 4):
        raise ValueError(f"add_trigger: expects (n, features), (n, H, W) or (n, C, H, W) (got shape {x.shape})")
    limit = x.shape[1] if x.ndim == 2 else min(x.shape[-2:])
    if not (1 <= trigger_size <= limit):
        raise ScenarioError(
            f"adversary.trigger_size: must be in [1, {limit}] for inputs of shape {x.shape[1:]} (got {trigger_size})"
        )
    out = x.copy()
    if x.ndim == 2:
        out[:, -trigger_size:] = value
    else:
        out[..., -trigger_size:, -trigger_size:] = value
    return out


def _check_target(target_label: int, num_classes: int | None) -> None:
    upper = "" if num_classes is None else f" and < {num_classes}"
    if target_label < 0 or (num_classes is not None and target_label >= num_classes):
        raise ScenarioError(f"adversary.target_label: must be >= 0{upper} (got {target_label})")


def backdoor_data(
    x: np.ndarray,
    y: np.ndarray,
    *,
    target_label: int,
    trigger_size: int,
    value: float,
    poison_fraction: float,
    rng: np.random.Generator,
    num_classes: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """New (x, y) where round(poison_fraction·n) rng-chosen samples carry the trigger and the label ``target_label``."""
    _check_target(target_label, num_classes)
    if not (0.0 <= poison_fraction <= 1.0):
        raise ScenarioError(
            f"adversary.poison_fraction: must be in [0, 1] (got {poison_fraction}); "
            "it is the share of a malicious client's samples that carry the trigger"
        )
    x, y = np.asarray(x), np.asarray(y)
    n = x.shape[0]
    chosen = np.sort(rng.choice(n, size=round(poison_fraction * n), replace=False))
    x_out, y_out = x.copy(), y.copy()
    x_out[chosen] = add_trigger(x[chosen], trigger_size, value)
    y_out[chosen] = target_label
    return x_out, y_out


def backdoor_test_set(
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    target_label: int,
    trigger_size: int,
    value: float,
    num_classes: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The test samples whose true label is not ``target_label``, triggered, all labelled ``target_label``.

    Backdoor accuracy is the model's accuracy on this set: the share it classifies as the target.
    """
    _check_target(target_label, num_classes)
    x_test, y_test = np.asarray(x_test), np.asarray(y_test)
    keep = y_test != target_label
    return add_trigger(x_test[keep], trigger_size, value), np.full(int(keep.sum()), target_label, dtype=y_test.dtype)
