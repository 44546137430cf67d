"""The run's initial model: built from the scenario's seed, so every process that builds it gets the same bits.

A worker builds it for the server actor (``ClientWorker.initial_vector``), whose process imports no torch; the
driver builds it for the he backend's parameters, and tests and benchmarks for their baselines.
"""

from __future__ import annotations

import numpy as np
import torch

from raysim.config import Scenario
from raysim.models.flat import FlatParams
from raysim.models.zoo import build_model


def initial_model(scenario: Scenario, feature_shape: tuple[int, ...], num_classes: int) -> tuple[torch.nn.Module, FlatParams]:
    """The seeded initial model and its flat parameter view."""
    torch.manual_seed(scenario.seed)
    model = build_model(scenario.model, feature_shape, num_classes)
    return model, FlatParams(model)


def initial_global(scenario: Scenario, feature_shape: tuple[int, ...], num_classes: int) -> np.ndarray:
    """The seeded initial model as a flat float32 vector."""
    return initial_model(scenario, feature_shape, num_classes)[1].numpy()
