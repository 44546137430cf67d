"""The scenario's blocks: one strict pydantic model per section of a scenario file.

Each block checks what it can see alone (ranges, a field that needs another of the same block, files
that must exist); checks across blocks live on ``Scenario`` (``scenario.py``) and in the feature
table (``compat.py``). ``Distribution`` and ``Availability`` are also what the engine's system model
samples from (``raysim.engine.system_model``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from raysim.errors import ScenarioError, shown_text

TEXT_SOURCES = ("shakespeare_lm", "shakespeare_genre", "text")


def path_exists(path: str, *, file: bool = False) -> bool:
    """``Path.exists`` (or ``is_file``), false rather than an OSError for a name the OS refuses
    (a component over 255 bytes, a path over 4096) or a ValueError for an embedded NUL."""
    try:
        return Path(path).is_file() if file else Path(path).exists()
    except (OSError, ValueError):
        return False


class Strict(BaseModel):
    """A block that refuses unknown keys and cannot be changed once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Strict):
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


class PartitionConfig(Strict):
    """How the training set is split into clients (see ``raysim.data.partition``)."""

    kind: Literal["dirichlet", "iid", "shards", "natural"] = "dirichlet"
    alpha: float = Field(0.5, gt=0.0, description="Dirichlet concentration; small is more skewed")
    min_size: int = Field(1, ge=0)
    balance: bool = False
    shards_per_client: int = Field(2, ge=1)
    max_tries: int = Field(100, ge=1, le=10_000)


class SamplingConfig(Strict):
    """Which clients train each round: a fixed-size uniform draw, or Poisson sampling at ``rate``."""

    kind: Literal["uniform", "poisson"] = "uniform"
    clients_per_round: int = Field(10, ge=1)
    rate: float | None = Field(None, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _rate_for_poisson(self) -> SamplingConfig:
        if self.kind == "poisson" and self.rate is None:
            raise ValueError("sampling.rate: Poisson sampling needs a rate in (0, 1], e.g. 0.01")
        return self


class LoraConfig(Strict):
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


class TinyTransformerConfig(Strict):
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


class ModelConfig(Strict):
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


class TrainingConfig(Strict):
    """Local training on each client."""

    epochs: int = Field(1, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0.0, le=1e3)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    straggler_fraction: float = Field(0.0, ge=0.0, le=1.0, description="sampled clients that run 1..E-1 epochs")
    drop_stragglers: bool = Field(False, description="FedAvg's baseline: stragglers' work is discarded")
    vectorize: bool | Literal["auto"] = Field(
        False, description="train a call's clients together in one batched computation per step (auto: where supported)")

    @model_validator(mode="after")
    def _stragglers_need_epochs(self) -> TrainingConfig:
        if self.straggler_fraction > 0 and self.epochs < 2:
            raise ValueError("training.straggler_fraction: stragglers run 1..E-1 epochs, so training.epochs must be >= 2")
        return self


class StrategyConfig(Strict):
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


class HEConfig(Strict):
    """The homomorphic backend's scheme and security (``secure_aggregation.backend: he``; ``raysim.privacy.he``).

    ``bfv`` encrypts masking's quantized integers, so its sum is exact; ``ckks`` encrypts the clipped floats
    and its sum carries CKKS's approximation error. ``poly_modulus_degree`` null chooses 8192 or 16384 from
    the update size and ``security_bits`` (HE Standard levels; at least 128).
    """

    scheme: Literal["bfv", "ckks"] = "bfv"
    security_bits: int = Field(128, description="128, 192 or 256 bits (HE Standard); lower is refused")
    poly_modulus_degree: Literal[8192, 16384] | None = None
    scale_bits: int = Field(40, ge=20, le=58, description="CKKS's scale 2^s")
    max_ciphertexts: int = Field(512, ge=1, description="refuse updates that pack into more ciphertexts than this")


class SecureAggregationConfig(Strict):
    """Bonawitz et al.'s secure aggregation (SecAgg+ when ``neighbours`` is set) between client and server actors.

    ``backend: he`` sums TenSEAL ciphertexts instead of masked vectors (``he``); its threshold is the fewest
    contributions the decryptor will decrypt a sum of.

    ``threshold`` is a count, a fraction of the round's clients, or null to derive it (with the
    SecAgg+ degree when ``neighbours: auto``) from ``expected_dropout`` and ``corrupt_fraction``.
    ``quant_bits`` null takes the most bits the overflow guard n·2^q < 2^b allows.
    """

    backend: Literal["masking", "he"] = "masking"
    he: HEConfig | None = None
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

    @model_validator(mode="after")
    def _backend(self) -> SecureAggregationConfig:
        if self.backend == "masking":
            if self.he is not None:
                raise ValueError("secure_aggregation.he: only read with backend: he; set backend: he or remove the he block")
            return self
        if self.he is None:
            object.__setattr__(self, "he", HEConfig())  # frozen: the defaults, once
        if self.he.security_bits < 128:
            raise ValueError(f"secure_aggregation.he.security_bits: {self.he.security_bits} bits is below the 128-bit "
                             "minimum; use 128, 192 or 256")
        return self

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, value: int | float | None) -> int | float | None:
        if isinstance(value, float) and not 0.0 < value <= 1.0:
            raise ValueError("secure_aggregation.threshold: a count >= 1 or a fraction in (0, 1] of the round's clients")
        if isinstance(value, int) and value < 1:
            raise ValueError("secure_aggregation.threshold: a count >= 1 or a fraction in (0, 1] of the round's clients")
        return value


