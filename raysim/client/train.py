"""One client's local training: minibatch epochs over its own samples, starting from the global model.

The loop is deliberately flat. A strategy's gradient hook (FedProx's proximal term, SCAFFOLD's
correction; ``raysim.strategies``) is one visible line between ``backward`` and the step. The task
(``raysim.models.task``) turns the model's output into the loss: cross-entropy for classifiers, the
mean next-token NLL for causal language models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from raysim.client.optimizer import LocalOptimizer
from raysim.config import TrainingConfig
from raysim.models.flat import FlatParams
from raysim.models.task import CLASSIFICATION, Task


@dataclass(frozen=True)
class LocalResult:
    """What one client's training produced, before it is folded into a sum."""

    steps: int
    mean_loss: float


def make_optimizer(config: TrainingConfig, params: list[nn.Parameter]) -> LocalOptimizer:
    """The local optimizer. A worker builds it once and resets its state between clients."""
    momentum = config.momentum if config.optimizer == "sgd" else 0.0
    return LocalOptimizer(params, kind=config.optimizer, lr=config.lr, momentum=momentum, weight_decay=config.weight_decay)


def seed_torch(seed: int, device: torch.device) -> None:
    """Seed the torch generator that ``device`` draws from (dropout): the CPU's, and the GPU's on CUDA.

    The same state as ``torch.manual_seed(seed)`` for the generators used, without its queueing a seed, with a
    formatted stack trace, for every CUDA device each call (about 0.4 ms a client on a CPU-only host).
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def train_client(
    model: nn.Module,
    flat: FlatParams,
    optimizer: LocalOptimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    rng: np.random.Generator,
    hook: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    task: Task = CLASSIFICATION,
    after_step: Callable[[torch.Tensor], None] | None = None,
) -> LocalResult:
    """Train ``model`` in place on (x, y) for ``epochs`` passes, starting from whatever it holds.

    ``flat`` holds the model's parameters and gradients as flat vectors; ``hook(grad, weights)``
    adjusts the flat gradient in place between ``backward`` and the optimizer step, and
    ``after_step(weights)`` the flat weights after it (e.g. Ditto's proximal step).
    """
    optimizer.reset()
    model.train()
    n = x.shape[0]
    steps = 0
    loss_sum = torch.zeros((), device=x.device)
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(n)).to(x.device)
        for start in range(0, n, batch_size):
            batch = order[start : start + batch_size]
            loss = task.loss(model(x[batch]), y[batch])
            flat.grad.zero_()
            loss.backward()
            if hook is not None:
                hook(flat.grad, flat.vector)
            optimizer.step()
            if after_step is not None:
                with torch.no_grad():
                    after_step(flat.vector)
            loss_sum += loss.detach()
            steps += 1
    return LocalResult(steps=steps, mean_loss=float(loss_sum) / max(steps, 1))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None,
             task: Task = CLASSIFICATION) -> tuple[float, int, int]:
    """(summed loss, correct predictions, count) of ``model`` on (x, y); the count is samples for a
    classifier and predicted tokens for a causal LM."""
    model.eval()
    batch_size = batch_size or task.eval_batch_size
    loss_sum, correct, count = 0.0, 0, 0
    for start in range(0, x.shape[0], batch_size):
        l, c, n = task.eval_batch(model, x[start : start + batch_size], y[start : start + batch_size])
        loss_sum, correct, count = loss_sum + l, correct + c, count + n
    return loss_sum, correct, count
