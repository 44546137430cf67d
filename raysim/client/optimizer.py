"""The local optimizer: torch's SGD (momentum, weight decay) and Adam, step for step, without ``torch.optim``.

``torch.optim`` wraps ``add_param_group`` and ``step`` so that ``torch.compile`` leaves them alone, and the
wrappers import ``torch._dynamo`` on first use: 1.1–1.8 s of CPU in every worker process at start-up, on
two cores that the driver, Ray's own processes and the other workers share, and tens of microseconds of
wrapper around every step of clients that take a few dozen steps of a small model. ``LocalOptimizer``
runs the tensor operations of torch's single-tensor path (``torch.optim.sgd._single_tensor_sgd`` and
``torch.optim.adam._single_tensor_adam``: no dampening, Nesterov, AMSGrad or maximize, which the scenario
cannot ask for) on the same parameter tensors in the same order, so on the CPU, where torch takes that
path, its parameters are bit-identical to ``torch.optim``'s (``tests/test_local_optimizer.py``). On a GPU
torch would take its multi-tensor path; this one stays per tensor there too, which is as exact.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults


class LocalOptimizer:
    """SGD or Adam over ``params``, reading each parameter's ``.grad``; ``reset`` forgets the state (a new client)."""

    def __init__(self, params: Sequence[nn.Parameter], *, kind: str = "sgd", lr: float,
                 momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        if kind not in ("sgd", "adam"):
            raise ValueError(f"training.optimizer: '{kind}' is not sgd or adam")
        self.params, self.kind = list(params), kind
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.reset()

    def reset(self) -> None:
        """Drop the momentum buffers or Adam's moments and step count, as ``optimizer.state.clear()`` does."""
        self.steps = 0
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)
        self.moments: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @torch.no_grad()
    def step(self) -> None:
        """One step of every parameter that has a gradient."""
        self.steps += 1
        if self.kind == "adam":
            self._adam()
            return
        for i, param in enumerate(self.params):
            grad = param.grad
            if grad is None:
                continue
            if self.weight_decay != 0:
                grad = grad.add(param, alpha=self.weight_decay)
            if self.momentum != 0:
                buffer = self.buffers[i]
                if buffer is None:
                    buffer = self.buffers[i] = grad.detach().clone()
                else:
                    buffer.mul_(self.momentum).add_(grad, alpha=1)
                grad = buffer
            param.add_(grad, alpha=-self.lr)

    def _adam(self) -> None:
        if self.moments is None:
            self.moments = [(torch.zeros_like(p, memory_format=torch.preserve_format),
                             torch.zeros_like(p, memory_format=torch.preserve_format)) for p in self.params]
        (beta1, beta2), step = ADAM_BETAS, float(self.steps)  # torch keeps the count as a float32 tensor
        bias_correction1, bias_correction2 = 1 - beta1**step, 1 - beta2**step
        step_size, bias_correction2_sqrt = self.lr / bias_correction1, bias_correction2**0.5
        for param, (exp_avg, exp_avg_sq) in zip(self.params, self.moments):
            grad = param.grad
            if grad is None:
                continue
            if self.weight_decay != 0:
                grad = grad.add(param, alpha=self.weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(ADAM_EPS)
            param.addcdiv_(exp_avg, denom, value=-step_size)