class AdaptiveClippingConfig(Strict):
    """Adaptive clipping (Andrew et al. 2021): C follows the ``target_quantile`` of update norms."""

    target_quantile: float = Field(0.5, ge=0.0, le=1.0)
    learning_rate: float = Field(0.2, gt=0.0)
    count_stddev: float | None = Field(None, gt=0.0, description="σ_b; default expected cohort / 20")


class PrivacyConfig(Strict):
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
    control_clip_norm: float | None = Field(None, gt=0.0, description="SCAFFOLD: the clip of each Δc_i (default clip_norm)")
    adaptive: AdaptiveClippingConfig | None = None
    weight_cap: float | None = Field(None, gt=0.0, description="w_k = min(n_k / cap, 1); null weighs users equally")
    noise: Literal["discrete_gaussian", "skellam"] = "discrete_gaussian"


class PersonalizationConfig(Strict):
    """Per-client models that live on the client (``raysim.client.personal``), evaluated per client.

    ``finetune``: FedAvg, then ``finetune_epochs`` of local SGD from the global model when a client is evaluated.
    ``fedper``: ``personal_layers`` (module names; default the head) never leave the client. ``ditto``: a
    personal model pulled towards the global one by λ/2·‖v − w‖² (``lam``). ``apfl``: a personal model mixed
    with the global one, α·v + (1 − α)·w (``alpha``). ``personal_epochs`` (default ``training.epochs``) is the
    length of Ditto's and APFL's personal pass.
    """

    method: Literal["finetune", "fedper", "ditto", "apfl"]
    finetune_epochs: int = Field(1, ge=0)
    personal_layers: list[str] | None = Field(None, min_length=1)
    lam: float = Field(0.1, ge=0.0, description="Ditto's λ")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="APFL's mixing weight α")
    personal_epochs: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _layers(self) -> PersonalizationConfig:
        if self.personal_layers is not None and self.method != "fedper":
            raise ValueError(f"personalization.personal_layers: only fedper keeps layers personal ({self.method} "
                             "personalizes the whole model); remove it or set method: fedper")
        return self


class EvaluationConfig(Strict):
    """Central evaluation on the test set every ``every`` rounds, and optional federated evaluation."""

    every: int = Field(1, ge=1)
    federated: bool = False
    federated_clients: int = Field(20, ge=1)
    holdout_fraction: float = Field(0.2, gt=0.0, lt=1.0)

    @property
    def held_out(self) -> float:
        """The share of each client's samples it never trains on: ``holdout_fraction`` under federated evaluation."""
        return self.holdout_fraction if self.federated else 0.0


class ExecutorConfig(Strict):
    """The worker pool. One worker actor is one execution slot, never one client."""

    num_workers: int | Literal["auto"] = "auto"
    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    clients_per_call: int = Field(5, ge=1, description="clients trained per Ray call; fixes the reduction order")
    calls_in_flight: int = Field(2, ge=1, description="async steps: calls queued per worker so it never idles (a sync round sends one call per worker)")
    max_worker_failures: int = Field(100, ge=0, description="worker deaths survived before the run stops")
    vectorize_memory_mb: float = Field(
        512.0, gt=0.0, description="memory a worker's stacked clients may take under training.vectorize")

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


class TrackingConfig(Strict):
    """Where metrics go: JSONL always, W&B when its mode resolves to online or offline."""

    wandb: Literal["online", "offline", "disabled"] | None = None
    project: str = "raysim"
    group: str | None = None
    progress: bool = True


class OutputConfig(Strict):
    """Where the run folder goes: ``dir``/``name``."""

    dir: str = "results"
    overwrite: bool = False


