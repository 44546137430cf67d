"""The scenario schema: pydantic v2 models that reject unknown keys, safe YAML loading and ``--set`` overrides.

A scenario names everything a run needs: the dataset, the partition, the population and how it is
sampled, the model, local training, the strategy, evaluation, the executor's resources and the output.

- ``blocks``: one model per section; ``scenario``: ``Scenario`` and its checks across sections;
- ``compat``: the table of feature combinations that are refused, and why;
- ``yaml_safety``, ``overrides``, ``loading``: reading files and ``--set`` values into a ``Scenario``.

This package imports nothing of raysim's but ``raysim.errors``. The checks that need the engine, the
models or secure aggregation run after it, in ``raysim.engine.validation``.
"""

from raysim.config.blocks import (TEXT_SOURCES, AdaptiveClippingConfig, AdversaryConfig, AggregationConfig,
                                  AsyncConfig, Availability, CheckpointConfig, CompressionConfig, DataConfig, DownlinkConfig,
                                  Distribution, EvaluationConfig, ExecutorConfig, FaultsConfig, LoraConfig,
                                  LeakageConfig, ModelConfig, OutputConfig, PartitionConfig, PersonalizationConfig, PrivacyConfig, SamplingConfig,
                                  SecureAggregationConfig, StalenessConfig, StrategyConfig, SystemConfig, HEConfig,
                                  TinyTransformerConfig, TrackingConfig, TrainingConfig, path_exists)
from raysim.config.loading import load_scenario, one_line, parse_scenario, scenario_to_yaml
from raysim.config.overrides import apply_overrides, check_known_path
from raysim.config.scenario import Scenario, oversample_count
from raysim.config.yaml_safety import safe_yaml

__all__ = [
    "TEXT_SOURCES", "AdaptiveClippingConfig", "AdversaryConfig", "AggregationConfig", "AsyncConfig", "Availability",
    "CheckpointConfig", "CompressionConfig", "DataConfig", "DownlinkConfig", "Distribution", "EvaluationConfig", "ExecutorConfig",
    "FaultsConfig", "LeakageConfig", "LoraConfig", "ModelConfig", "OutputConfig", "PartitionConfig", "PersonalizationConfig", "PrivacyConfig",
    "HEConfig", "SamplingConfig", "Scenario", "SecureAggregationConfig", "StalenessConfig", "StrategyConfig", "SystemConfig",
    "TinyTransformerConfig", "TrackingConfig", "TrainingConfig", "apply_overrides", "check_known_path",
    "load_scenario", "one_line", "oversample_count", "parse_scenario", "path_exists", "safe_yaml",
    "scenario_to_yaml",
]
