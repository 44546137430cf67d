"""The feature-compatibility table: every pair of features a scenario may not combine, and why.

One ``Exclusion`` per refused combination. ``kind`` says whether the two are incompatible by nature
(``nature``: e.g. a robust rule needs individual updates, which secure aggregation hides) or could
work but are not built yet (``not_built``). ``Scenario``'s one compatibility validator raises the
message of the first row whose ``applies`` holds, ``"<field>: <reason>; <fix>"``; the rows keep the
order of the checks they replaced, so a scenario that combines several pairs hears of the same one
first. A requirement (one feature needs another) is the first feature combined with the second's
absence.

``example`` is a minimal set of dotted overrides that, on top of ``scenarios/quickstart.yaml``,
combines exactly that row's two features. The tests, the fuzz harness (``raysim.fuzz``) and the
README's matrix (``markdown``) are all generated from this table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

from raysim.config.blocks import TEXT_SOURCES

if TYPE_CHECKING:
    from raysim.config.scenario import Scenario

Kind = Literal["nature", "not_built"]
KIND_TITLES: dict[str, str] = {"nature": "Incompatible by nature", "not_built": "Not built yet"}


@dataclass(frozen=True)
class Exclusion:
    """One refused combination of two features."""

    features: tuple[str, str]
    kind: Kind
    field: str
    reason: str
    fix: str
    applies: Callable[[Scenario], bool]
    example: dict[str, Any]

    @property
    def message(self) -> str:
        """The one-line error a scenario that combines the two features gets."""
        return f"{self.field}: {self.reason}; {self.fix}"

    @property
    def overrides(self) -> list[str]:
        """``example`` as ``--set`` arguments (``key.path=value``, the value as JSON)."""
        return [f"{key}={json.dumps(value)}" for key, value in self.example.items()]


def _async(s: Scenario) -> bool:
    return s.asynchronous is not None


def _async_mode(s: Scenario, mode: str) -> bool:
    return s.asynchronous is not None and s.asynchronous.mode == mode


def _dp(s: Scenario, *mechanisms: str) -> bool:
    return s.privacy is not None and (not mechanisms or s.privacy.mechanism in mechanisms)


def _robust(s: Scenario) -> bool:
    return s.aggregation.rule != "mean"


def _compression(s: Scenario, *kinds: str) -> bool:
    kind = "none" if s.compression is None else s.compression.kind
    return kind in kinds if kinds else kind != "none"


def _he(s: Scenario) -> bool:
    return s.secure_aggregation is not None and s.secure_aggregation.backend == "he"


HE_PHASES = ("masked_input", "unmasking")  # the he backend's upload and decryption


def _text(s: Scenario) -> bool:
    return s.data.source in TEXT_SOURCES


# What the vectorized trainer (``raysim.client.vectorized``) cannot train yet: (feature, applies, why, example).
# ``training.vectorize: true`` refuses these rows; ``auto`` falls back to one client at a time, naming the row.
VECTORIZE_LIMITS: tuple[tuple[str, Callable[[Scenario], bool], str, dict[str, Any]], ...] = (
    ("a transformers model", lambda s: s.model.is_language_model,
     "a transformers model: the stacked trainer covers the model zoo (logreg, mlp, cnn), not LoRA adapters "
     "inside a transformers forward",
     {"data.source": "shakespeare_lm", "model.kind": "hf_causal_lm"}),
    ("local DP-SGD with FedProx or SCAFFOLD",
     lambda s: s.privacy is not None and s.privacy.mechanism == "local" and (s.strategy.mu > 0 or s.strategy.name == "scaffold"),
     "local DP-SGD with FedProx or SCAFFOLD: the stacked DP-SGD trainer does not add the strategy's per-step term",
     {"privacy.mechanism": "local", "strategy.name": "scaffold"}),
    ("personalization", lambda s: s.personalization is not None,
     "personalization: the stacked trainer does not start clients from their own layers or run personal passes",
     {"personalization.method": "fedper", "evaluation.federated": True}),
)


def vectorize_choice(s: Scenario) -> tuple[bool, str]:
    """Whether ``s`` trains its clients vectorized, and why: ``training.vectorize`` against ``VECTORIZE_LIMITS``."""
    if s.training.vectorize is False:
        return False, "training.vectorize is false"
    for feature, applies, _, _ in VECTORIZE_LIMITS:
        if applies(s):
            return False, f"training.vectorize: auto, and the scenario has {feature}, which is not vectorized yet"
    setting = "true" if s.training.vectorize is True else "auto"
    return True, f"training.vectorize: {setting}; model.kind {s.model.kind} and every stage of the pipeline support it"


_SYSTEM = {"system.speed": {"kind": "constant", "value": 100}}
_FEDBUFF = {**_SYSTEM, "asynchronous.mode": "fedbuff"}
_FEDASYNC = {**_SYSTEM, "asynchronous.mode": "fedasync"}
_ROBUST_FIX = "use rule: mean (norm_bound composes) or remove the block"

ROWS: tuple[Exclusion, ...] = (
    Exclusion(("over-selection", "Poisson sampling"), "nature", "system.over_selection",
              "keeping the first K of ⌈K·over_selection⌉ clients needs sampling.kind: uniform",
              "set over_selection: 1 for Poisson sampling",
              lambda s: s.over_selected and s.sampling.kind != "uniform",
              {**_SYSTEM, "system.over_selection": 1.3, "sampling.kind": "poisson", "sampling.rate": 0.05}),
    Exclusion(("asynchronous modes", "no system block"), "nature", "asynchronous",
              "updates are ordered by virtual client durations",
              "add a system block, e.g. system: {speed: {kind: lognormal, mean: 100, sigma: 1}}",
              lambda s: _async(s) and s.system is None,
              {"asynchronous.mode": "fedbuff", "system": None}),
    Exclusion(("asynchronous modes", "over-selection"), "nature", "system.over_selection",
              "over-selection shapes synchronous rounds, and async modes keep asynchronous.concurrency clients "
              "in flight instead", "set it to 1 or remove the asynchronous block",
              lambda s: _async(s) and s.system is not None and s.system.over_selection != 1.0,
              {**_FEDBUFF, "system.over_selection": 1.3}),
    Exclusion(("asynchronous modes", "a round deadline"), "nature", "system.deadline_s",
              "a deadline ends a synchronous round, and async modes have no rounds",
              "remove it or the asynchronous block",
              lambda s: _async(s) and s.system is not None and s.system.deadline_s is not None,
              {**_FEDBUFF, "system.deadline_s": 60}),
    Exclusion(("asynchronous modes", "SCAFFOLD"), "not_built", "strategy.name",
              "scaffold's control variates assume synchronous rounds, and no asynchronous variant is built",
              "use fedavg, fedprox or a server optimizer with asynchronous modes",
              lambda s: _async(s) and s.strategy.name == "scaffold",
              {**_FEDBUFF, "strategy.name": "scaffold"}),
    Exclusion(("FedAsync", "a server optimizer"), "nature", "strategy.name",
              "fedasync's mixing replaces the server update, so a server optimizer cannot apply",
              "use fedavg or fedprox, or asynchronous.mode: fedbuff",
              lambda s: _async_mode(s, "fedasync") and s.strategy.name not in ("fedavg", "fedprox"),
              {**_FEDASYNC, "strategy.name": "fedadam"}),
    Exclusion(("FedAsync", "secure aggregation"), "nature", "secure_aggregation",
              "fedasync steps with one update at a time, and a secure sum of one update is that update",
              "use asynchronous.mode: fedbuff, whose buffer of K updates is the sum (once built), or remove it",
              lambda s: _async_mode(s, "fedasync") and s.secure_aggregation is not None,
              {**_FEDASYNC, "secure_aggregation": {}}),
    Exclusion(("the he backend", "the SecAgg+ graph"), "nature", "secure_aggregation.neighbours",
              "the he backend has no pairwise masks, so no graph to thin", "set neighbours: null",
              lambda s: _he(s) and s.secure_aggregation.neighbours is not None,
              {"secure_aggregation": {"backend": "he", "neighbours": 4}}),
    Exclusion(("the he backend", "the consistency check"), "nature", "secure_aggregation.consistency_check",
              "the he backend has no unmasking of pairwise masks for a malicious server to split, and its trust rests "
              "on the key authority and the clients holding the secret key (README)", "set consistency_check: false",
              lambda s: _he(s) and s.secure_aggregation.consistency_check,
              {"secure_aggregation": {"backend": "he", "consistency_check": True}}),
    Exclusion(("the he backend", "dropouts in masking's key-setup phases"), "nature", "secure_aggregation.dropout",
              "the he backend has no key-setup phases: only masked_input (the upload of ciphertexts) and unmasking "
              "(decryption)", "drop clients in masked_input or unmasking",
              lambda s: _he(s) and any(p not in HE_PHASES for p in (*s.secure_aggregation.dropout,
                                                                     *s.secure_aggregation.schedule)),
              {"secure_aggregation": {"backend": "he", "dropout": {"share_keys": 0.1}}}),
    Exclusion(("CKKS", "distributed DP"), "not_built", "secure_aggregation.he.scheme",
              "distributed DP adds discrete noise, which needs an exact integer sum (masking's or BFV's), "
              "and continuous noise inside a CKKS sum is not built", "use he.scheme: bfv",
              lambda s: _he(s) and s.secure_aggregation.he.scheme == "ckks" and _dp(s, "distributed"),
              {"secure_aggregation": {"backend": "he", "he": {"scheme": "ckks"}}, "privacy.mechanism": "distributed"}),
    Exclusion(("the shared random mask", "FedBuff under secure aggregation"), "not_built", "compression.kind",
              "a secure FedBuff buffer mixes clients of several model versions, whose shared masks differ",
              "remove compression",
              lambda s: _compression(s, "random_mask") and _async(s) and s.secure_aggregation is not None,
              {**_FEDBUFF, "secure_aggregation": {}, "compression.kind": "random_mask"}),
    Exclusion(("secure aggregation diagnostics", "asynchronous modes"), "not_built", "secure_aggregation.diagnostics",
              "the plain-sum diagnostics are built for synchronous rounds only", "set diagnostics: false",
              lambda s: _async(s) and s.secure_aggregation is not None and s.secure_aggregation.diagnostics,
              {**_FEDBUFF, "secure_aggregation": {"diagnostics": True}}),
    Exclusion(("asynchronous modes", "stragglers"), "not_built", "training.straggler_fraction",
              "async modes model slow clients with system.speed, and partial epochs are not built for them",
              "set it to 0",
              lambda s: _async(s) and s.training.straggler_fraction > 0,
              {**_FEDBUFF, "training.straggler_fraction": 0.5}),
    Exclusion(("SCAFFOLD", "Adam or momentum in local training"), "nature", "strategy.name",
              "scaffold's control variates assume plain local SGD",
              "set training.optimizer: sgd and training.momentum: 0",
              lambda s: s.strategy.name == "scaffold" and (s.training.optimizer != "sgd" or s.training.momentum > 0),
              {"strategy.name": "scaffold", "training.optimizer": "adam"}),
    Exclusion(("central DP", "FedAsync"), "not_built", "privacy.mechanism",
              "central DP in fedasync (one update a server step) is not built yet",
              "use asynchronous.mode: fedbuff (DP-FedBuff), or privacy.mechanism: local",
              lambda s: _dp(s, "central") and _async_mode(s, "fedasync"),
              {**_FEDASYNC, "privacy.mechanism": "central"}),
    Exclusion(("adaptive clipping", "asynchronous modes"), "not_built", "privacy.adaptive",
              "adaptive clipping in asynchronous modes is not built yet", "remove privacy.adaptive",
              lambda s: s.privacy is not None and s.privacy.adaptive is not None and _async(s),
              {**_FEDBUFF, "privacy.mechanism": "central", "privacy.adaptive": {}}),
    Exclusion(("distributed DP", "no secure aggregation"), "nature", "privacy.mechanism",
              "distributed DP adds noise under secure aggregation", "add a secure_aggregation block",
              lambda s: _dp(s, "distributed") and s.secure_aggregation is None,
              {"privacy.mechanism": "distributed", "secure_aggregation": None}),
    Exclusion(("DP-SCAFFOLD", "secure aggregation"), "not_built", "strategy.name",
              "under DP the secure ring vector holds the clipped update's d words alone, and a noised sum of "
              "SCAFFOLD's control deltas inside it is not built",
              "remove secure_aggregation (central DP-SCAFFOLD noises both sums on the server)",
              lambda s: _dp(s, "central", "distributed") and s.strategy.name == "scaffold" and s.secure_aggregation is not None,
              {"privacy.mechanism": "central", "strategy.name": "scaffold", "secure_aggregation": {}}),
    Exclusion(("local DP-SGD", "adaptive clipping"), "not_built", "privacy.mechanism",
              "local DP-SGD with adaptive clipping (privacy.adaptive) is not built yet",
              "remove privacy.adaptive or use the central mechanism",
              lambda s: _dp(s, "local") and s.privacy.adaptive is not None,
              {"privacy.mechanism": "local", "privacy.adaptive": {}}),
    Exclusion(("local DP-SGD with a target ε", "asynchronous modes"), "not_built", "privacy.target_epsilon",
              "the solve bounds a client's steps by one training a round, and an async client may train more often "
              "than once a server step", "set privacy.noise_multiplier instead",
              lambda s: _dp(s, "local") and s.privacy.target_epsilon is not None and _async(s),
              {**_FEDBUFF, "privacy.mechanism": "local", "privacy.target_epsilon": 5.0}),
    Exclusion(("local DP-SGD", "a budget stop"), "not_built", "privacy.budget_epsilon",
              "a per-client budget check for local DP-SGD is not built (privacy.target_epsilon solves z so that no "
              "client can exceed it)", "remove privacy.budget_epsilon and set privacy.target_epsilon",
              lambda s: _dp(s, "local") and s.privacy.budget_epsilon is not None,
              {"privacy.mechanism": "local", "privacy.budget_epsilon": 5.0}),
    Exclusion(("adaptive clipping", "distributed DP"), "not_built", "privacy.adaptive",
              "adaptive clipping is for the central mechanism (its private count of clipped updates is not built "
              "under secure aggregation)", "remove privacy.adaptive or set privacy.mechanism: central",
              lambda s: _dp(s, "distributed") and s.privacy.adaptive is not None,
              {"privacy.mechanism": "distributed", "privacy.adaptive": {}, "secure_aggregation": {}}),
    Exclusion(("a CNN", "non-image data"), "nature", "model.kind",
              "'cnn' needs image-shaped data", "use data.source: digits, an npz or a table of images, or another model",
              lambda s: s.model.kind == "cnn" and s.data.source not in ("digits", "npz", "table"),
              {"data.source": "synthetic", "model.kind": "cnn"}),
    Exclusion(("a robust rule", "secure aggregation"), "nature", "aggregation.rule",
              "a robust rule needs individual updates, but the server only ever sees the sum with "
              "secure_aggregation", _ROBUST_FIX,
              lambda s: _robust(s) and s.secure_aggregation is not None,
              {"aggregation.rule": "median", "secure_aggregation": {}}),
    Exclusion(("a robust rule", "differential privacy"), "not_built", "aggregation.rule",
              "a robust rule needs individual updates, but DP's sensitivity analysis assumes the mean with privacy",
              _ROBUST_FIX,
              lambda s: _robust(s) and s.privacy is not None,
              {"aggregation.rule": "median", "privacy.mechanism": "central"}),
    Exclusion(("a robust rule", "FedAsync"), "nature", "aggregation.rule",
              "a robust rule needs a set of updates, but fedasync mixes each update in alone as it arrives",
              _ROBUST_FIX,
              lambda s: _robust(s) and _async_mode(s, "fedasync"),
              {**_FEDASYNC, "aggregation.rule": "median"}),
    Exclusion(("top-k or random-k compression", "secure aggregation"), "nature", "compression.kind",
              "topk and randk do not compose with secure aggregation (masks need every client to send the same "
              "coordinates)", "use random_mask, the shared mask",
              lambda s: _compression(s, "topk", "randk") and s.secure_aggregation is not None,
              {"compression.kind": "topk", "secure_aggregation": {}}),
    Exclusion(("quantize or sign compression", "secure aggregation"), "not_built", "compression.kind",
              "quantize and sign are not built to encode into secure aggregation's ring, which already quantizes "
              "with its own range", "use random_mask, the shared mask, or remove compression",
              lambda s: _compression(s, "quantize", "sign") and s.secure_aggregation is not None,
              {"compression.kind": "quantize", "secure_aggregation": {}}),
    Exclusion(("the shared random mask", "SCAFFOLD under secure aggregation"), "not_built", "compression.kind",
              "the shared random mask does not carry SCAFFOLD's control variates",
              "remove compression or use another strategy",
              lambda s: _compression(s, "random_mask") and s.secure_aggregation is not None
              and s.strategy.name == "scaffold",
              {"compression.kind": "random_mask", "secure_aggregation": {}, "strategy.name": "scaffold"}),
    Exclusion(("downlink compression", "asynchronous modes"), "not_built", "downlink",
              "async clients start from the model version they are launched at, and a compressed broadcast per "
              "version is not built", "remove the downlink block",
              lambda s: s.downlink is not None and _async(s),
              {**_FEDBUFF, "downlink": {}}),
    Exclusion(("the leakage lab", "text data"), "not_built", "leakage",
              "gradient inversion and membership inference are built for classification of numeric or image samples",
              "remove the block",
              lambda s: s.leakage is not None and (_text(s) or s.model.is_language_model),
              {"data.source": "shakespeare_lm", "model.kind": "hf_causal_lm", "leakage.rounds": [1]}),
    Exclusion(("the leakage lab", "asynchronous modes"), "not_built", "leakage",
              "recording the server's view is built for synchronous rounds only", "remove the block",
              lambda s: s.leakage is not None and _async(s),
              {**_FEDBUFF, "leakage.rounds": [1]}),
    Exclusion(("attacks", "text data"), "not_built", "adversary",
              "attacks are simulated for classification of numeric features", "remove the block",
              lambda s: s.adversary is not None and _text(s),
              {"data.source": "shakespeare_lm", "model.kind": "hf_causal_lm", "adversary.attack": "sign_flip"}),
    Exclusion(("text data", "a non-language model"), "nature", "model.kind",
              "text sources (shakespeare_lm, shakespeare_genre, text) hold tokens, which only hf_causal_lm and "
              "hf_classifier read", "set model.kind: hf_causal_lm or hf_classifier",
              lambda s: _text(s) and not s.model.is_language_model,
              {"data.source": "shakespeare_lm", "model.kind": "mlp"}),
    Exclusion(("a language model", "numeric data"), "nature", "model.kind",
              "hf_causal_lm and hf_classifier read tokens, which numeric sources do not hold",
              "use a non-text model such as mlp, or a text source: shakespeare_lm, shakespeare_genre or text",
              lambda s: s.model.is_language_model and not _text(s),
              {"data.source": "synthetic", "model.kind": "hf_classifier"}),
    *(Exclusion(("vectorized training", feature), "not_built", "training.vectorize",
                f"true cannot vectorize {reason}",
                "set training.vectorize: auto (it falls back to one client at a time) or false",
                lambda s, applies=applies: s.training.vectorize is True and applies(s), {"training.vectorize": True, **example})
      for feature, applies, reason, example in VECTORIZE_LIMITS),
    Exclusion(("personalization", "no federated evaluation"), "nature", "evaluation.federated",
              "personalized models are evaluated per client, on each client's held-out split",
              "set evaluation.federated: true",
              lambda s: s.personalization is not None and not s.evaluation.federated,
              {"personalization.method": "ditto", "evaluation.federated": False}),
    Exclusion(("personalization", "SCAFFOLD"), "not_built", "strategy.name",
              "scaffold's control variates would also steer the personal layers and models, and that variant is not "
              "built", "use fedavg, fedprox or a server optimizer",
              lambda s: s.personalization is not None and s.strategy.name == "scaffold",
              {"personalization.method": "fedper", "evaluation.federated": True, "strategy.name": "scaffold"}),
    Exclusion(("FedPer", "FedProx"), "not_built", "personalization.method",
              "fedprox's proximal term would pull fedper's personal layers towards the global ones, and a term over "
              "the shared layers only is not built", "set strategy.mu: 0 or use ditto, whose pull is personal",
              lambda s: s.personalization is not None and s.personalization.method == "fedper" and s.strategy.mu > 0,
              {"personalization.method": "fedper", "evaluation.federated": True, "strategy.name": "fedprox",
               "strategy.mu": 0.1}),
    Exclusion(("personalization", "a language model"), "not_built", "personalization",
              "personal layers of a transformers model (its LoRA adapters) are not built yet", "remove the block",
              lambda s: s.personalization is not None and s.model.is_language_model,
              {"data.source": "shakespeare_lm", "model.kind": "hf_causal_lm", "personalization.method": "finetune",
               "evaluation.federated": True}),
    Exclusion(("token weighting", "numeric data"), "nature", "strategy.client_weighting",
              "tokens weighs clients by their text tokens, which numeric sources do not have", "use samples",
              lambda s: s.strategy.client_weighting == "tokens" and not _text(s),
              {"data.source": "synthetic", "model.kind": "mlp", "strategy.client_weighting": "tokens"}),
)


def markdown() -> str:
    """The table as the README shows it: one Markdown table per kind, rows in table order."""
    lines = []
    for kind, title in KIND_TITLES.items():
        lines += [f"**{title}**", "", "| feature | with | field named | why |", "|---|---|---|---|"]
        lines += [f"| {row.features[0]} | {row.features[1]} | `{row.field}` | {row.reason.replace('|', '/')} |"
                  for row in ROWS if row.kind == kind]
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"
