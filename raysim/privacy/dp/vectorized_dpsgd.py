"""Local DP-SGD (Abadi et al., CCS 2016) for a stack of clients at once, with per-sample gradients from ``vmap``.

The same mechanism, step for step, as the sequential path through Opacus (``local_dpsgd.train_dp_sgd``):
each client's Poisson batches are drawn at Opacus's rate q = 1 / ceil(n / batch_size) for
int(1 / q) steps an epoch, from a torch generator seeded the way that path seeds its loader and
advanced the way the loader advances it, so a client samples the very batches it samples there; each per-sample gradient (of the sample's own
loss) is clipped to C in L2 norm over all trainable parameters with Opacus's factor
min(1, C / (‖g‖ + 1e-6)); the clipped sum gets Gaussian noise of std σ·C per coordinate from the client's own
noise generator, seeded as that path seeds Opacus's, and is divided by Opacus's expected batch size
int(n·q); an empty batch takes a noise-only step; the step is plain SGD. The noise is the same
distribution drawn in another order (a block of ``NOISE_BLOCK`` steps at a time, where Opacus draws
each parameter of each step alone, which cost more than the rest of the step): with noise off the
two paths agree to floating-point summation order, and with noise on they differ by its realization. The accountant is Opacus's
(``accountant.PrivacyAccountant``), stepped once per step with (σ, q), as Opacus steps it.

A client's result does not depend on the other clients of its stack, whose batches set the padded
width: every sum over samples is a ``bmm`` (zero padding adds exact zeros), and the width is at least
``MIN_WIDTH``. Per-sample gradients come from one batched forward and one backward to each layer's output
(``raysim.client.vectorized.StackedModel``'s taps), as Opacus's grad samplers make them from
activations and backpropagated gradients; a linear layer's are kept as the factors of their outer
product, whose norm needs no product (``LayerSamples``), and the clipped sum is one ``bmm``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from raysim.client.vectorized import StackedModel
from raysim.privacy.dp.accountant import PrivacyAccountant, validate_noise_multiplier


# The padded batch width is at least this: a CPU matmul of 1 to 3 rows takes another kernel, whose
# rounding differs, so a client's rows would depend on how wide its stack's largest batch is.
MIN_WIDTH = 8
NOISE_BLOCK = 8  # steps of noise drawn per client at a time
MASK_BLOCK = 2**20  # uniforms drawn per client at a time for its Poisson masks


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


class LayerSamples:
    """One layer's per-sample gradients, kept factored where that is exact (Goodfellow 2015; the "ghost
    norm" of Li et al. 2022): a linear layer's per-sample weight gradient is the outer product g·hᵀ of
    the output gradient and the input, whose norm is ‖g‖·‖h‖, so it is never formed; a convolution's is
    formed per sample (its L positions sum inside it)."""

    def __init__(self, out_grad: torch.Tensor, inputs: torch.Tensor | None, formed: torch.Tensor | None) -> None:
        self.out_grad, self.inputs, self.formed = out_grad, inputs, formed

    def norms2(self) -> torch.Tensor:
        """(a, width) squared norms of the per-sample gradients of this layer's weight and bias."""
        if self.formed is not None:
            return self.formed.square().sum(dim=(2, 3)) + self.out_grad.square().sum(dim=2)
        return self.out_grad.square().sum(dim=2) * (self.inputs.square().sum(dim=2) + 1)

    def clipped_sum(self, factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, weight size) and (a, bias size) sums over samples of ``factor``-scaled per-sample gradients."""
        a, width = factor.shape
        weights = factor[:, None, :]  # (a, 1, width): every sum over samples is a bmm, whose padded zeros add nothing
        bias = torch.bmm(weights, self.out_grad)[:, 0]
        if self.formed is not None:
            weight = torch.bmm(weights, self.formed.reshape(a, width, -1))[:, 0]
        else:
            weight = torch.bmm((self.out_grad * factor[..., None]).transpose(1, 2), self.inputs)
        return weight.reshape(a, -1), bias


def per_sample_grads(layer: torch.nn.Module, inputs: torch.Tensor, out_grad: torch.Tensor) -> LayerSamples:
    """A layer's per-sample gradients from its input (a convolution's patches) and its output's gradient."""
    if isinstance(layer, nn.Linear):
        return LayerSamples(out_grad, inputs, None)
    a, width, channels = out_grad.shape[:3]
    grads = out_grad.reshape(a * width, channels, -1)  # (a·w, O, L)
    patches = inputs.reshape(a * width, inputs.shape[2], -1)  # (a·w, patch, L)
    formed = torch.bmm(grads, patches.transpose(1, 2)).view(a, width, channels, -1)
    return LayerSamples(grads.sum(dim=2).view(a, width, channels), None, formed)


