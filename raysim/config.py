"""The scenario schema: pydantic v2 models that reject unknown keys, YAML loading and ``--set`` overrides.

A scenario names everything a run needs: the dataset, the partition, the population and how it is
sampled, the model, local training, the strategy, evaluation, the executor's resources and the output.
Every check that can be made without starting Ray is made here, so ``raysim validate`` is exact.
"""

from __future__ import annotations

import copy
import math
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raysim.errors import ScenarioError, shown, shown_text


def path_exists(path: str, *, file: bool = False) -> bool:
    """``Path.exists`` (or ``is_file``), false rather than an OSError for a name the OS refuses
    (a component over 255 bytes, a path over 4096) or a ValueError for an embedded NUL."""
    try:
        return Path(path).is_file() if file else Path(path).exists()
    except (OSError, ValueError):
        return False


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    """Where samples come from. Built-in sources need no files; user sources read ``path``."""

    source: Literal["synthetic", "fedprox_synthetic", "digits", "npz", "table",
                    "shakespeare_lm", "shakespeare_genre", "text"] = "synthetic"
    num_samples: int = Field(60_000, ge=10, le=50_000_000)
    num_features: int = Field(32, ge=1, le=100_000)
    num_classes: int = Field(10, ge=2, le=100_000)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    alpha: float = Field(1.0, ge=0.0, description="fedprox_synthetic: std of the model prior u_k (as in the authors' generator)")
    beta: float = Field(1.0, ge=0.0, description="fedprox_synthetic: std of the data prior B_k")
    path: str | None = None
    test_path: str | None = None
    label_column: str = "label"
    feature_columns: list[str] | None = None
    natural_column: str | None = None
    text_column: str = Field("text", description="text sources: the column holding each sample's text")
    seq_len: int = Field(64, ge=4, le=32_768, description="text sources: tokens per sample")
    min_lines: int = Field(10, ge=1, description="shakespeare sources: keep (play, speaker) pairs with this many lines")
    plays: list[str] | None = Field(None, description="shakespeare sources: play names such as hamlet; null is all 38")
    max_samples: int | None = Field(None, ge=2, description="text sources: keep a seeded subset of this many samples")
    cache_dir: str | None = Field(None, description="text sources: tokenized arrays are cached here "
                                                    "(default $RAYSIM_CACHE or ~/.cache/raysim)")

    @model_validator(mode="after")
    def _files_exist(self) -> DataConfig:
        if self.source in ("npz", "table"):
            if not self.path:
                raise ValueError(f"data.path: source '{self.source}' reads a file; set data.path to it")
            for field, value in (("data.path", self.path), ("data.test_path", self.test_path)):
                if value and not path_exists(value):
                    raise ValueError(f"{field}: file not found: {shown_text(value)}; check the path")
        if self.source == "text":
            if not self.path:
                raise ValueError("data.path: source 'text' reads a .jsonl, .csv, .parquet or .txt file "
                                 "or a Hub dataset name; set data.path")
            for field, value in (("data.path", self.path), ("data.test_path", self.test_path)):
                if value and Path(value).suffix.lower() in (".jsonl", ".json", ".csv", ".parquet", ".txt") \
                        and not path_exists(value):
                    raise ValueError(f"{field}: file not found: {shown_text(value)}; check the path")
        return self


class PartitionConfig(_Strict):
    """How the training set is split into clients (see ``raysim.data.partition``)."""

    kind: Literal["dirichlet", "iid", "shards", "natural"] = "dirichlet"
    alpha: float = Field(0.5, gt=0.0, description="Dirichlet concentration; small is more skewed")
    min_size: int = Field(1, ge=0)
    balance: bool = False
    shards_per_client: int = Field(2, ge=1)
    max_tries: int = Field(100, ge=1, le=10_000)


class SamplingConfig(_Strict):
    """Which clients train each round: a fixed-size uniform draw, or Poisson sampling at ``rate``."""

    kind: Literal["uniform", "poisson"] = "uniform"
    clients_per_round: int = Field(10, ge=1)
    rate: float | None = Field(None, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _rate_for_poisson(self) -> SamplingConfig:
        if self.kind == "poisson" and self.rate is None:
            raise ValueError("sampling.rate: Poisson sampling needs a rate in (0, 1], e.g. 0.01")
        return self


class LoraConfig(_Strict):
    """LoRA adapters (Hu et al., ICLR 2022) through peft: W = W₀ + (alpha/r)·B·A, and only A and B train.

    ``target_modules`` null takes peft's default for the architecture (q_proj and v_proj for Llama,
    query and value for BERT); ``all-linear`` adapts every linear layer but the output head.
    ``train_head`` null trains a classifier's head and leaves a causal LM's head frozen.
    """

    r: int = Field(8, ge=1, description="adapter rank")
    alpha: float = Field(16.0, gt=0.0, description="scale alpha/r of the adapter's output")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] | None = None
    train_head: bool | None = None
    modules_to_save: list[str] = Field(default_factory=list, description="other modules trained in full, e.g. embed_tokens")


