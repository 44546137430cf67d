"""transformers language models with peft LoRA adapters, as modules the engine trains like any other.

A model is either the offline tiny one built from ``model.tiny`` (Llama-style for ``hf_causal_lm``,
BERT-style for ``hf_classifier``) or a checkpoint loaded with ``from_pretrained`` from a local folder,
the Hugging Face cache, or the Hub when online. LoRA (Hu et al., ICLR 2022) adds W = W₀ + (α/r)·B·A
to the target layers and freezes everything else, so the flat vector the engine exchanges (FlatParams
takes ``requires_grad`` parameters only) holds the adapters and, optionally, the head. The base
weights are built once per process from ``model.init_seed`` and never move.

``lora_aggregation: ffa`` is FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated
Learning", ICLR 2024): A stays at its seeded random init and only B trains, so the update
ΔW = (α/r)·B·A is linear in B and averaging the clients' B is exactly averaging their ΔW.

The wrappers take int token ids right-padded with -1 (never a real id) and return what the task's
loss needs: a classifier returns logits; a causal LM returns each sequence's mean next-token
negative log-likelihood, a per-sample loss as DP-SGD's per-sample clipping requires.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import warnings
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import torch
from torch import nn

from raysim.config import ModelConfig, path_exists
from raysim.errors import ScenarioError, first_line, shown_text
from raysim.models.tokenizer import BOS, EOS, PAD, model_vocab_size

_FIELD = "model.name_or_path"


class SequenceClassifier(nn.Module):
    """Token ids (B, T), -1 padded, to class logits (B, C)."""

    def __init__(self, model: nn.Module, pad_id: int, bf16: bool) -> None:
        super().__init__()
        self.model, self.pad_id, self.bf16 = model, pad_id, bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = x >= 0
        ids = torch.where(mask, x, self.pad_id).long()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(input_ids=ids, attention_mask=mask.long()).logits.float()


class CausalLM(nn.Module):
    """Token ids (B, T), -1 padded, to each sequence's mean next-token NLL (B,)."""

    def __init__(self, model: nn.Module, pad_id: int, bf16: bool) -> None:
        super().__init__()
        self.model, self.pad_id, self.bf16 = model, pad_id, bf16

    def _token_nll(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(NLL of each next token (B, T−1), target mask (B, T−1), logits (B, T−1, V))."""
        mask = x >= 0
        ids = torch.where(mask, x, self.pad_id).long()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits
        logits = logits[:, :-1].float()
        targets, target_mask = ids[:, 1:], mask[:, 1:]
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        return nll.view_as(targets) * target_mask, target_mask, logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nll, target_mask, _ = self._token_nll(x)
        return nll.sum(1) / target_mask.sum(1).clamp(min=1)

    @torch.no_grad()
    def token_stats(self, x: torch.Tensor) -> tuple[float, int, int]:
        """(summed NLL, correctly predicted next tokens, predicted tokens) over the batch."""
        nll, target_mask, logits = self._token_nll(x)
        correct = ((logits.argmax(-1) == x[:, 1:]) & target_mask).sum()
        return float(nll.sum()), int(correct), int(target_mask.sum())


def build_hf_model(config: ModelConfig, seq_len: int, num_labels: int, device: torch.device | None = None) -> nn.Module:
    """The wrapped model for ``config``; every random part is a fixed function of ``config.init_seed``."""
    bf16 = _use_bf16(config, device)
    with _quiet_transformers(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed)
        base = _base_model(config, seq_len, num_labels, torch.bfloat16 if bf16 else torch.float32)
        pad_id = _pad_id(base)
        model = _with_lora(base, config)
    wrapper = CausalLM if config.kind == "hf_causal_lm" else SequenceClassifier
    return wrapper(model, pad_id, bf16)


def check_model(config: ModelConfig, *, seq_len: int) -> None:
    """Build ``config``'s model on the meta device (no weights, no memory) so that a missing checkpoint,
    a bad target module or a bad head name fails at validation with a one-line ScenarioError."""
    hf_config = None
    if config.name_or_path:
        from transformers import AutoConfig

        hf_config = from_pretrained(AutoConfig, config.name_or_path)
    with _quiet_transformers(), torch.device("meta"):
        _with_lora(_base_model(config, seq_len, 2, torch.float32, hf_config=hf_config), config)


def from_pretrained(loader: Any, name_or_path: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` from a local folder, the cache, then the Hub; one-line errors otherwise."""
    local, name = Path(name_or_path).expanduser(), shown_text(name_or_path)
    if path_exists(str(local)):
        try:
            return loader.from_pretrained(str(local), **kwargs)
        except Exception as err:
            raise ScenarioError(f"{_FIELD}: cannot load {name} ({first_line(err)}); point it at a folder "
                                "written by save_pretrained") from None
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path:
        raise ScenarioError(f"{_FIELD}: no such folder: {name}; check the path")
    try:
        return loader.from_pretrained(name_or_path, local_files_only=True, **kwargs)
    except (OSError, ValueError):  # not in the cache
        pass
    if offline_mode() or not hub_reachable():
        raise ScenarioError(f"{_FIELD}: '{name}' is neither a local folder nor in the Hugging Face cache, and "
                            "the Hub cannot be reached; loading it needs a network connection, or set it to a local "
                            "checkpoint path (or use the offline tiny model by removing it)")
    try:
        return loader.from_pretrained(name_or_path, **kwargs)
    except Exception as err:
        raise ScenarioError(f"{_FIELD}: cannot load '{name}' from the Hub ({first_line(err)}); check the "
                            "name, or set it to a local checkpoint path") from None


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub's endpoint opens within ``timeout`` seconds (checked once)."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def offline_mode() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _use_bf16(config: ModelConfig, device: torch.device | None) -> bool:
    if config.dtype != "auto":
        return config.dtype == "bfloat16"
    return device is not None and device.type == "cuda" and torch.cuda.is_bf16_supported()


def _base_model(config: ModelConfig, seq_len: int, num_labels: int, dtype: torch.dtype, hf_config: Any = None) -> nn.Module:
    import transformers as tf

    causal = config.kind == "hf_causal_lm"
    if config.name_or_path:
        auto = tf.AutoModelForCausalLM if causal else tf.AutoModelForSequenceClassification
        extra = {} if causal else {"num_labels": num_labels}
        if hf_config is not None:  # the meta-device check: architecture only
            for key, value in extra.items():
                setattr(hf_config, key, value)
            return auto.from_config(hf_config)
        return from_pretrained(auto, config.name_or_path, dtype=dtype, **extra)
    tiny, vocab = config.tiny, model_vocab_size(config)
    if causal:
        base = tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=vocab, hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size,
            num_hidden_layers=tiny.layers, num_attention_heads=tiny.heads, num_key_value_heads=tiny.heads,
            max_position_embeddings=seq_len, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
            tie_word_embeddings=False))
    else:
        base = tf.BertForSequenceClassification(tf.BertConfig(
            vocab_size=vocab, hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size,
            num_hidden_layers=tiny.layers, num_attention_heads=tiny.heads, max_position_embeddings=seq_len,
            num_labels=num_labels, pad_token_id=PAD, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    return base.to(dtype)


def _pad_id(base: nn.Module) -> int:
    """The id fed at masked positions; also the classifier's pad id, which Llama-style heads use to find the
    last real token (so it is set on checkpoints that have none)."""
    config = base.config
    pad = config.pad_token_id
    if pad is None:
        eos = config.eos_token_id
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
        config.pad_token_id = pad
    return int(pad)


def _with_lora(base: nn.Module, config: ModelConfig) -> nn.Module:
    """``base`` with LoRA adapters (and a trainable head) as ``config.lora`` says; full fine-tuning without one."""
    import peft

    lora = config.lora
    if lora is None:
        return base
    save = list(lora.modules_to_save)
    train_head = lora.train_head if lora.train_head is not None else config.kind == "hf_classifier"
    if train_head:
        save.append(_head_name(base, config.kind))
    names = [name for name, _ in base.named_modules()]
    for module in save:
        if not any(n == module or n.endswith("." + module) for n in names):
            raise ScenarioError(f"model.lora.modules_to_save: no module named '{module}' in {type(base).__name__}; "
                                f"its top-level modules are: {', '.join(n for n, _ in base.named_children())}")
    peft_config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                  target_modules=lora.target_modules, modules_to_save=save or None)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            model = peft.get_peft_model(base, peft_config)
    except ValueError as err:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, nn.Linear)})
        problem = "not found in" if lora.target_modules else "peft has no default target modules for"
        raise ScenarioError(f"model.lora.target_modules: {lora.target_modules or 'null'}: {problem} "
                            f"{type(base).__name__} ({first_line(err)}); its linear layers are: "
                            f"{', '.join(linear)}, or use all-linear") from None
    if config.lora_aggregation == "ffa":
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return model


def _head_name(base: nn.Module, kind: str) -> str:
    if kind == "hf_causal_lm":
        head = base.get_output_embeddings()
        return next(name for name, module in base.named_modules() if module is head)
    for name in ("score", "classifier"):
        if isinstance(getattr(base, name, None), nn.Module):
            return name
    raise ScenarioError(f"model.lora.train_head: cannot find the head of {type(base).__name__}; set "
                        "model.lora.train_head: false and name it in model.lora.modules_to_save")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' notices about newly initialised heads (expected when a classifier head is added)
    and its weight-loading progress bars."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
