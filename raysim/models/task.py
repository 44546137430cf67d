"""What a model is trained for: how its output becomes a loss and how evaluation is summed and reported.

The local training loop, DP-SGD and evaluation are the same for every model; a task supplies the
few lines that differ. ``Classification`` is the cross-entropy of logits against labels (the small
models and ``hf_classifier``); ``CausalLanguageModeling`` averages the per-sequence next-token NLL
that ``raysim.models.hf.CausalLM`` returns, and reports per-token loss and perplexity exp(loss).
Text tasks also count tokens (ids >= 0; padding is -1) for throughput and token weighting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from raysim.config import ModelConfig

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class Classification:
    """Logits (B, C) against int labels (B,)."""

    eval_batch_size: int = 4096
    text: bool = False

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from torch.nn.functional import cross_entropy

        return cross_entropy(output, target)

    def eval_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int, int]:
        """(summed cross-entropy, correct predictions, samples) on one batch."""
        from torch.nn.functional import cross_entropy

        logits = model(x)
        return (float(cross_entropy(logits, y, reduction="sum")),
                int((logits.argmax(dim=1) == y).sum()), int(x.shape[0]))

    def metrics(self, loss_sum: float, correct: int, count: int) -> dict[str, float]:
        return {"accuracy": correct / count, "test_loss": loss_sum / count}

    def tokens(self, x: torch.Tensor) -> int:
        return int((x >= 0).sum()) if self.text else 0


@dataclass(frozen=True)
class CausalLanguageModeling:
    """Per-sequence mean NLL (B,) from the model; the labels are the inputs shifted by one."""

    eval_batch_size: int = 64
    text: bool = True

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return output.mean()

    def eval_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int, int]:
        """(summed next-token NLL, correct next tokens, predicted tokens) on one batch."""
        return model.token_stats(x)

    def metrics(self, loss_sum: float, correct: int, count: int) -> dict[str, float]:
        loss = loss_sum / count
        return {"test_loss": loss, "perplexity": math.exp(min(loss, 700.0)), "token_accuracy": correct / count}

    def tokens(self, x: torch.Tensor) -> int:
        return int((x >= 0).sum())


Task = Classification | CausalLanguageModeling

CLASSIFICATION = Classification()


def task_for(config: ModelConfig) -> Task:
    """The task of ``config``'s model."""
    if config.kind == "hf_causal_lm":
        return CausalLanguageModeling()
    if config.kind == "hf_classifier":
        return Classification(eval_batch_size=256, text=True)
    return CLASSIFICATION