class TinyTransformerConfig(_Strict):
    """The sizes of the offline tiny model (Llama-style for hf_causal_lm, BERT-style for hf_classifier)."""

    hidden_size: int = Field(64, ge=8, le=4096)
    layers: int = Field(2, ge=1, le=64)
    heads: int = Field(4, ge=1, le=64)
    intermediate_size: int = Field(128, ge=8, le=16384)

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyTransformerConfig:
        if self.hidden_size % self.heads:
            raise ValueError(f"model.tiny.heads: {self.heads} heads must divide hidden_size {self.hidden_size}")
        return self


class ModelConfig(_Strict):
    """A small model built from its config (logistic regression, an MLP, a small CNN), or a transformers
    language model with LoRA adapters: ``hf_causal_lm`` or ``hf_classifier``, either the offline tiny
    model built from ``tiny`` or a checkpoint named by ``name_or_path`` (a Hub name or a local folder)."""

    kind: Literal["logreg", "mlp", "cnn", "hf_causal_lm", "hf_classifier"] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [64])
    channels: list[int] = Field(default_factory=lambda: [16, 32])
    name_or_path: str | None = None
    tiny: TinyTransformerConfig = TinyTransformerConfig()
    lora: LoraConfig | None = LoraConfig()
    lora_aggregation: Literal["fedavg", "ffa"] = Field(
        "fedavg", description="fedavg averages A and B; ffa freezes A and trains only B (FFA-LoRA)")
    tokenizer: Literal["byte", "char", "bpe", "pretrained"] | None = Field(
        None, description="null: the checkpoint's own tokenizer with name_or_path, else byte-level")
    vocab_size: int = Field(512, ge=16, le=1_000_000, description="char and bpe tokenizers: vocabulary size")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bf16 on a GPU that supports it")
    init_seed: int = Field(0, ge=0, description="seeds the tiny base model, the new head and LoRA's A")

    @field_validator("hidden", "channels")
    @classmethod
    def _positive_widths(cls, widths: list[int]) -> list[int]:
        if any(w < 1 for w in widths):
            raise ValueError("layer widths must be positive integers")
        return widths

    @property
    def is_language_model(self) -> bool:
        return self.kind in ("hf_causal_lm", "hf_classifier")

    @property
    def resolved_tokenizer(self) -> str:
        return self.tokenizer or ("pretrained" if self.name_or_path else "byte")

    @model_validator(mode="after")
    def _language_model_fields(self) -> ModelConfig:
        if not self.is_language_model:
            if self.name_or_path is not None:
                raise ValueError(f"model.name_or_path: only hf_causal_lm and hf_classifier load checkpoints, "
                                 f"not '{self.kind}'; remove it or change model.kind")
            return self
        if self.resolved_tokenizer == "pretrained" and not self.name_or_path:
            raise ValueError("model.tokenizer: 'pretrained' loads the checkpoint's tokenizer; set model.name_or_path "
                             "or use byte, char or bpe with the tiny model")
        if self.name_or_path and self.resolved_tokenizer != "pretrained":
            raise ValueError("model.tokenizer: a checkpoint needs its own tokenizer; leave model.tokenizer out "
                             "or set it to 'pretrained'")
        if self.lora_aggregation == "ffa" and self.lora is None:
            raise ValueError("model.lora_aggregation: ffa freezes LoRA's A matrices; add a model.lora block")
        return self


class TrainingConfig(_Strict):
    """Local training on each client."""

    epochs: int = Field(1, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0.0, le=1e3)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    straggler_fraction: float = Field(0.0, ge=0.0, le=1.0, description="sampled clients that run 1..E-1 epochs")
    drop_stragglers: bool = Field(False, description="FedAvg's baseline: stragglers' work is discarded")

    @model_validator(mode="after")
    def _stragglers_need_epochs(self) -> TrainingConfig:
        if self.straggler_fraction > 0 and self.epochs < 2:
            raise ValueError("training.straggler_fraction: stragglers run 1..E-1 epochs, so training.epochs must be >= 2")
        return self


class StrategyConfig(_Strict):
    """The algorithm: FedAvg, a server optimizer of Reddi et al. (ICLR 2021), FedProx or SCAFFOLD."""

    name: Literal["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "scaffold"] = "fedavg"
    server_lr: float = Field(1.0, gt=0.0)
    mu: float = Field(0.0, ge=0.0, description="FedProx proximal weight; 0 is FedAvg")
    client_weighting: Literal["samples", "uniform", "tokens"] = Field(
        "samples", description="aggregation weight of a client; tokens counts its non-padding tokens")
    state_store: Literal["memory", "disk"] = Field("memory", description="where SCAFFOLD keeps each c_i")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="FedAvgM server momentum")
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.99, ge=0.0, lt=1.0)
    tau: float = Field(1e-3, gt=0.0, description="adaptivity: the epsilon of Reddi et al.")

    @model_validator(mode="after")
    def _mu_only_for_fedprox(self) -> StrategyConfig:
        if self.mu > 0 and self.name != "fedprox":
            raise ValueError("strategy.mu: only fedprox uses the proximal term; remove mu or set strategy.name: fedprox")
        return self