class Distribution(Strict):
    """A positive per-client quantity from a seeded distribution: constant(value), uniform(low, high),
    lognormal(mean, sigma) or exponential(mean).

    For the lognormal, ``mean`` is the mean of the values themselves (not of their logarithm): the
    underlying normal has μ = ln(mean) − σ²/2. ``kind`` is checked by :meth:`check`, which names the
    scenario field, rather than by the schema, so that the engine can build one from any kind.
    """

    kind: str = Field("constant", description="constant, uniform, lognormal or exponential")
    value: float | None = None
    low: float | None = None
    high: float | None = None
    mean: float | None = None
    sigma: float | None = None

    def __init__(self, kind: str = "constant", **params: Any) -> None:
        super().__init__(kind=kind, **params)

    def check(self, field: str, unit: str) -> None:
        """Raise ScenarioError naming ``field`` unless every draw is a positive number."""
        params = {"constant": ("value",), "uniform": ("low", "high"), "lognormal": ("mean", "sigma"),
                  "exponential": ("mean",)}
        if self.kind not in params:
            raise ScenarioError(f"{field}.kind: must be one of {', '.join(params)} (got {self.kind!r})")
        for name in params[self.kind]:
            v = getattr(self, name)
            if v is None:
                raise ScenarioError(f"{field}.{name}: required for a {self.kind} distribution")
            floor_ok = v >= 0 if name == "sigma" else v > 0
            if not (math.isfinite(v) and floor_ok):
                bound = ">= 0" if name == "sigma" else f"a positive number of {unit}"
                raise ScenarioError(f"{field}.{name}: must be {bound} (got {v})")
        if self.kind == "uniform" and self.high < self.low:
            raise ScenarioError(f"{field}.high: must be >= {field}.low (got low {self.low}, high {self.high})")

    def sample(self, ids: np.ndarray, uniforms: Callable[[int], np.ndarray]) -> np.ndarray:
        """Each client's value by inverse CDF; ``uniforms(k)`` is the k-th U(0, 1) draw of every id
        (the lognormal takes two, through Box–Muller; a constant takes none)."""
        if self.kind == "constant":
            return np.full(ids.shape, float(self.value))
        u = uniforms(0)
        if self.kind == "uniform":
            return self.low + (self.high - self.low) * u
        if self.kind == "exponential":
            return -self.mean * np.log(u)
        u2 = uniforms(1)
        z = np.sqrt(-2.0 * np.log(u)) * np.cos(2.0 * np.pi * u2)  # Box–Muller
        return np.exp(math.log(self.mean) - 0.5 * self.sigma**2 + self.sigma * z)


class Availability(Strict):
    """When a client can take a task: with ``probability`` per round (per dispatch in async modes), and,
    when both are set, only inside periodic windows of ``on_s`` seconds online then ``off_s`` offline,
    each client's period shifted by a seeded phase."""

    probability: float = 1.0
    on_s: float | None = None
    off_s: float | None = None

    def check(self) -> None:
        """Raise ScenarioError naming the field unless the probability and the windows make sense."""
        if not 0.0 <= self.probability <= 1.0:
            raise ScenarioError(f"system.availability.probability: must be in [0, 1] (got {self.probability})")
        if (self.on_s is None) != (self.off_s is None):
            raise ScenarioError("system.availability: set both on_s and off_s for on/off windows, or neither")
        if self.on_s is not None:
            if not (math.isfinite(self.on_s) and self.on_s > 0):
                raise ScenarioError(f"system.availability.on_s: must be a positive number of seconds (got {self.on_s})")
            if not (math.isfinite(self.off_s) and self.off_s >= 0):
                raise ScenarioError(f"system.availability.off_s: must be >= 0 seconds (got {self.off_s})")


class SystemConfig(Strict):
    """Client devices in virtual time (``raysim.engine.system_model``); no real sleeps anywhere.

    A client's task lasts model_bytes/down_bw + samples·epochs/speed + model_bytes/up_bw virtual
    seconds; a bandwidth left out is unlimited. ``trace`` (CSV ``client_id,speed,up_bw,down_bw``
    [``,avail_start,avail_end``]) overrides the distributions. Synchronous rounds sample
    ⌈K·over_selection⌉ clients and keep the first K finishers (FedScale, Lai et al. 2022) that
    beat ``deadline_s``; the slowest kept client sets the round's virtual seconds.
    """

    speed: Distribution | None = Field(None, description="training samples per second")
    up_bw: Distribution | None = Field(None, description="uplink bytes per second")
    down_bw: Distribution | None = Field(None, description="downlink bytes per second")
    availability: Availability = Availability()
    dropout: float = Field(0.0, description="probability that a client abandons a task it started")
    trace: str | None = None
    over_selection: float = 1.0
    deadline_s: float | None = None

    @model_validator(mode="after")
    def _checked(self) -> SystemConfig:
        if self.speed is None and self.trace is None:
            raise ValueError("system.speed: required unless system.trace gives per-client speeds; "
                             "e.g. speed: {kind: lognormal, mean: 100, sigma: 1}")
        for field, dist, unit in (("system.speed", self.speed, "samples/s"), ("system.up_bw", self.up_bw, "bytes/s"),
                                  ("system.down_bw", self.down_bw, "bytes/s")):
            if dist is not None:
                dist.check(field, unit)
        self.availability.check()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"system.dropout: must be in [0, 1) (got {self.dropout}); it is a per-task probability")
        if self.trace is not None and not path_exists(self.trace, file=True):
            raise ValueError(f"system.trace: file not found: {shown_text(self.trace)}; check the path")
        if not (math.isfinite(self.over_selection) and self.over_selection >= 1.0):
            raise ValueError(f"system.over_selection: must be >= 1 (got {self.over_selection}); FedScale uses 1.3")
        if self.deadline_s is not None and not (self.deadline_s > 0):
            raise ValueError(f"system.deadline_s: must be a positive number of seconds (got {self.deadline_s})")
        return self


