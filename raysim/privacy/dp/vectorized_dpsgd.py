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

A client's result does not depend on the other clients of its stack: every step's batches are padded to
one width fixed by the batch size alone (``private_width``: the Poisson batch's largest mean plus three
standard deviations), and a step whose largest batch is wider runs in blocks of that width, each
block's sums added in block order (zero padding adds exact zeros). Every kernel then sees the same shapes
whichever clients share the stack, so a client's bits are those it would get alone, on 1 worker or 2. (A
width set by the stack's largest batch made them depend on it: a reduction over a longer padded row may
associate differently, which this CPU's one-row ``bmm`` did for widths from 13 on.) Per-sample gradients come from one batched forward and one backward to each layer's output
(``raysim.client.vectorized.StackedModel``'s taps, by hand for Linear/ReLU stacks), as Opacus's grad samplers make them from
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

from raysim.client.vectorized import StackedModel, gather
from raysim.privacy.dp.accountant import PrivacyAccountant, validate_noise_multiplier


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


def private_width(batch_size: int) -> int:
    """The padded width of every private step's batches: Opacus's rate q = 1/ceil(n/B) gives a Poisson batch of
    mean n·q <= B and variance <= B, which exceeds B + 3·sqrt(B) about once in a thousand draws (a step whose
    widest batch does runs in two blocks), and at least 8 rows (a matmul of fewer takes another kernel)."""
    return max(8, math.ceil(batch_size + 3 * math.sqrt(batch_size)))


def opacus_rate(n: int, batch_size: int) -> tuple[float, int, int]:
    """(sample rate q, steps per epoch, expected batch size) as Opacus's Poisson loader has them for n samples."""
    q = 1.0 / math.ceil(n / batch_size)
    return q, int(1 / q), int(n * q)


class LayerSamples:
    """One layer's per-sample gradients, kept factored where that is exact (Goodfellow 2015; the "ghost
    norm" of Li et al. 2022): a linear layer's per-sample weight gradient is the outer product g·hᵀ of
    the output gradient and the input, whose norm is ‖g‖·‖h‖, so it is never formed; a convolution's is
    formed per sample (its L positions sum inside it)."""

    def __init__(self, out_grad: torch.Tensor, inputs: torch.Tensor | None, formed: torch.Tensor | None,
                 input_norms2: torch.Tensor | None = None) -> None:
        self.out_grad, self.inputs, self.formed = out_grad, inputs, formed
        self.input_norms2 = input_norms2  # a linear layer's ‖h‖² per sample, when known beforehand (the data's)

    def norms2(self) -> torch.Tensor:
        """(a, width) squared norms of the per-sample gradients of this layer's weight and bias."""
        if self.formed is not None:
            return self.formed.square().sum(dim=(2, 3)) + self.out_grad.square().sum(dim=2)
        inputs2 = self.input_norms2 if self.input_norms2 is not None else self.inputs.square().sum(dim=2)
        return self.out_grad.square().sum(dim=2) * (inputs2 + 1)

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


def poisson_batches(generator: torch.Generator, n: int, rate: float, per_epoch: int,
                    epochs: int) -> tuple[list[torch.Tensor], np.ndarray]:
    """One client's Poisson batches, every step of its ``epochs``, as Opacus's loader draws them from its
    generator: each epoch's iterator first takes a base seed (``torch.utils.data``'s iterator does), then one
    uniform mask per step. An epoch's masks are drawn a block of steps at a time (the same stream:
    ``rand(k, n)`` is k ``rand(n)``), at most ``MASK_BLOCK`` numbers a draw, and turned into the block's
    batches at once. Returns each block's (steps, its widest batch) rows of sample indices, ascending and
    padded with 0 (the client's first sample) past each step's batch size, and the sizes of all steps."""
    blocks, sizes = [], []
    for _ in range(epochs):
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        done = 0
        while done < per_epoch:
            rows = max(1, min(per_epoch - done, MASK_BLOCK // n))
            hits = (torch.rand(rows, n, generator=generator) < rate).nonzero()  # row-major
            counts = torch.bincount(hits[:, 0], minlength=rows)
            position = torch.arange(len(hits)) - (counts.cumsum(0) - counts).repeat_interleave(counts)
            block = torch.zeros(rows, max(1, int(counts.max())), dtype=torch.int64)
            block[hits[:, 0], position] = hits[:, 1]
            blocks.append(block)
            sizes.append(counts.numpy())
            done += rows
    return blocks, np.concatenate(sizes) if sizes else np.zeros(0, dtype=np.int64)


class PrivateStackedTrainer:
    """DP-SGD over stacks of clients on one resident model."""

    def __init__(self, stacked: StackedModel, batch_size: int, lr: float, noise_multiplier: float,
                 clip_norm: float, accountant: str, delta: float, device: torch.device) -> None:
        self.stacked, self.batch_size, self.lr, self.device = stacked, batch_size, lr, device
        self.noise_multiplier, self.clip_norm = validate_noise_multiplier(noise_multiplier), clip_norm
        self.accountant, self.delta = accountant, delta
        self.width = private_width(batch_size)

    def clipped_sum(self, rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor, counts: torch.Tensor,
                    x_norms2: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each client's sum of its per-sample gradients clipped to C, one (a, size) piece per parameter in the
        flat layout's order, and the (a, width) per-sample losses, for (a, width, ...) inputs of which the first
        ``counts`` are real; ``x_norms2``, the inputs' squared norms, spares a linear first layer computing them."""
        if self.stacked.by_hand:
            losses, taps = self.stacked.sample_losses_by_hand(rows, x, y)
        else:
            params = self.stacked.split(rows)
            taps = []
            output = self.stacked.forward(params, x, taps)
            losses = nn.functional.cross_entropy(output.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
            outputs = torch.autograd.grad(losses.sum(), [out for _, _, out in taps])  # each sample's own loss
            taps = [(layer, inputs, grad) for (layer, inputs, _), grad in zip(taps, outputs)]
        pieces = [per_sample_grads(layer, inputs, grad) for layer, inputs, grad in taps]
        if x_norms2 is not None and pieces[0].inputs is x:
            pieces[0].input_norms2 = x_norms2
        factor = clip_factors(pieces, counts, self.clip_norm)
        return [summed for piece in pieces for summed in piece.clipped_sum(factor)], losses.detach()

    def batches(self, clients: list[PrivateClient], rates: list[tuple[float, int, int]],
                order: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Every client's Poisson batches, drawn up front from its own sampling generator: (clients in ``order``,
        steps, blocks · width) indices into the stack's concatenated samples, each row padded with the client's
        first sample, and the (clients, steps) batch sizes (0 past a client's last step)."""
        drawn = []
        for j in order.tolist():
            c, (rate, per_epoch, _) = clients[j], rates[j]
            sample_seed = int(np.random.SeedSequence(c.seed).generate_state(2)[0])
            drawn.append(poisson_batches(torch.Generator().manual_seed(sample_seed), int(c.x.shape[0]), rate,
                                         per_epoch, c.epochs))
        longest = max((len(sizes) for _, sizes in drawn), default=0)
        widest = max((int(sizes.max(initial=0)) for _, sizes in drawn), default=0)
        span = max(1, -(-widest // self.width)) * self.width  # almost always one block
        index = torch.zeros(len(drawn), longest, span, dtype=torch.int64)
        counts = np.zeros((len(drawn), longest), dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum([int(c.x.shape[0]) for c in clients])])
        for row, (j, (blocks, sizes)) in enumerate(zip(order.tolist(), drawn)):
            step = 0
            for block in blocks:
                index[row, step : step + len(block), : block.shape[1]] = block
                step += len(block)
            index[row] += int(starts[j])
            counts[row, : len(sizes)] = sizes
        return index, counts

    def train(self, clients: list[PrivateClient]) -> PrivateStackResult:
        device, stacked, width = self.device, self.stacked, self.width
        sizes = [int(c.x.shape[0]) for c in clients]
        rates = [opacus_rate(n, self.batch_size) for n in sizes]
        steps = np.array([c.epochs * per_epoch for c, (_, per_epoch, _) in zip(clients, rates)])
        order = np.argsort(-steps, kind="stable")
        index, counts = self.batches(clients, rates, order)
        index = index.to(device)
        noises = [torch.Generator(device=device).manual_seed(int(np.random.SeedSequence(clients[j].seed).generate_state(2)[1]))
                  for j in order.tolist()]
        weights = torch.stack([clients[j].start for j in order]).float()
        pieces = [weights[:, lo:hi] for lo, hi in stacked.bounds]  # each parameter's columns, updated in place
        expected = torch.tensor([float(rates[j][2]) for j in order], device=device)[:, None]
        x, y = torch.cat([c.x for c in clients]), torch.cat([c.y for c in clients])
        x_norms2 = x.flatten(1).square().sum(dim=1)  # once a call, not every step: each sample's ‖x‖²
        active = (steps[order][None, :] > np.arange(int(steps.max(initial=0)))[:, None]).sum(axis=1)
        std = self.noise_multiplier * self.clip_norm
        loss_sum, loss_batches = np.zeros(len(clients)), np.zeros(len(clients), dtype=np.int64)
        for step, a in enumerate(active.tolist()):
            sizes_now = counts[:a, step]
            summed, loss_sums = None, None
            for b in range(max(1, -(-int(sizes_now.max()) // width))):  # each block's sums, added in block order
                rows = index[:a, step, b * width : (b + 1) * width]
                count = torch.from_numpy(np.clip(sizes_now - b * width, 0, width)).to(device)
                part, losses = self.clipped_sum(weights[:a], gather(x, rows), gather(y, rows), count, gather(x_norms2, rows))
                valid = (torch.arange(width, device=device)[None, :] < count[:, None]).float()
                part_loss = torch.bmm(valid[:, None, :], losses[:, :, None])[:, 0, 0]
                if b == 0:
                    summed, loss_sums = part, part_loss
                else:
                    summed, loss_sums = [s + p for s, p in zip(summed, part)], loss_sums + part_loss
            if std and step % NOISE_BLOCK == 0:  # the next NOISE_BLOCK steps' noise of every client still training
                noise = self._noise(noises[:a], [int(steps[j]) - step for j in order[:a].tolist()])
            with torch.no_grad():
                for piece, grad, (lo, hi) in zip(pieces, summed, stacked.bounds):
                    if std:
                        grad += noise[:a, step % NOISE_BLOCK, lo:hi]
                    piece[:a].add_(grad / expected[:a], alpha=-self.lr)
            mean = (loss_sums / torch.from_numpy(sizes_now).to(device).clamp(min=1)).cpu().numpy()
            nonempty = sizes_now > 0
            loss_sum[order[:a][nonempty]] += mean[nonempty]
            loss_batches[order[:a][nonempty]] += 1
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
            block[row, :rows].normal_(0.0, std, generator=generator)  # randn's draws, times std in the same pass
            block[row, rows:] = 0.0
        return block
