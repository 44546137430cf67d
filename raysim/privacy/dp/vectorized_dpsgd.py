"""Local DP-SGD (Abadi et al., CCS 2016) for a stack of clients at once, with per-sample gradients from ``vmap``.

The same mechanism, step for step, as the sequential path through Opacus (``local_dpsgd.train_dp_sgd``):
each client's Poisson batches are drawn at Opacus's rate q = 1 / ceil(n / batch_size) for
int(1 / q) steps an epoch, from a torch generator seeded the way that path seeds its loader and
advanced the way the loader advances it, so a client samples the very batches it samples there; each per-sample gradient (of the sample's own
loss) is clipped to C in L2 norm over all trainable parameters with Opacus's factor
min(1, C / (‖g‖ + 1e-6)); the clipped sum gets Gaussian noise of std σ·C per coordinate from the client's own
noise generator, seeded as that path seeds Opacus's, and is divided by Opacus's expected batch size
int(n·q); an empty batch takes a noise-only step; the step is plain SGD. The noise is the same
distribution drawn in another order (a client's whole step in one draw, where Opacus draws each
parameter alone, and already scaled by lr / int(n·q), as the clipping factors are): with noise off the
two paths agree to floating-point rounding, and with noise on they differ by its realization. The accountant is Opacus's
(``accountant.PrivacyAccountant``), stepped once per step with (σ, q), as Opacus steps it.

A client's result does not depend on the other clients of its stack: every step's batches are padded to
one width fixed by the batch size alone (``private_width``), and a batch wider than that goes on in
further rows of the same kernels, one a block of that width, whose sums are added to its client's in
block order (zero padding adds exact zeros). Every kernel then sees the same shapes for a client's rows
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
    mean n·q <= B and variance <= B, so B + sqrt(B) is about one standard deviation above the mean. A batch
    wider than that (one in eight at B = 32) takes a second row, so a client's step costs about 1.12 rows of
    B + sqrt(B) samples, 42.5 at B = 32, against 49 for the B + 3·sqrt(B) that almost no batch exceeds.
    At least 8 (a matmul of fewer rows takes another kernel)."""
    return max(8, math.ceil(batch_size + math.sqrt(batch_size)))


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
                    epochs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One client's Poisson batches, every step of its ``epochs``, as Opacus's loader draws them from its
    generator: each epoch's iterator first takes a base seed (``torch.utils.data``'s iterator does), then one
    uniform mask per step. An epoch's masks are drawn a block of steps at a time (the same stream:
    ``rand(k, n)`` is k ``rand(n)``), at most ``MASK_BLOCK`` numbers a draw. Returns the step and the sample
    of every (step, sample) drawn, in step order and ascending within a step, and the sizes of all steps."""
    steps, samples, sizes, done = [], [], [], 0
    for _ in range(epochs):
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        end = done + per_epoch
        while done < end:
            rows = max(1, min(end - done, MASK_BLOCK // n))
            mask = (torch.rand(rows, n, generator=generator) < rate).numpy()  # Opacus's float32 comparison
            step, sample = np.nonzero(mask)  # row-major
            steps.append(step + done)
            samples.append(sample)
            sizes.append(mask.sum(axis=1))
            done += rows
    if not sizes:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(steps), np.concatenate(samples), np.concatenate(sizes)


class PrivateStackedTrainer:
    """DP-SGD over stacks of clients on one resident model."""

    def __init__(self, stacked: StackedModel, batch_size: int, lr: float, noise_multiplier: float,
                 clip_norm: float, accountant: str, delta: float, device: torch.device) -> None:
        self.stacked, self.batch_size, self.lr, self.device = stacked, batch_size, lr, device
        self.noise_multiplier, self.clip_norm = validate_noise_multiplier(noise_multiplier), clip_norm
        self.accountant, self.delta = accountant, delta
        self.width = private_width(batch_size)

    def clipped_sum(self, rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor, counts: torch.Tensor,
                    x_norms2: torch.Tensor, scale: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each client's sum of its per-sample gradients clipped to C, times its ``scale``, one (a, size) piece
        per parameter in the flat layout's order, and the (a, width) per-sample losses, for (a, width, ...)
        inputs of which the first ``counts`` are real; ``x_norms2``, the inputs' squared norms, spares a linear
        first layer computing them."""
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
        if pieces[0].inputs is x:
            pieces[0].input_norms2 = x_norms2
        factor = clip_factors(pieces, counts, self.clip_norm) * scale[:, None]
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
        longest = max((len(sizes) for _, _, sizes in drawn), default=0)
        counts = np.zeros((len(drawn), longest), dtype=np.int64)
        for row, (_, _, sizes) in enumerate(drawn):
            counts[row, : len(sizes)] = sizes
        span = max(1, -(-int(counts.max(initial=0)) // self.width)) * self.width
        starts = np.concatenate([[0], np.cumsum([int(c.x.shape[0]) for c in clients])])[order]
        index = np.empty((len(drawn), longest, span), dtype=np.int64)
        index[:] = starts[:, None, None]  # padding: each client's first sample
        if drawn:  # every (row, step, position) of a drawn sample, row-major as the draws are
            row = np.concatenate([np.full(len(step), r) for r, (step, _, _) in enumerate(drawn)])
            step = np.concatenate([step for step, _, _ in drawn])
            first = (np.cumsum(counts) - counts.ravel()).reshape(counts.shape)  # each (row, step)'s first draw
            position = np.arange(len(row)) - first[row, step]
            index[row, step, position] += np.concatenate([sample for _, sample, _ in drawn])
        return torch.from_numpy(index), counts

    def train(self, clients: list[PrivateClient]) -> PrivateStackResult:
        device, stacked = self.device, self.stacked
        sizes = [int(c.x.shape[0]) for c in clients]
        rates = [opacus_rate(n, self.batch_size) for n in sizes]
        steps = np.array([c.epochs * per_epoch for c, (_, per_epoch, _) in zip(clients, rates)])
        order = np.argsort(-steps, kind="stable")
        index, counts = self.batches(clients, rates, order)
        index = index.to(device)
        noises = [torch.Generator(device=device).manual_seed(int(np.random.SeedSequence(clients[j].seed).generate_state(2)[1]))
                  for j in order.tolist()]
        weights = torch.stack([clients[j].start for j in order]).float()
        step_sizes = [self.lr / rates[j][2] for j in order.tolist()]  # lr over Opacus's expected batch size
        scales = torch.tensor(step_sizes, device=device)
        x, y = torch.cat([c.x for c in clients]), torch.cat([c.y for c in clients])
        x_norms2 = x.flatten(1).square().sum(dim=1)  # once a call, not every step: each sample's ‖x‖²
        active = (steps[order][None, :] > np.arange(int(steps.max(initial=0)))[:, None]).sum(axis=1)
        std = self.noise_multiplier * self.clip_norm
        loss_sum, loss_batches = np.zeros(len(clients)), np.zeros(len(clients), dtype=np.int64)
        noise = torch.empty(len(clients), stacked.dim, device=device)  # a step's noise, row by row
        for step, a in enumerate(active.tolist()):
            sizes_now = counts[:a, step]
            summed, loss_sums = self._step_sums(weights, scales, index, x, y, x_norms2, step, sizes_now)
            with torch.no_grad():  # the step: minus lr / expected batch size times (clipped sum + noise)
                if std:
                    weights[:a].sub_(self._noise(noise[:a], noises[:a], step_sizes[:a]))
                for grad, (lo, hi) in zip(summed, stacked.bounds):
                    weights[:a, lo:hi].sub_(grad)
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

    def _step_sums(self, weights: torch.Tensor, scales: torch.Tensor, index: torch.Tensor, x: torch.Tensor,
                   y: torch.Tensor, x_norms2: torch.Tensor, step: int,
                   sizes: np.ndarray) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The clipped sums, times ``scales``, and the summed losses of the first ``len(sizes)`` clients' batches
        at ``step``, of ``sizes`` samples. A batch wider than the width goes on in further rows of the same
        kernels, one a block of ``width`` samples, with their client's weights; their sums are added to its
        own in block order."""
        a, width, device = len(sizes), self.width, self.device
        extra = [np.flatnonzero(sizes > b * width) for b in range(1, -(-int(sizes.max()) // width))]
        if extra:
            member = np.concatenate([np.arange(a), *extra])
            block = np.concatenate([np.zeros(a, dtype=np.int64), *[np.full(len(e), b) for b, e in enumerate(extra, 1)]])
            members, blocks = torch.from_numpy(member).to(device), torch.from_numpy(block).to(device)
            rows = index[:, step].unflatten(1, (-1, width))[members, blocks]
            own, scale = weights.index_select(0, members), scales.index_select(0, members)
            left = sizes[member] - block * width
        else:
            rows, own, scale, left = index[:a, step, :width], weights[:a], scales[:a], sizes
        count = torch.from_numpy(np.clip(left, 0, width)).to(device)
        part, losses = self.clipped_sum(own, gather(x, rows), gather(y, rows), count, gather(x_norms2, rows), scale)
        valid = (torch.arange(width, device=device)[None, :] < count[:, None]).float()
        loss = torch.bmm(valid[:, None, :], losses[:, :, None])[:, 0, 0]
        summed, loss_sums, start = [piece[:a] for piece in part], loss[:a], a
        for e in extra:
            at, end = torch.from_numpy(e).to(device), start + len(e)
            for s, piece in zip(summed, part):
                s.index_add_(0, at, piece[start:end])
            loss_sums.index_add_(0, at, loss[start:end])
            start = end
        return summed, loss_sums

    def _noise(self, out: torch.Tensor, generators: list[torch.Generator], scales: list[float]) -> torch.Tensor:
        """``out`` (clients, D) filled with one step's Gaussian noise of std σ·C times each client's ``scales``,
        each row in one draw from its client's own generator (randn's draws, times the std in the same pass)."""
        std = self.noise_multiplier * self.clip_norm
        for row, generator, scale in zip(out, generators, scales):
            row.normal_(0.0, std * scale, generator=generator)
        return out
