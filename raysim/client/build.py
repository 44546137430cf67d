"""The stage order, in one list, and the pipeline a scenario builds from it.

    train → fault → attack → finite check → norm bound → compress (error feedback) → DP clip → encode

A stage is in a run's pipeline when the scenario turns its feature on; training, the finite check and
the encoding always are, except that the server's list has no training stage, which has no server half:
the server process imports no torch. DP's clip comes after compression, so what a client sends, compressed,
is what is clipped: the sensitivity stays the clip norm S (the clip only scales the codec's values). The worker builds its pipeline with its resident model (``runtime``) and the
clients' storage key; the server builds the same list without them, for the server halves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from raysim.adversary.clients import MaliciousClients
from raysim.client.attack import Attack
from raysim.client.bounds import FiniteCheck, NormBound
from raysim.client.compress import Compression
from raysim.client.dp_clip import DPClip
from raysim.client.encode import Encoding
from raysim.client.faults import FaultInjection
from raysim.client.personal import Personalization
from raysim.client.pipeline import Pipeline, Stage
from raysim.config import Scenario
from raysim.config.compat import vectorize_choice
from raysim.privacy.secagg.sealed_state import RowSealer
from raysim.strategies.base import ClientHalf

if TYPE_CHECKING:
    from raysim.client.training import ClientRuntime


def _training(s: Scenario, parts: dict) -> Stage | None:
    runtime, strategy = parts.get("runtime"), parts.get("strategy") or ClientHalf()
    if runtime is None:  # the server's pipeline
        return None
    from raysim.client.training import LocalTraining, VectorizedTraining

    if vectorize_choice(s)[0]:
        return VectorizedTraining(s, runtime, strategy, parts["feature_shape"])
    return LocalTraining(s, runtime, strategy)


def _personalization(s: Scenario, parts: dict) -> Stage | None:
    return None if s.personalization is None else Personalization(s, parts.get("runtime"), parts.get("personal_index"))


def _fault(s: Scenario, parts: dict) -> Stage | None:
    return None if s.faults is None or not s.faults.client_faults else FaultInjection(s)


def _attack(s: Scenario, parts: dict) -> Stage | None:
    if s.adversary is None:
        return None
    return Attack(MaliciousClients(s.adversary, s.seed, s.num_clients, parts["num_classes"]))


def _norm_bound(s: Scenario, parts: dict) -> Stage | None:
    return None if s.aggregation.norm_bound is None else NormBound(s.aggregation)


def _dp_clip(s: Scenario, parts: dict) -> Stage | None:
    if s.privacy is None or s.privacy.mechanism == "local":
        return None
    control_clip = (s.privacy.control_clip_norm or s.privacy.clip_norm) if s.strategy.name == "scaffold" else None
    return DPClip(s.privacy.mechanism, control_clip)


def _compression(s: Scenario, parts: dict) -> Stage | None:
    return None if s.compression is None or s.compression.kind == "none" else Compression(s.compression, s.seed)


def _encoding(s: Scenario, parts: dict) -> Stage:
    return Encoding(s, parts.get("sealer"), parts.get("he_secret"))


STAGES: list[tuple[str, Callable[[Scenario, dict], Stage | None]]] = [
    ("train", _training),
    ("personalize", _personalization),
    ("fault", _fault),
    ("attack", _attack),
    ("finite_check", lambda s, parts: FiniteCheck()),
    ("norm_bound", _norm_bound),
    ("compress", _compression),
    ("dp_clip", _dp_clip),
    ("encode", _encoding),
]


def build_pipeline(scenario: Scenario, num_classes: int, *, runtime: ClientRuntime | None = None,
                   strategy: ClientHalf | None = None, sealer: RowSealer | None = None,
                   feature_shape: tuple[int, ...] | None = None, he_secret: bytes | None = None,
                   personal_index: np.ndarray | None = None) -> Pipeline:
    """The scenario's stages in ``STAGES`` order; a worker's (``runtime`` given) trains vectorized when
    ``vectorize_choice`` says so, on samples of ``feature_shape``."""
    parts = {"num_classes": num_classes, "runtime": runtime, "strategy": strategy, "sealer": sealer,
             "feature_shape": feature_shape, "he_secret": he_secret, "personal_index": personal_index}
    stages = (make(scenario, parts) for _, make in STAGES)
    return Pipeline([stage for stage in stages if stage is not None])
