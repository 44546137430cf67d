"""Local DP-SGD (Abadi et al., CCS 2016) for a stack of clients at once, with per-sample gradients from ``vmap``.

The same mechanism, step for step, as the sequential path through Opacus (``local_dpsgd.train_dp_sgd``):
each client's Poisson batches are drawn at Opacus's rate q = 1 / ceil(n / batch_size) for
int(1 / q) steps an epoch, from a torch generator seeded the way that path seeds its loader and
advanced the way the loader advances it, so a client samples the very batches it samples there; each per-sample gradient (of the sample's own
loss) is clipped to C in L2 norm over all trainable parameters with Opacus's factor
min(1, C / (‖g‖ + 1e-6)); the clipped sum gets Gaussian noise of std σ·C per coordinate, drawn
parameter by parameter from the client's noise generator as Opacus draws it, and is divided by
Opacus's expected batch size int(n·q); an empty batch takes a noise-only step; the step is plain SGD.
So the two paths agree to floating-point summation order. The accountant is Opacus's
(``accountant.PrivacyAccountant``), stepped once per step with (σ, q), as Opacus steps it.

Per-sample gradients come from one backward over a stack with one row per (client, sample): each
client's row repeated once per sample of its batch, through the same batched layers as plain
vectorized training (``raysim.client.vectorized.StackedModel``). The clipped sum over a batch is taken
sample by sample, in order, so a client's result does not depend on the other clients of its stack
(whose batches set the padded width).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from raysim.client.vectorized import StackedModel
from raysim.privacy.dp.accountant import PrivacyAccountant, validate_noise_multiplier


@dataclass
class PrivateClient:
    """One client of a private stack: its samples on the device, its epochs, its seed and accountant."""

    x: torch.Tensor
    y: torch.Tensor
    epochs: int
    seed: int  # what the sequential path's ``train_dp_sgd`` is given
    start: torch.Tensor
    accountant_state: dict[str, Any] | None


@dataclass(frozen=True)
class PrivateStackResult:
    """Per client, in the order given: its local model row, steps, mean loss, accountant state and ε."""

    local: torch.Tensor
    steps: np.ndarray
    mean_loss: np.ndarray
    accountant_states: list[dict[str, Any]]
    epsilons: np.ndarray


def opacus_rate(n: int, batch_size: int) -> tuple[float, int, int]:
    """(sample rate q, steps per epoch, expected batch size) as Opacus's Poisson loader has them for n samples."""
    q = 1.0 / math.ceil(n / batch_size)
    return q, int(1 / q), int(n * q)