class StalenessConfig(Strict):
    """The staleness function s(d) of Xie et al. 2019, §5.2: constant, polynomial (d + 1)^(−a), or hinge
    (1 up to d = b, then 1/(a(d − b) + 1)). The default, polynomial with a = 0.5, is FedBuff's 1/√(1 + d)."""

    kind: Literal["constant", "polynomial", "hinge"] = "polynomial"
    a: float = Field(0.5, ge=0.0, allow_inf_nan=False)
    b: float = Field(4.0, ge=0.0, allow_inf_nan=False)


class AsyncConfig(Strict):
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

    @property
    def step_updates(self) -> int:
        """The updates one server step aggregates: FedBuff's K, FedAsync's one."""
        return self.buffer_size if self.mode == "fedbuff" else 1


class CheckpointConfig(Strict):
    """Checkpoints every ``every`` rounds (server steps in async modes), and on SIGINT or SIGTERM."""

    every: int = Field(10, ge=1, description="rounds between checkpoints")
    keep: int = Field(2, ge=1, description="how many of the newest checkpoints to keep")


class FaultsConfig(Strict):
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


class AggregationConfig(Strict):
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


class CompressionConfig(Strict):
    """Client → server compression of each update, with optional error feedback."""

    kind: Literal["none", "topk", "randk", "random_mask", "quantize", "sign"] = "none"
    fraction: float = Field(0.01, gt=0.0, le=1.0, description="top-k, random-k, random mask: fraction kept")
    bits: int = Field(8, ge=1, le=16, description="quantize: bits per coordinate")
    stochastic: bool = Field(True, description="quantize: unbiased stochastic rounding")
    error_feedback: bool = Field(False, description="keep each client's residual and add it next time")


class DownlinkConfig(Strict):
    """Server → client compression of the broadcast model (``raysim.compression.downlink``).

    ``of: model`` quantizes the whole model every round; ``of: delta`` sends the change of the clients'
    replica, with error feedback on the server.
    """

    of: Literal["model", "delta"] = "delta"
    kind: Literal["quantize", "topk", "randk", "sign"] = "quantize"
    fraction: float = Field(0.1, gt=0.0, le=1.0, description="top-k, random-k: fraction kept")
    bits: int = Field(8, ge=1, le=16, description="quantize: bits per coordinate")
    stochastic: bool = Field(True, description="quantize: unbiased stochastic rounding")

    @model_validator(mode="after")
    def _whole_model(self) -> DownlinkConfig:
        if self.of == "model" and self.kind != "quantize":
            raise ValueError(f"downlink.kind: a model sent whole needs every coordinate, which only quantize keeps "
                             f"(got {self.kind}); use kind: quantize, or of: delta")
        return self


class LeakageConfig(Strict):
    """The leakage lab (``raysim.adversary.lab``): the rounds whose server view is written to the run folder
    for ``raysim attack``."""

    rounds: list[int] = Field(default_factory=lambda: [1], min_length=1)

    @field_validator("rounds")
    @classmethod
    def _rounds(cls, value: list[int]) -> list[int]:
        if any(r < 1 for r in value):
            raise ValueError(f"leakage.rounds: rounds are numbered from 1 (got {value})")
        return value


class AdversaryConfig(Strict):
    """A seeded fraction of malicious clients and the attack they run."""

    fraction: float = Field(0.1, ge=0.0, lt=1.0)
    attack: Literal["sign_flip", "scaling", "noise", "label_flip", "backdoor"] = "sign_flip"
    scale: float = Field(10.0, gt=0.0, description="sign_flip and scaling: the factor applied")
    noise_std: float = Field(1.0, gt=0.0, description="noise: std of the Gaussian that replaces the update")
    target_label: int = Field(0, ge=0, description="backdoor: the label the trigger maps to")
    trigger_size: int = Field(3, ge=1, description="backdoor: trigger features (or square side for images)")
    trigger_value: float = Field(3.0, description="backdoor: the trigger's feature value")
    poison_fraction: float = Field(0.5, gt=0.0, le=1.0, description="backdoor: share of a client's samples poisoned")