class SecureAggregationConfig(_Strict):
    """Bonawitz et al.'s secure aggregation (SecAgg+ when ``neighbours`` is set) between client and server actors.

    ``threshold`` is a count, a fraction of the round's clients, or null to derive it (with the
    SecAgg+ degree when ``neighbours: auto``) from ``expected_dropout`` and ``corrupt_fraction``.
    ``quant_bits`` null takes the most bits the overflow guard n·2^q < 2^b allows.
    """

    threshold: int | float | None = None
    neighbours: int | Literal["auto"] | None = None
    expected_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    corrupt_fraction: float = Field(0.05, ge=0.0, lt=0.5)
    modulus_bits: int = Field(32, ge=2, le=64)
    quant_bits: int | None = Field(None, ge=1, le=62)
    clip_range: float = Field(1.0, gt=0.0, description="updates (scaled by weight) are clipped to [-c, c]")
    control_clip_range: float = Field(10.0, gt=0.0, description="SCAFFOLD's control deltas are clipped to this")
    consistency_check: bool = False
    dropout: dict[Literal["advertise_keys", "share_keys", "masked_input", "consistency_check", "unmasking"], float] = Field(default_factory=dict)
    schedule: dict[Literal["advertise_keys", "share_keys", "masked_input", "consistency_check", "unmasking"], list[int]] = Field(default_factory=dict)
    late: list[int] = Field(default_factory=list)
    diagnostics: bool = Field(False, description="report secagg_quantization_error, ‖secure − plain‖/‖plain‖; the "
                                                 "plain sum is computed by the driver, never sent to the server actor")

    @field_validator("dropout")
    @classmethod
    def _probabilities(cls, value: dict[str, float]) -> dict[str, float]:
        for phase, p in value.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"secure_aggregation.dropout.{phase}: a probability in [0, 1] (got {p})")
        return value

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, value: int | float | None) -> int | float | None:
        if isinstance(value, float) and not 0.0 < value <= 1.0:
            raise ValueError("secure_aggregation.threshold: a count >= 1 or a fraction in (0, 1] of the round's clients")
        if isinstance(value, int) and value < 1:
            raise ValueError("secure_aggregation.threshold: a count >= 1 or a fraction in (0, 1] of the round's clients")
        return value


class AdaptiveClippingConfig(_Strict):
    """Adaptive clipping (Andrew et al. 2021): C follows the ``target_quantile`` of update norms."""

    target_quantile: float = Field(0.5, ge=0.0, le=1.0)
    learning_rate: float = Field(0.2, gt=0.0)
    count_stddev: float | None = Field(None, gt=0.0, description="σ_b; default expected cohort / 20")


class PrivacyConfig(_Strict):
    """Differential privacy, backed by an Opacus accountant and reported every round.

    ``central``: user-level DP-FedAvg (McMahan et al. 2018): clip each client's delta to ``clip_norm``,
    fixed-denominator average, Gaussian noise σ = z·S/(qW) on the server. ``local``: DP-SGD inside each
    client through Opacus (``clip_norm`` is the per-sample max_grad_norm). ``distributed``: clients add
    discrete noise to their quantized updates before secure-aggregation masking.
    """

    mechanism: Literal["central", "local", "distributed"]
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    accountant: Literal["rdp", "prv"] = "rdp"
    noise_multiplier: float = Field(1.0, ge=0.0)
    target_epsilon: float | None = Field(None, gt=0.0, description="solve z for this budget over the run")
    budget_epsilon: float | None = Field(None, gt=0.0, description="stop or warn past this ε (default: target_epsilon)")
    on_budget: Literal["stop", "warn"] = "stop"
    clip_norm: float = Field(1.0, gt=0.0)
    adaptive: AdaptiveClippingConfig | None = None
    weight_cap: float | None = Field(None, gt=0.0, description="w_k = min(n_k / cap, 1); null weighs users equally")
    noise: Literal["discrete_gaussian", "skellam"] = "discrete_gaussian"


class EvaluationConfig(_Strict):
    """Central evaluation on the test set every ``every`` rounds, and optional federated evaluation."""

    every: int = Field(1, ge=1)
    federated: bool = False
    federated_clients: int = Field(20, ge=1)
    holdout_fraction: float = Field(0.2, gt=0.0, lt=1.0)