def clip_factors(pieces: list[LayerSamples], counts: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Opacus's per-sample factor min(1, C / (‖g‖ + 1e-6)), ‖g‖ over every parameter; 0 for padding."""
    norms = torch.stack([piece.norms2() for piece in pieces]).sum(dim=0).sqrt()
    valid = torch.arange(norms.shape[1], device=norms.device)[None, :] < counts[:, None]
    return (clip_norm / (norms + 1e-6)).clamp(max=1.0) * valid


class PoissonBatches:
    """One client's Poisson batches as Opacus's loader draws them from its generator: each epoch's iterator
    first takes a base seed (``torch.utils.data``'s iterator does), then one uniform mask per step. The
    masks of an epoch are drawn a block of steps at a time (the same stream: ``rand(k, n)`` is k
    ``rand(n)``), at most ``MASK_BLOCK`` numbers a draw, and turned into the block's batches at once: a
    row of sample indices per step, in ascending order, padded with 0 past the step's batch size."""

    def __init__(self, generator: torch.Generator, n: int, rate: float, per_epoch: int) -> None:
        self.generator, self.n, self.rate, self.per_epoch = generator, n, rate, per_epoch
        self.step, self.row = 0, 0
        self.rows: tuple[torch.Tensor, ...] = ()
        self.sizes: list[int] = []

    def next(self) -> tuple[torch.Tensor, int]:
        """The next step's batch: its row of indices (the first ``size`` are the batch) and its size."""
        within = self.step % self.per_epoch
        if within == 0:
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        if self.row == len(self.sizes):
            rows = max(1, min(self.per_epoch - within, MASK_BLOCK // self.n))
            hits = (torch.rand(rows, self.n, generator=self.generator) < self.rate).nonzero()  # row-major
            sizes = torch.bincount(hits[:, 0], minlength=rows)
            position = torch.arange(len(hits)) - (sizes.cumsum(0) - sizes).repeat_interleave(sizes)
            block = torch.zeros(rows, max(1, int(sizes.max())), dtype=torch.int64)
            block[hits[:, 0], position] = hits[:, 1]
            self.rows, self.sizes, self.row = block.unbind(0), sizes.tolist(), 0
        batch, size = self.rows[self.row], self.sizes[self.row]
        self.row, self.step = self.row + 1, self.step + 1
        return batch, size


class PrivateStackedTrainer:
    """DP-SGD over stacks of clients on one resident model."""

    def __init__(self, stacked: StackedModel, batch_size: int, lr: float, noise_multiplier: float,
                 clip_norm: float, accountant: str, delta: float, device: torch.device) -> None:
        self.stacked, self.batch_size, self.lr, self.device = stacked, batch_size, lr, device
        self.noise_multiplier, self.clip_norm = validate_noise_multiplier(noise_multiplier), clip_norm
        self.accountant, self.delta = accountant, delta

    def clipped_sum(self, rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each client's sum of its per-sample gradients clipped to C, in the flat (a, D) layout, and the
        (a, width) per-sample losses, for (a, width, ...) inputs of which the first ``counts`` are real."""
        params = self.stacked.split(rows)
        taps: list = []
        output = self.stacked.forward(params, x, taps)
        losses = nn.functional.cross_entropy(output.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
        outputs = torch.autograd.grad(losses.sum(), [out for _, _, out in taps])  # each sample's own loss
        pieces = [per_sample_grads(layer, inputs, grad) for (layer, inputs, _), grad in zip(taps, outputs)]
        factor = clip_factors(pieces, counts, self.clip_norm)
        return torch.cat([summed for piece in pieces for summed in piece.clipped_sum(factor)], dim=1), losses.detach()

    def train(self, clients: list[PrivateClient]) -> PrivateStackResult:
        device, stacked = self.device, self.stacked
        sizes = [int(c.x.shape[0]) for c in clients]
        rates = [opacus_rate(n, self.batch_size) for n in sizes]
        steps = np.array([c.epochs * per_epoch for c, (_, per_epoch, _) in zip(clients, rates)])
        order = np.argsort(-steps, kind="stable")
        samplers, noises = [], []
        for c, n, rate in zip(clients, sizes, rates):
            sample_seed, noise_seed = (int(s) for s in np.random.SeedSequence(c.seed).generate_state(2))
            samplers.append(PoissonBatches(torch.Generator().manual_seed(sample_seed), n, rate[0], rate[1]))
            noises.append(torch.Generator(device=device).manual_seed(noise_seed))
        weights = torch.stack([clients[j].start for j in order]).float()
        expected = torch.tensor([float(rates[j][2]) for j in order], device=device)
        x, y = torch.cat([c.x for c in clients]), torch.cat([c.y for c in clients])
        offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64))
        active = (steps[order][None, :] > np.arange(int(steps.max(initial=0)))[:, None]).sum(axis=1)
        std = self.noise_multiplier * self.clip_norm
        loss_sum, loss_batches = np.zeros(len(clients)), np.zeros(len(clients), dtype=np.int64)
        for step, a in enumerate(active.tolist()):
            top = order[:a]
            batches = [samplers[j].next() for j in top.tolist()]
            counts = np.array([size for _, size in batches])
            width = max(MIN_WIDTH, int(counts.max()))
            index = pad_sequence([row for row, _ in batches], batch_first=True)[:, :width]
            index = nn.functional.pad(index, (0, width - index.shape[1]))  # padding: each client's first sample
            index = (index + offsets[top][:, None]).to(device)
            count = torch.from_numpy(counts).to(device)
            summed, losses = self.clipped_sum(weights[:a], x[index], y[index], count)
            if std:
                if step % NOISE_BLOCK == 0:  # the next NOISE_BLOCK steps' noise of every client still training
                    block = self._noise([noises[j] for j in top.tolist()], [int(steps[j]) - step for j in top.tolist()])
                summed += block[:a, step % NOISE_BLOCK]
            with torch.no_grad():
                weights[:a].add_(summed / expected[:a, None], alpha=-self.lr)
            valid = (torch.arange(width, device=device)[None, :] < count[:, None]).float()
            mean = (torch.bmm(valid[:, None, :], losses[:, :, None])[:, 0, 0] / count.clamp(min=1)).cpu().numpy()
            nonempty = counts > 0
            loss_sum[top[nonempty]] += mean[nonempty]
            loss_batches[top[nonempty]] += 1
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

    def _noise(self, generators: list[torch.Generator], left: list[int]) -> torch.Tensor:
        """(clients, NOISE_BLOCK, D) Gaussian noise of std σ·C: each client's next min(NOISE_BLOCK, steps left)
        steps' noise in one draw from its own generator (rows past its last step are zero)."""
        std = self.noise_multiplier * self.clip_norm
        block = torch.empty(len(generators), NOISE_BLOCK, self.stacked.dim, device=self.device)
        for row, (generator, steps) in enumerate(zip(generators, left)):
            rows = min(NOISE_BLOCK, steps)
            torch.randn(rows, self.stacked.dim, generator=generator, device=self.device, out=block[row, :rows])
            block[row, rows:] = 0.0
        block.mul_(std)
        return block
