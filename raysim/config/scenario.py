"""``Scenario``, one federated-learning experiment, and the checks across its blocks.

Which features may be combined is the table in ``compat.py``, checked here row by row; what is left
here are the counts that must agree across blocks (a cohort no larger than the population, enough
samples for every client, Krum's n > 2f + 2, DP's clip within secure aggregation's range).
"""

from __future__ import annotations

import math

from pydantic import Field, model_validator

from raysim.config import compat
from raysim.config.blocks import (AdversaryConfig, AggregationConfig, AsyncConfig, CheckpointConfig,
                                  CompressionConfig, DataConfig, DownlinkConfig, EvaluationConfig, ExecutorConfig, FaultsConfig,
                                  LeakageConfig, ModelConfig, OutputConfig, PartitionConfig, PersonalizationConfig, PrivacyConfig, SamplingConfig,
                                  SecureAggregationConfig, StrategyConfig, Strict, SystemConfig, TrackingConfig,
                                  TrainingConfig)
from raysim.errors import ScenarioError


def oversample_count(keep: int, over_selection: float, population: int) -> int:
    """How many clients to sample so that ``keep`` finish: ⌈keep·over_selection⌉, at most the population."""
    if not (math.isfinite(over_selection) and over_selection >= 1.0):
        raise ScenarioError(f"system.over_selection: must be >= 1 (got {over_selection}); FedScale uses 1.3")
    return min(population, math.ceil(keep * over_selection - 1e-9))  # 10 × 1.3 is 13.000000000000002


class Scenario(Strict):
    """One federated-learning experiment."""

    name: str = Field("run", min_length=1, max_length=120, pattern=r"^[A-Za-z0-9._-]+$")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    num_clients: int = Field(100, ge=1, le=10_000_000)
    rounds: int = Field(10, ge=1, le=1_000_000)
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    sampling: SamplingConfig = SamplingConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    strategy: StrategyConfig = StrategyConfig()
    secure_aggregation: SecureAggregationConfig | None = None
    privacy: PrivacyConfig | None = None
    evaluation: EvaluationConfig = EvaluationConfig()
    executor: ExecutorConfig = ExecutorConfig()
    tracking: TrackingConfig = TrackingConfig()
    output: OutputConfig = OutputConfig()
    system: SystemConfig | None = None
    asynchronous: AsyncConfig | None = None
    checkpoint: CheckpointConfig = CheckpointConfig()
    faults: FaultsConfig | None = None
    aggregation: AggregationConfig = AggregationConfig()
    compression: CompressionConfig | None = None
    downlink: DownlinkConfig | None = None
    adversary: AdversaryConfig | None = None
    personalization: PersonalizationConfig | None = None
    leakage: LeakageConfig | None = None

    @model_validator(mode="after")
    def _compatible(self) -> Scenario:
        """The first row of the feature table (``compat.ROWS``) that this scenario combines."""
        for row in compat.ROWS:
            if row.applies(self):
                raise ValueError(row.message)
        return self

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        """Counts and bounds that must agree across blocks."""
        if self.asynchronous is not None and self.asynchronous.concurrency > self.num_clients:
            raise ValueError(f"asynchronous.concurrency: {self.asynchronous.concurrency} clients in flight is more "
                             f"than num_clients ({self.num_clients}); lower it")
        if self.sampling.kind == "uniform" and self.sampling.clients_per_round > self.num_clients:
            raise ValueError(
                f"sampling.clients_per_round: {self.sampling.clients_per_round} is more than "
                f"num_clients ({self.num_clients}); lower it or raise num_clients"
            )
        if self.evaluation.federated and self.evaluation.federated_clients > self.num_clients:
            raise ValueError(
                f"evaluation.federated_clients: {self.evaluation.federated_clients} is more than "
                f"num_clients ({self.num_clients}); lower it"
            )
        if self.data.source in ("synthetic",) and self.partition.kind != "natural":
            needed = self.num_clients * max(self.partition.min_size, 0)
            train = math.floor(self.data.num_samples * (1 - self.data.test_fraction))
            if needed > train:
                raise ValueError(
                    f"partition.min_size: {self.num_clients} clients x min_size {self.partition.min_size} "
                    f"needs {needed} samples but the training set has {train}; "
                    "raise data.num_samples or lower partition.min_size"
                )
        privacy, secure = self.privacy, self.secure_aggregation
        if privacy is not None and privacy.mechanism != "local" and secure is not None \
                and privacy.clip_norm > secure.clip_range:
            raise ValueError("privacy.clip_norm: must be <= secure_aggregation.clip_range so that clipped updates are not "
                             "clipped again and their rounding stays within its norm bound; lower it or raise clip_range")
        if privacy is not None and privacy.control_clip_norm is not None and self.strategy.name != "scaffold":
            raise ValueError("privacy.control_clip_norm: only SCAFFOLD sends control deltas; remove it or set "
                             "strategy.name: scaffold")
        if self.aggregation.rule in ("krum", "multikrum") and self.sampling.kind == "uniform":
            n, f = self.sampling.clients_per_round, self.aggregation.byzantine
            if n <= 2 * f + 2:
                raise ValueError(f"aggregation.byzantine: Krum needs n > 2f + 2 clients per round (got n={n}, f={f}); "
                                 "lower aggregation.byzantine or raise sampling.clients_per_round")
        return self

    @property
    def seals_client_state(self) -> bool:
        """Whether the server keeps clients' state rows (SCAFFOLD's c_i, residuals, personal rows) sealed by
        each client: under secure aggregation, and under the central and distributed DP mechanisms, whose
        guarantee covers only what the server noises (``privacy.secagg.sealed_state``)."""
        return self.secure_aggregation is not None or (self.privacy is not None and self.privacy.mechanism != "local")

    @property
    def over_selected(self) -> bool:
        """Whether sync rounds draw ⌈K·over_selection⌉ clients and keep the first K finishers."""
        return self.system is not None and self.system.over_selection > 1.0

    @property
    def sample_rate(self) -> float:
        """q for the privacy accountant: the largest probability that a client's update is aggregated in a round.

        The Poisson rate; K/N for fixed-size sampling; ⌈K·over_selection⌉/N with over-selection, since a
        client that always finishes first is kept whenever it is among the ⌈K·over_selection⌉ drawn. DP-FedAvg's
        fixed denominator qW uses the expected kept fraction K/N instead (``raysim.privacy.dp.sampling``).
        In async modes K is the updates a server step aggregates.
        """
        if self.asynchronous is not None:  # a server step aggregates K updates (FedBuff's buffer, FedAsync's one)
            return self.asynchronous.step_updates / self.num_clients
        if self.sampling.kind == "poisson":
            return float(self.sampling.rate)
        if self.over_selected:
            drawn = oversample_count(self.sampling.clients_per_round, self.system.over_selection, self.num_clients)
            return drawn / self.num_clients
        return self.sampling.clients_per_round / self.num_clients

    @property
    def max_clients_per_round(self) -> int:
        """An upper bound on the clients sampled in one round (Poisson draws vary)."""
        if self.sampling.kind == "uniform":
            return self.sampling.clients_per_round
        q = self.sampling.rate or 0.0
        mean = q * self.num_clients
        return min(self.num_clients, int(mean + 6 * math.sqrt(mean + 1) + 1))