class ExecutorConfig(_Strict):
    """The worker pool. One worker actor is one execution slot, never one client."""

    num_workers: int | Literal["auto"] = "auto"
    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    clients_per_call: int = Field(5, ge=1, description="clients trained per Ray call; fixes the reduction order")
    calls_in_flight: int = Field(2, ge=1, description="calls queued per worker so it never idles")
    max_worker_failures: int = Field(100, ge=0, description="worker deaths survived before the run stops")

    @field_validator("num_workers")
    @classmethod
    def _workers_positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be a positive integer or 'auto'")
        return value

    @field_validator("num_gpus")
    @classmethod
    def _whole_or_fraction(cls, value: float) -> float:
        if value > 1 and not float(value).is_integer():
            raise ValueError("a fraction of one GPU (e.g. 0.25) or a whole number of GPUs")
        return value


class TrackingConfig(_Strict):
    """Where metrics go: JSONL always, W&B when its mode resolves to online or offline."""

    wandb: Literal["online", "offline", "disabled"] | None = None
    project: str = "raysim"
    group: str | None = None
    progress: bool = True


class OutputConfig(_Strict):
    dir: str = "results"
    overwrite: bool = False


class DistributionConfig(_Strict):
    """A positive per-client quantity from a seeded distribution: constant(value), uniform(low, high),
    lognormal(mean, sigma), where ``mean`` is the mean of the values themselves, or exponential(mean)."""

    kind: Literal["constant", "uniform", "lognormal", "exponential"] = "constant"
    value: float | None = None
    low: float | None = None
    high: float | None = None
    mean: float | None = None
    sigma: float | None = None


class AvailabilityConfig(_Strict):
    """When a client can take a task: with ``probability`` per round (per dispatch in async modes), and,
    when both are set, only inside periodic windows of ``on_s`` seconds online then ``off_s`` offline."""

    probability: float = 1.0
    on_s: float | None = None
    off_s: float | None = None


def oversample_count(keep: int, over_selection: float, population: int) -> int:
    """How many clients to sample so that ``keep`` finish: ⌈keep·over_selection⌉, at most the population."""
    if not (math.isfinite(over_selection) and over_selection >= 1.0):
        raise ScenarioError(f"system.over_selection: must be >= 1 (got {over_selection}); FedScale uses 1.3")
    return min(population, math.ceil(keep * over_selection - 1e-9))  # 10 × 1.3 is 13.000000000000002


class SystemConfig(_Strict):
    """Client devices in virtual time (``raysim.engine.system_model``); no real sleeps anywhere.

    A client's task lasts model_bytes/down_bw + samples·epochs/speed + model_bytes/up_bw virtual
    seconds; a bandwidth left out is unlimited. ``trace`` (CSV ``client_id,speed,up_bw,down_bw``
    [``,avail_start,avail_end``]) overrides the distributions. Synchronous rounds sample
    ⌈K·over_selection⌉ clients and keep the first K finishers (FedScale, Lai et al. 2022) that
    beat ``deadline_s``; the slowest kept client sets the round's virtual seconds.
    """

    speed: DistributionConfig | None = Field(None, description="training samples per second")
    up_bw: DistributionConfig | None = Field(None, description="uplink bytes per second")
    down_bw: DistributionConfig | None = Field(None, description="downlink bytes per second")
    availability: AvailabilityConfig = AvailabilityConfig()
    dropout: float = Field(0.0, description="probability that a client abandons a task it started")
    trace: str | None = None
    over_selection: float = 1.0
    deadline_s: float | None = None

    @model_validator(mode="after")
    def _checked(self) -> SystemConfig:
        from raysim.engine.system_model import Availability, Distribution  # the checks live with the model

        if self.speed is None and self.trace is None:
            raise ValueError("system.speed: required unless system.trace gives per-client speeds; "
                             "e.g. speed: {kind: lognormal, mean: 100, sigma: 1}")
        for field, dist, unit in (("system.speed", self.speed, "samples/s"), ("system.up_bw", self.up_bw, "bytes/s"),
                                  ("system.down_bw", self.down_bw, "bytes/s")):
            if dist is not None:
                Distribution(**dist.model_dump()).check(field, unit)
        Availability(**self.availability.model_dump()).check()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"system.dropout: must be in [0, 1) (got {self.dropout}); it is a per-task probability")
        if self.trace is not None and not path_exists(self.trace, file=True):
            raise ValueError(f"system.trace: file not found: {shown_text(self.trace)}; check the path")
        if not (math.isfinite(self.over_selection) and self.over_selection >= 1.0):
            raise ValueError(f"system.over_selection: must be >= 1 (got {self.over_selection}); FedScale uses 1.3")
        if self.deadline_s is not None and not (self.deadline_s > 0):
            raise ValueError(f"system.deadline_s: must be a positive number of seconds (got {self.deadline_s})")
        return self


class StalenessConfig(_Strict):
    """The staleness function s(d) of Xie et al. 2019, §5.2: constant, polynomial (d + 1)^(−a), or hinge
    (1 up to d = b, then 1/(a(d − b) + 1)). The default, polynomial with a = 0.5, is FedBuff's 1/√(1 + d)."""

    kind: Literal["constant", "polynomial", "hinge"] = "polynomial"
    a: float = Field(0.5, ge=0.0, allow_inf_nan=False)
    b: float = Field(4.0, ge=0.0, allow_inf_nan=False)