def clip_factors(grads: torch.Tensor, counts: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Opacus's per-sample factor min(1, C / (‖g‖ + 1e-6)) for (clients, width, D) gradients; 0 for padding."""
    valid = torch.arange(grads.shape[1], device=grads.device)[None, :] < counts[:, None]
    return (clip_norm / (grads.norm(dim=2) + 1e-6)).clamp(max=1.0) * valid


def clip_and_sum(grads: torch.Tensor, counts: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Each client's sum of its first ``counts`` per-sample gradients, each clipped to ``clip_norm``, summed
    sample by sample in order (so padding never changes the result)."""
    factor = clip_factors(grads, counts, clip_norm)
    summed = torch.zeros(grads.shape[0], grads.shape[2], dtype=grads.dtype, device=grads.device)
    for k in range(grads.shape[1]):
        summed += factor[:, k, None] * grads[:, k]
    return summed


class PrivateStackedTrainer:
    """DP-SGD over stacks of clients on one resident model."""

    def __init__(self, stacked: StackedModel, batch_size: int, lr: float, noise_multiplier: float,
                 clip_norm: float, accountant: str, delta: float, device: torch.device) -> None:
        self.stacked, self.batch_size, self.lr, self.device = stacked, batch_size, lr, device
        self.noise_multiplier, self.clip_norm = validate_noise_multiplier(noise_multiplier), clip_norm
        self.accountant, self.delta = accountant, delta

    def per_sample(self, rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, width, D) gradients and (a, width) losses of each sample's own loss, for (a, width, ...) inputs."""
        a, width = y.shape
        repeated = rows.repeat_interleave(width, dim=0).detach().requires_grad_(True)
        output = self.stacked.forward(repeated, x.reshape(a * width, 1, *x.shape[2:]))
        losses = nn.functional.cross_entropy(output[:, 0], y.reshape(-1), reduction="none")
        (grads,) = torch.autograd.grad(losses.sum(), repeated)
        return grads.view(a, width, -1), losses.detach().view(a, width)

    def train(self, clients: list[PrivateClient]) -> PrivateStackResult:
        device, stacked = self.device, self.stacked
        sizes = [int(c.x.shape[0]) for c in clients]
        rates = [opacus_rate(n, self.batch_size) for n in sizes]
        steps = np.array([c.epochs * per_epoch for c, (_, per_epoch, _) in zip(clients, rates)])
        order = np.argsort(-steps, kind="stable")
        samplers, noises = [], []
        for c in clients:
            sample_seed, noise_seed = (int(s) for s in np.random.SeedSequence(c.seed).generate_state(2))
            samplers.append(torch.Generator().manual_seed(sample_seed))
            noises.append(torch.Generator(device=device).manual_seed(noise_seed))
        weights = torch.stack([clients[j].start for j in order]).float()
        expected = torch.tensor([float(rates[j][2]) for j in order], device=device)
        std = self.noise_multiplier * self.clip_norm
        loss_sum, loss_batches = np.zeros(len(clients)), np.zeros(len(clients), dtype=np.int64)
        for step in range(int(steps.max(initial=0))):
            top = [int(j) for j in order if steps[j] > step]
            a = len(top)
            batches = [self._poisson(samplers[j], sizes[j], rates[j], step) for j in top]
            width = max(1, max(len(b) for b in batches))
            counts = torch.tensor([len(b) for b in batches], device=device)
            index = torch.zeros(a, width, dtype=torch.long)
            for row, b in enumerate(batches):
                index[row, : len(b)] = b
            index = index.to(device)
            xb = torch.stack([clients[j].x[index[row]] for row, j in enumerate(top)])
            yb = torch.stack([clients[j].y[index[row]] for row, j in enumerate(top)])
            grads, losses = self.per_sample(weights[:a], xb, yb)  # (a, width, D), (a, width)
            summed = clip_and_sum(grads, counts, self.clip_norm)
            valid = torch.arange(width, device=device)[None, :] < counts[:, None]
            noise = torch.stack([self._noise(noises[j]) for j in top]) if std else 0.0
            with torch.no_grad():
                weights[:a].add_((summed + noise) / expected[:a, None], alpha=-self.lr)
            mean = ((losses * valid).sum(dim=1) / counts.clamp(min=1)).cpu().numpy()
            for row, j in enumerate(top):
                if counts[row]:
                    loss_sum[j] += mean[row]
                    loss_batches[j] += 1
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        states, epsilons = [], np.zeros(len(clients))
        for j, c in enumerate(clients):
            accountant = PrivacyAccountant(self.accountant, self.delta)
            if c.accountant_state is not None:
                accountant.load_state_dict(c.accountant_state)
            accountant.step(self.noise_multiplier, rates[j][0], int(steps[j]))
            states.append(accountant.state_dict())
            epsilons[j] = accountant.epsilon()
        mean_loss = np.where(loss_batches > 0, loss_sum / np.maximum(loss_batches, 1), math.nan)
        return PrivateStackResult(local=weights[torch.from_numpy(back).to(device)], steps=steps,
                                  mean_loss=mean_loss, accountant_states=states, epsilons=epsilons)

    @staticmethod
    def _poisson(generator: torch.Generator, n: int, rate: tuple[float, int, int], step: int) -> torch.Tensor:
        """The client's Poisson batch at ``step``, as Opacus's loader draws it: each epoch's iterator first
        takes a base seed from the generator (``torch.utils.data``'s iterator does), then one mask per step."""
        if step % rate[1] == 0:
            torch.empty((), dtype=torch.int64).random_(generator=generator)
        return (torch.rand(n, generator=generator) < rate[0]).nonzero().reshape(-1)

    def _noise(self, generator: torch.Generator) -> torch.Tensor:
        """One client's noise for one step, parameter by parameter in the flat layout, as Opacus draws it."""
        std = self.noise_multiplier * self.clip_norm
        return torch.cat([torch.normal(0.0, std, size=tuple(shape), device=self.device, generator=generator).reshape(-1)
                          for shape in self.stacked.shapes])