class AsyncConfig(_Strict):
    """Asynchronous FL on the virtual clock: FedAsync (Xie et al. 2019) or FedBuff (Nguyen et al. 2022).

    ``concurrency`` clients train at once; each finished client is replaced at once. FedAsync mixes
    every update into the model, x ← (1 − α_t)x + α_t·x_new with α_t = alpha·s(staleness); FedBuff
    steps once per ``buffer_size`` (K) updates with their s(staleness)-weighted mean delta, through
    the strategy's server optimizer (``strategy.server_lr`` is FedBuff's η_g). Updates staler than
    ``max_staleness`` are dropped and counted. The scenario's ``rounds`` counts server steps.
    """

    mode: Literal["fedasync", "fedbuff"] = "fedbuff"
    concurrency: int = Field(10, description="clients training at any virtual time")
    buffer_size: int = Field(10, description="FedBuff's K: updates per server step")
    alpha: float = Field(0.6, description="FedAsync's mixing weight α in (0, 1]")
    staleness: StalenessConfig = StalenessConfig()
    max_staleness: int | None = Field(None, description="drop updates staler than this many server steps")

    @model_validator(mode="after")
    def _checked(self) -> AsyncConfig:
        if self.concurrency < 1:
            raise ValueError(f"asynchronous.concurrency: must be >= 1 (got {self.concurrency}); "
                             "it is how many clients train at once, e.g. 100")
        if self.buffer_size < 1:
            raise ValueError(f"asynchronous.buffer_size: must be >= 1 (got {self.buffer_size}); FedBuff uses K = 10")
        if self.mode == "fedbuff" and self.buffer_size > self.concurrency:
            raise ValueError(f"asynchronous.buffer_size: K = {self.buffer_size} is more than asynchronous.concurrency "
                             f"({self.concurrency}), so the buffer could never fill; lower it or raise concurrency")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"asynchronous.alpha: must be in (0, 1] (got {self.alpha}); Xie et al. use 0.6 to 0.9")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"asynchronous.max_staleness: must be >= 0 server steps (got {self.max_staleness})")
        return self


class CheckpointConfig(_Strict):
    """Checkpoints every ``every`` rounds (server steps in async modes), and on SIGINT or SIGTERM."""

    every: int = Field(10, ge=1, description="rounds between checkpoints")
    keep: int = Field(2, ge=1, description="how many of the newest checkpoints to keep")


class FaultsConfig(_Strict):
    """Chaos testing: faults injected on purpose, each chosen deterministically from the seed.

    Client faults draw one uniform u per (seed, round, client) and take consecutive intervals of it
    (errors, then NaN, Inf and huge updates), so the same fraction always hits the same clients.
    """

    kill_worker_every: int | None = Field(None, ge=1, description="a worker process exits at its N-th train call")
    delay_worker: int | None = Field(None, ge=0, description="the worker (by position) that sleeps before each call")
    delay_seconds: float = Field(0.0, ge=0.0, le=3600.0)
    client_error_fraction: float = Field(0.0, ge=0.0, le=1.0, description="clients whose training raises")
    nan_fraction: float = Field(0.0, ge=0.0, le=1.0)
    inf_fraction: float = Field(0.0, ge=0.0, le=1.0)
    huge_fraction: float = Field(0.0, ge=0.0, le=1.0)
    huge_scale: float = Field(1e6, gt=0.0, description="a huge update is the client's update times this")

    @model_validator(mode="after")
    def _fractions(self) -> FaultsConfig:
        total = self.client_error_fraction + self.nan_fraction + self.inf_fraction + self.huge_fraction
        if total > 1.0:
            raise ValueError(f"faults.client_error_fraction: the client fault fractions add up to {total:g} > 1; lower them")
        return self

    @property
    def client_faults(self) -> bool:
        return self.client_error_fraction + self.nan_fraction + self.inf_fraction + self.huge_fraction > 0


class AggregationConfig(_Strict):
    """How the server combines individual updates: the weighted mean, or a Byzantine-robust rule.

    ``norm_bound`` clips (or rejects) each update to an L2 norm before any rule, and composes with
    secure aggregation (the client clips before encoding). The robust rules need individual updates.
    """

    rule: Literal["mean", "median", "trimmed_mean", "krum", "multikrum"] = "mean"
    trim_fraction: float = Field(0.1, ge=0.0, lt=0.5, description="trimmed mean: β, dropped at each end")
    byzantine: int = Field(0, ge=0, description="Krum: f, the Byzantine clients tolerated per round")
    multikrum: int | None = Field(None, ge=1, description="Multi-Krum: m updates averaged (default n − f)")
    norm_bound: float | None = Field(None, gt=0.0, description="L2 bound on each client update")
    norm_bound_action: Literal["clip", "reject"] = "clip"


class CompressionConfig(_Strict):
    """Client → server compression of each update, with optional error feedback."""

    kind: Literal["none", "topk", "randk", "random_mask", "quantize", "sign"] = "none"
    fraction: float = Field(0.01, gt=0.0, le=1.0, description="top-k, random-k, random mask: fraction kept")
    bits: int = Field(8, ge=1, le=16, description="quantize: bits per coordinate")
    stochastic: bool = Field(True, description="quantize: unbiased stochastic rounding")
    error_feedback: bool = Field(False, description="keep each client's residual and add it next time")


class AdversaryConfig(_Strict):
    """A seeded fraction of malicious clients and the attack they run."""

    fraction: float = Field(0.1, ge=0.0, lt=1.0)
    attack: Literal["sign_flip", "scaling", "noise", "label_flip", "backdoor"] = "sign_flip"
    scale: float = Field(10.0, gt=0.0, description="sign_flip and scaling: the factor applied")
    noise_std: float = Field(1.0, gt=0.0, description="noise: std of the Gaussian that replaces the update")
    target_label: int = Field(0, ge=0, description="backdoor: the label the trigger maps to")
    trigger_size: int = Field(3, ge=1, description="backdoor: trigger features (or square side for images)")
    trigger_value: float = Field(3.0, description="backdoor: the trigger's feature value")
    poison_fraction: float = Field(0.5, gt=0.0, le=1.0, description="backdoor: share of a client's samples poisoned")


class Scenario(_Strict):
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
    adversary: AdversaryConfig | None = None

    @model_validator(mode="after")
    def _virtual_time(self) -> Scenario:
        """The system model and the async modes against the rest of the scenario."""
        if self.over_selected and self.sampling.kind != "uniform":
            raise ValueError("system.over_selection: keeping the first K of ⌈K·over_selection⌉ clients needs "
                             "sampling.kind: uniform; set over_selection: 1 for Poisson sampling")
        run = self.asynchronous
        if run is None:
            return self
        if self.system is None:
            raise ValueError("asynchronous: updates are ordered by virtual client durations; add a system block, "
                             "e.g. system: {speed: {kind: lognormal, mean: 100, sigma: 1}}")
        if self.system.over_selection != 1.0 or self.system.deadline_s is not None:
            raise ValueError("system.over_selection: over-selection and deadline_s shape synchronous rounds; "
                             "async modes keep asynchronous.concurrency clients in flight instead, so remove them")
        if run.concurrency > self.num_clients:
            raise ValueError(f"asynchronous.concurrency: {run.concurrency} clients in flight is more than "
                             f"num_clients ({self.num_clients}); lower it")
        if self.strategy.name == "scaffold":
            raise ValueError("strategy.name: scaffold's control variates assume synchronous rounds; "
                             "use fedavg, fedprox or a server optimizer with asynchronous modes")
        if run.mode == "fedasync" and self.strategy.name not in ("fedavg", "fedprox"):
            raise ValueError(f"strategy.name: fedasync's mixing replaces the server update, so {self.strategy.name} "
                             "cannot apply; use fedavg or fedprox, or asynchronous.mode: fedbuff")
        if self.secure_aggregation is not None:
            raise ValueError("secure_aggregation: the protocol sums a synchronous cohort; "
                             "remove it or the asynchronous block")
        if self.training.straggler_fraction > 0:
            raise ValueError("training.straggler_fraction: async modes model slow clients with system.speed; set it to 0")
        return self

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
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
        if self.strategy.name == "scaffold" and (self.training.optimizer != "sgd" or self.training.momentum > 0):
            raise ValueError(
                "strategy.name: scaffold's control variates assume plain local SGD; "
                "set training.optimizer: sgd and training.momentum: 0"
            )
        if self.secure_aggregation is not None and self.sampling.kind == "uniform":
            from raysim.privacy.secagg.setup import round_params

            round_params(self.secure_aggregation, self.sampling.clients_per_round)
        if self.privacy is not None:
            self._check_privacy(self.privacy)
        if self.model.kind == "cnn" and self.data.source not in ("digits", "npz", "table"):
            raise ValueError("model.kind: 'cnn' needs image-shaped data such as data.source: digits")
        return self

    @model_validator(mode="after")
    def _robustness(self) -> Scenario:
        """Robust rules, compression and attacks against the layers they cannot compose with."""
        rule, compression = self.aggregation.rule, self.compression
        if rule != "mean":
            for block, why in (("secure_aggregation", "the server only ever sees the sum"),
                               ("privacy", "DP's sensitivity analysis assumes the mean"),
                               ("asynchronous", "async steps fold updates as they arrive")):
                if getattr(self, block) is not None:
                    raise ValueError(f"aggregation.rule: {rule} needs individual updates, but {why} with {block}; "
                                     "use rule: mean (norm_bound composes) or remove the block")
            if rule in ("krum", "multikrum") and self.sampling.kind == "uniform":
                n, f = self.sampling.clients_per_round, self.aggregation.byzantine
                if n <= 2 * f + 2:
                    raise ValueError(f"aggregation.byzantine: Krum needs n > 2f + 2 clients per round (got n={n}, f={f}); "
                                     "lower aggregation.byzantine or raise sampling.clients_per_round")
        if compression is not None and compression.kind != "none":
            if self.secure_aggregation is not None and compression.kind != "random_mask":
                raise ValueError(f"compression.kind: {compression.kind} does not compose with secure aggregation (masks "
                                 "need every client to send the same coordinates); use random_mask, the shared mask")
            if self.secure_aggregation is not None and self.strategy.name == "scaffold":
                raise ValueError("compression.kind: the shared random mask does not carry SCAFFOLD's control variates; "
                                 "remove compression or use another strategy")
            if self.privacy is not None:
                raise ValueError("compression.kind: compression with differential privacy is not supported yet; remove one")
            if self.asynchronous is not None:
                raise ValueError("compression.kind: compression is not supported in asynchronous modes yet; remove one")
        if self.adversary is not None and self.data.source in ("shakespeare_lm", "shakespeare_genre", "text"):
            raise ValueError("adversary: attacks are simulated for classification of numeric features; remove the block")
        return self

    @model_validator(mode="after")
    def _language_model(self) -> Scenario:
        """Text sources and language models go together; the adapters are checked on a weightless model."""
        text = self.data.source in ("shakespeare_lm", "shakespeare_genre", "text")
        if text != self.model.is_language_model:
            raise ValueError(f"model.kind: data.source '{self.data.source}' needs "
                             + ("hf_causal_lm or hf_classifier" if text else "a non-text model such as mlp; "
                                "text sources are shakespeare_lm, shakespeare_genre and text"))
        if self.strategy.client_weighting == "tokens" and not text:
            raise ValueError("strategy.client_weighting: tokens weighs clients by text tokens; use samples")
        if text:
            from raysim.models.hf import check_model  # the checks live with the model

            check_model(self.model, seq_len=self.data.seq_len)
        return self

    def _check_privacy(self, privacy: PrivacyConfig) -> None:
        if getattr(self, "asynchronous", None) is not None:
            raise ValueError("privacy: differential privacy is not supported in asynchronous modes yet; remove one of the blocks")
        if privacy.mechanism == "distributed" and self.secure_aggregation is None:
            raise ValueError("privacy.mechanism: distributed DP adds noise under secure aggregation; add a secure_aggregation block")
        if privacy.mechanism != "local" and self.secure_aggregation is not None \
                and privacy.clip_norm > self.secure_aggregation.clip_range:
            raise ValueError("privacy.clip_norm: must be <= secure_aggregation.clip_range so that clipped updates are not "
                             "clipped again and their rounding stays within its norm bound; lower it or raise clip_range")
        if self.strategy.name == "scaffold":
            raise ValueError("privacy.mechanism: SCAFFOLD's control variates are not privatized; use fedavg, fedprox or a server optimizer")
        if privacy.mechanism == "local" and (self.strategy.mu > 0 or privacy.adaptive or privacy.target_epsilon):
            raise ValueError("privacy.mechanism: local DP-SGD supports neither strategy.mu, privacy.adaptive nor "
                             "privacy.target_epsilon yet; remove them or use the central mechanism")
        if privacy.adaptive is not None and privacy.mechanism != "central":
            raise ValueError("privacy.adaptive: adaptive clipping is for the central mechanism")

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
        """
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


_NAMED_FIELD = re.compile(r"^[a-z_][a-z0-9_.]*: ")


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = shown_text(".".join(str(part) for part in first["loc"]))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"{loc}: unknown key; remove it or check its spelling (see `raysim validate --help`)"
    if _NAMED_FIELD.match(msg):
        return msg
    got = first.get("input")
    echoed = "" if isinstance(got, dict) else f" (got {shown(got)})"
    where = loc or "scenario"
    return f"{where}: {msg}{echoed}; fix it in the scenario or with --set {where}=..."


def _check_int_range(value: Any, where: str) -> None:
    """Refuse integers beyond int64, which no count, size or seed can be: unbounded fields such as
    training.batch_size would otherwise take 10^400 and fail deep inside a worker."""
    if isinstance(value, dict):
        for key, child in value.items():
            _check_int_range(child, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for child in value:
            _check_int_range(child, where)
    elif isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        raise ScenarioError(f"{shown_text(where or 'scenario')}: {shown(value)} is beyond any count or size "
                            "(|n| < 2^63); use a realistic value")


def parse_scenario(raw: Any) -> Scenario:
    """Validate a mapping into a Scenario, turning pydantic's report into one line."""
    if not isinstance(raw, dict):
        raise ScenarioError("scenario: the file must hold a YAML mapping of keys to values")
    _check_int_range(raw, "")
    try:
        return Scenario.model_validate(raw)
    except ValidationError as err:
        raise ScenarioError(_format_validation_error(err)) from None


def _safe_yaml(text: str, source: str) -> Any:
    if len(text) > 1_000_000:
        raise ScenarioError(f"{source}: scenario file is larger than 1 MB; a scenario is a short YAML file")
    try:
        _check_depth(text, source)
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ScenarioError(f"{source}: YAML syntax error{where}: {problem}; fix the file") from None
    if node is None:
        raise ScenarioError(f"{source}: the scenario is empty; start from scenarios/quickstart.yaml")
    _check_expansion(node, source)
    try:
        return yaml.SafeLoader(text).get_single_data()
    except Exception as err:  # a tag on the wrong scalar (!!int abc) raises ValueError, TypeError or AttributeError
        problem = getattr(err, "problem", None) or f"{type(err).__name__}: {err}"
        raise ScenarioError(f"{source}: YAML could not be read ({shown_text(str(problem))}); fix the file") from None


def _check_depth(text: str, source: str, limit: int = 32) -> None:
    """Refuse deep nesting while parsing, before composing: PyYAML's parser keeps an explicit stack,
    but its composer and constructor recurse once per level and overflow Python's stack near 1,000."""
    loader = yaml.SafeLoader(text)
    depth = 0
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > limit:
                    raise ScenarioError(f"{source}: YAML nested deeper than {limit} levels; "
                                        "a scenario is at most a few levels deep")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    finally:
        loader.dispose()


def _check_expansion(node: yaml.Node, source: str, budget: int = 10_000) -> None:
    """Refuse alias bombs and absurd nesting before constructing Python objects."""
    seen = 0
    stack = [(node, 0)]
    while stack:
        current, depth = stack.pop()
        seen += 1
        if seen > budget:
            raise ScenarioError(f"{source}: the scenario expands to more than {budget} YAML nodes; remove anchor aliases")
        if depth > 32:
            raise ScenarioError(f"{source}: YAML nested deeper than 32 levels; a scenario is at most a few levels deep")
        if isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                stack.append((key, depth + 1))
                stack.append((value, depth + 1))
        elif isinstance(current, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in current.value)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides; values are parsed as YAML scalars or lists."""
    merged = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ScenarioError(f"--set {shown_text(item)}: expected key.path=value, e.g. --set training.lr=0.1")
        path, text = item.split("=", 1)
        keys = [k for k in path.strip().split(".") if k]
        if not keys:
            raise ScenarioError(f"--set {shown_text(item)}: the key path is empty; use e.g. training.lr=0.1")
        value = _safe_yaml(text, f"--set {shown_text(path)}") if text.strip() else None
        _check_known_path(keys, f"--set {shown_text(path)}")
        node = merged
        for key in keys[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        node[keys[-1]] = value
    return merged


def _check_known_path(keys: list[str], what: str) -> None:
    model: type[BaseModel] | None = Scenario
    for depth, key in enumerate(keys):
        if model is None:
            return  # below a free-form mapping (e.g. secure_aggregation.dropout): any key is allowed
        named = shown_text(".".join(keys[: depth + 1]))
        if key not in model.model_fields:
            raise ScenarioError(f"{what}: unknown key '{named}'; check its spelling")
        model = _submodel(model.model_fields[key].annotation)
        if model is None and depth + 1 < len(keys) and not _is_mapping(_field_type(keys, depth)):
            raise ScenarioError(f"{what}: '{named}' is a value, not a section; check the path")


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as ``X`` or ``X | None``, if there is one."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _field_type(keys: list[str], depth: int) -> Any:
    model: Any = Scenario
    for key in keys[:depth]:
        model = _submodel(model.model_fields[key].annotation)
    return model.model_fields[keys[depth]].annotation


def _is_mapping(annotation: Any) -> bool:
    return any(typing.get_origin(a) is dict or a is dict for a in (annotation, *typing.get_args(annotation)))


def load_scenario(path: str | Path, overrides: list[str] | None = None) -> Scenario:
    """Read, override and validate a scenario file. Raises ScenarioError with one line on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"scenario: file not found: {path}; pass the path to a .yaml scenario")
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as err:
        raise ScenarioError(f"{path}: cannot read the scenario as UTF-8 text ({type(err).__name__}); pass a YAML file") from None
    raw = _safe_yaml(text, str(path))
    if not isinstance(raw, dict):
        raise ScenarioError(f"{path}: the scenario must be a YAML mapping of keys to values")
    raw.setdefault("name", path.stem)
    return parse_scenario(apply_overrides(raw, overrides or []))


def scenario_to_yaml(scenario: Scenario) -> str:
    """The resolved scenario, every default filled in, as YAML."""
    return yaml.safe_dump(scenario.model_dump(mode="json"), sort_keys=False)
