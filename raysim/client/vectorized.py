"""Vectorized local training: the clients of a call trained together, one batched step for all of them.

Each client still takes exactly the steps of the sequential loop (``raysim.client.train.train_client``):
its own permutation per epoch from the same client generator, the same batch boundaries and last
partial batch, the mean loss over its real samples, the strategy's gradient hook (FedProx's proximal
term, SCAFFOLD's correction) and SGD (momentum, weight decay) or Adam with its own optimizer state. So
the result equals the sequential one up to floating-point summation order.

How: the clients' parameters are the rows of one (clients, D) matrix in the flat layout of
``FlatParams``. A step gathers every training client's batch, padded to ``batch_size`` with a mask,
runs one batched forward (``StackedModel``: a ``baddbmm`` per layer over the stack) and one backward, and
updates the rows in place. The backward of Linear/ReLU stacks (logistic regression, the MLP) is written by
hand with autograd's own kernels, bit for bit, which spares a small step autograd's graph, most of its
cost; a convolutional model's is autograd's. The clients are ordered by their number of steps, most first, so the clients still
training at step s are a prefix of the matrix: a client whose steps are done (a small client, a
straggler's shortened epochs) drops out of the prefix and its row, and its optimizer state, stay as
they are. A client's batch is always padded to ``batch_size`` and only its row is read, so its
computation has the same shapes whatever clients share its stack, and packing calls differently
(batched kernels over a different number of clients) does not change a client's result; the tests
check that bit for bit. This is the "vectorize small clients" principle of the design card, with DP-SGD's
per-sample clipping the same way (``raysim.privacy.dp.vectorized_dpsgd``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from raysim.client.optimizer import ADAM_BETAS, ADAM_EPS
from raysim.config import TrainingConfig

Hook = Callable[[torch.Tensor, torch.Tensor], None]


@dataclass
class StackedClient:
    """One client of a stack: its samples on the device, its epochs, its generator and where it starts."""

    x: torch.Tensor
    y: torch.Tensor
    epochs: int
    rng: np.random.Generator
    start: torch.Tensor  # the global model it starts from (D,)


@dataclass(frozen=True)
class StackResult:
    """Per client, in the order given: its local model (a row of ``local``), its steps and its mean loss."""

    local: torch.Tensor
    steps: np.ndarray
    mean_loss: np.ndarray


def batch_plan(sizes: list[int], epochs: list[int], batch_size: int,
               rngs: list[np.random.Generator]) -> tuple[np.ndarray, np.ndarray]:
    """Each client's minibatches as the sequential loop draws them: ``rows[s, j, :counts[s, j]]`` are the
    indices (into client j's own samples) of its step s; a client with fewer steps has count 0 after them."""
    per_client = []
    for n, e, rng in zip(sizes, epochs, rngs):
        steps = []
        for _ in range(e):
            order = rng.permutation(n)
            steps += [order[start : start + batch_size] for start in range(0, n, batch_size)]
        per_client.append(steps)
    total = max((len(steps) for steps in per_client), default=0)
    rows = np.zeros((total, len(sizes), batch_size), dtype=np.int64)
    counts = np.zeros((total, len(sizes)), dtype=np.int64)
    for j, steps in enumerate(per_client):
        for s, batch in enumerate(steps):
            rows[s, j, : len(batch)], counts[s, j] = batch, len(batch)
    return rows, counts


class StackedOptimizer:
    """``make_optimizer``'s SGD (momentum, weight decay) or Adam, with one state row per client.

    The update is ``LocalOptimizer``'s (torch's single-tensor SGD / Adam, no dampening, no Nesterov, no
    AMSGrad), written over the rows ``[:a]`` of the clients still training, who have all taken the same number of
    steps, so Adam's bias correction is one scalar per step.
    """

    def __init__(self, config: TrainingConfig, rows: int, dim: int, device: torch.device) -> None:
        self.config = config
        zeros = lambda: torch.zeros(rows, dim, device=device)  # noqa: E731
        self.momentum = zeros() if config.optimizer == "sgd" and config.momentum else None
        self.moments = (zeros(), zeros()) if config.optimizer == "adam" else None

    @property
    def slots(self) -> int:
        """State rows per client."""
        return 2 if self.moments is not None else int(self.momentum is not None)

    @torch.no_grad()
    def step(self, weights: torch.Tensor, grad: torch.Tensor, step: int) -> None:
        """One step of the ``len(grad)`` clients at the top of ``weights``, whose step number is ``step``."""
        c, a = self.config, grad.shape[0]
        params = weights[:a]
        if c.weight_decay:
            grad = grad.add(params, alpha=c.weight_decay)
        if self.moments is not None:
            (beta1, beta2), t = ADAM_BETAS, step + 1
            first, second = self.moments[0][:a], self.moments[1][:a]
            first.lerp_(grad, 1 - beta1)
            second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (second.sqrt() / ((1 - beta2**t) ** 0.5)).add_(ADAM_EPS)
            params.addcdiv_(first, denom, value=-c.lr / (1 - beta1**t))
            return
        if self.momentum is not None:
            buffer = self.momentum[:a]
            if step == 0:
                buffer.copy_(grad)
            else:
                buffer.mul_(c.momentum).add_(grad)
            grad = buffer
        params.add_(grad, alpha=-c.lr)


class StackedModel:
    """A zoo model (``raysim.models.zoo``) run on a stack of flat parameter rows: (a, D) rows and (a, B, ...)
    inputs give (a, B, classes) outputs.

    Each layer is one batched kernel over the stack: a linear layer is a ``baddbmm``, a convolution an
    ``unfold`` and a ``baddbmm``, and ReLU, max pooling and flattening act on the merged (a·B) batch. Every
    client's share of a kernel is then the same computation whatever the stack holds. (``vmap`` of
    ``functional_call`` turns a convolution with per-client weights into one grouped convolution, whose
    result for a client changed with the number of clients in the stack: measured, and it would have
    made the model depend on how calls are packed, so the number of workers.)
    """

    def __init__(self, model: nn.Module, sample_shape: tuple[int, ...]) -> None:
        self.layers = stacked_layers(model)
        self.shapes = [p.shape for p in model.parameters() if p.requires_grad]
        self.dim = sum(shape.numel() for shape in self.shapes)
        self.params = [p for layer in self.layers for p in layer.parameters()]  # in FlatParams order
        ends = np.cumsum([p.numel() for p in self.params]).tolist()
        self.bounds = list(zip([0, *ends[:-1]], ends))  # each parameter's columns of a row
        if (ends[-1] if ends else 0) != self.dim:
            raise ValueError("model: its trainable parameters are not the stacked layers' (frozen layers are not vectorized)")
        self.activations = _activation_numel(model, sample_shape)
        # Linear, ReLU and Flatten layers only (logistic regression, the MLP): ``loss_and_grad`` backpropagates by
        # hand, kernel for kernel what autograd runs, without its graph (most of a small step's cost)
        self.by_hand = all(isinstance(layer, (nn.Linear, nn.ReLU, nn.Flatten)) for layer in self.layers)
        self.first_linear = next((i for i, layer in enumerate(self.layers) if isinstance(layer, nn.Linear)), 0)

    def split(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter of every row, as (a, *shape) views of ``rows``, each a leaf that wants its gradient
        (separate leaves, so the backward never scatters into the whole (a, D) matrix)."""
        return [view.detach().requires_grad_(True) for view in self._views(rows)]

    def _views(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter of every row, as (a, *shape) views of ``rows``."""
        return [rows[:, lo:hi].view(rows.shape[0], *p.shape) for p, (lo, hi) in zip(self.params, self.bounds)]

    def forward(self, params: list[torch.Tensor], x: torch.Tensor, taps: list | None = None) -> torch.Tensor:
        """The stacked output for ``split`` parameters and (a, B, ...) inputs. ``taps``, when given, gets
        (layer, its input, its output) for each layer with parameters, the input of a convolution as its
        unfolded patches (a, B, patch, L): what per-sample gradients are made of."""
        a, b = x.shape[:2]
        h, taken = x, iter(params)
        for layer in self.layers:
            if isinstance(layer, nn.Linear):
                weight, bias = next(taken), next(taken)
                inputs, h = h, torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
            elif isinstance(layer, nn.Conv2d):
                inputs, h = _conv2d(layer, next(taken), next(taken), h)
            else:  # Flatten, ReLU, MaxPool2d: per sample, on the merged batch
                h = h.reshape(a, b, -1) if isinstance(layer, nn.Flatten) else layer(h.flatten(0, 1)).unflatten(0, (a, b))
                continue
            if taps is not None:
                taps.append((layer, inputs, h))
        return h

    @staticmethod
    def flat(grads: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Per-parameter gradients back in the (a, D) flat layout."""
        return torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)

    def loss_and_grad(self, rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor,
                      count: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Each row's mean cross-entropy over its ``count`` real samples of (a, B, ...) inputs (``valid`` masks
        them), returned as (a,), with its gradient written into ``grad`` (a, D): ``torch.autograd.grad`` of the
        losses' sum through ``forward``, bit for bit (``by_hand`` models only; the tests hold it to autograd)."""
        saved, log_probs, losses = self._losses_by_hand(rows, x, y)
        per_sample = valid * (torch.ones(x.shape[0], device=x.device) / count)[:, None]  # d loss.sum() / d sample loss
        self._backward_by_hand(saved, _cross_entropy_backward(log_probs, y.flatten(), per_sample), grad)
        return (losses * valid).sum(dim=1) / count

    def sample_losses_by_hand(self, rows: torch.Tensor, x: torch.Tensor,
                              y: torch.Tensor) -> tuple[torch.Tensor, list[tuple[nn.Module, torch.Tensor, torch.Tensor]]]:
        """Each sample's own loss (a, B), and for each linear layer (the layer, its input, the gradient of the
        losses' sum with respect to its output): ``forward``'s taps and their ``torch.autograd.grad``, bit for
        bit, without autograd (``by_hand`` models only)."""
        saved, log_probs, losses = self._losses_by_hand(rows, x, y)
        upstream = _cross_entropy_backward(log_probs, y.flatten(), torch.ones_like(losses))
        return losses, self._backward_by_hand(saved, upstream)

    def _losses_by_hand(self, rows: torch.Tensor, x: torch.Tensor,
                        y: torch.Tensor) -> tuple[list, torch.Tensor, torch.Tensor]:
        """``_forward_by_hand``'s saved values, the log-probabilities (a·B, classes) and each sample's cross-entropy
        (a, B), as ``nn.functional.cross_entropy`` computes them (log-softmax, then nll)."""
        output, saved = self._forward_by_hand(rows, x)
        log_probs = torch.log_softmax(output.flatten(0, 1), dim=1)
        return saved, log_probs, nn.functional.nll_loss(log_probs, y.flatten(), reduction="none").view(y.shape)

    def _forward_by_hand(self, rows: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        """``forward`` without autograd, keeping what the backward reads: a linear layer's (layer, weight, input),
        a ReLU's output, a Flatten's input shape (None where its input is already flat)."""
        a, b = x.shape[:2]
        h, saved, taken = x, [], iter(self._views(rows))
        for layer in self.layers:
            if isinstance(layer, nn.Linear):
                weight, bias = next(taken), next(taken)
                saved.append((layer, weight, h))
                h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
            elif isinstance(layer, nn.ReLU):
                h = torch.relu(h)
                saved.append(h)
            else:  # Flatten; flat samples stay the very tensor (whose norms DP-SGD knows)
                saved.append(h.shape if h.dim() > 3 else None)
                h = h.reshape(a, b, -1) if h.dim() > 3 else h
        return h, saved

    def _backward_by_hand(self, saved: list, upstream: torch.Tensor,
                          grad: torch.Tensor | None = None) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor]]:
        """Backpropagate ``upstream``, the gradient at the output, with the kernels autograd runs for ``forward``
        (``threshold_backward`` for ReLU; for a linear layer a sum for its bias, ``bmm`` of its input for its
        weight and ``bmm`` of its weight for its input): fills ``grad`` (a, D) when given, and returns each
        linear layer's (layer, input, output gradient) in forward order. The data's gradient is not formed."""
        taps, pieces = [], iter(reversed(self.bounds))
        for item in reversed(saved[self.first_linear:]):
            if item is None:  # Flatten of flat samples
                continue
            if isinstance(item, torch.Size):  # Flatten
                upstream = upstream.reshape(item)
            elif isinstance(item, torch.Tensor):  # ReLU's output
                upstream = torch.ops.aten.threshold_backward(upstream, item, 0)
            else:
                layer, weight, inputs = item
                taps.append((layer, inputs, upstream))
                if grad is not None:
                    (bias_lo, bias_hi), (weight_lo, weight_hi) = next(pieces), next(pieces)
                    grad[:, bias_lo:bias_hi] = upstream.sum(dim=1)
                    grad[:, weight_lo:weight_hi].view_as(weight).copy_(
                        torch.bmm(inputs.transpose(1, 2), upstream).transpose(1, 2))
                if item is not saved[self.first_linear]:
                    upstream = torch.bmm(upstream, weight)
        return taps[::-1]


def _cross_entropy_backward(log_probs: torch.Tensor, target: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
    """The gradient at the logits of Σ per_sample · (each sample's cross-entropy), as autograd forms it:
    nll's backward (−per_sample at the target), then log-softmax's. Returns (*per_sample.shape, classes)."""
    upstream = torch.zeros_like(log_probs).scatter_(1, target[:, None], -per_sample.reshape(-1, 1))
    return torch._log_softmax_backward_data(upstream, log_probs, 1, log_probs.dtype).view(*per_sample.shape, -1)


def gather(samples: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``samples[index]`` for an index tensor of any shape, as one ``index_select`` (a plain gather, several times
    faster than advanced indexing here)."""
    return samples.index_select(0, index.flatten()).view(*index.shape, *samples.shape[1:])


def stacked_layers(model: nn.Module) -> list[nn.Module]:
    """The zoo model's layers in call order (their parameters in ``FlatParams`` order)."""
    from raysim.models.zoo import SmallCNN

    layers = [*model.features, nn.Flatten(), model.head] if isinstance(model, SmallCNN) else list(model)
    for layer in layers:
        if not isinstance(layer, (nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten)):
            raise ValueError(f"model: a {type(layer).__name__} layer cannot be vectorized")
        if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or layer.padding_mode != "zeros"):
            raise ValueError("model: only plain zero-padded convolutions are vectorized")
    return layers


def _conv2d(layer: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor,
            h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A convolution with each client's own kernel: im2col, then one ``baddbmm`` over the stack.
    Returns (the patches (a, b, patch, L), the output (a, b, out_channels, H', W'))."""
    a, b, _, height, width = h.shape
    out_channels, patch = weight.shape[1], weight[0].numel() // weight.shape[1]
    cols = nn.functional.unfold(h.flatten(0, 1), layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                                stride=layer.stride)  # (a·b, patch, L)
    positions = cols.shape[-1]
    patches = cols.view(a, b, patch, positions)
    out = torch.baddbmm(bias.unsqueeze(2), weight.reshape(a, out_channels, patch),
                        patches.transpose(1, 2).reshape(a, patch, b * positions))
    out_h = (height + 2 * layer.padding[0] - layer.dilation[0] * (layer.kernel_size[0] - 1) - 1) // layer.stride[0] + 1
    out_w = (width + 2 * layer.padding[1] - layer.dilation[1] * (layer.kernel_size[1] - 1) - 1) // layer.stride[1] + 1
    return patches, out.view(a, out_channels, b, out_h, out_w).transpose(1, 2)


def _activation_numel(model: nn.Module, sample_shape: tuple[int, ...]) -> int:
    """Numbers the leaf modules of ``model`` output for one sample (what a forward keeps for its backward)."""
    total = 0

    def count(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(torch.zeros((1, *sample_shape), device=device))
    finally:
        for handle in handles:
            handle.remove()
    return total


class StackedTrainer:
    """Trains stacks of clients on one resident model, ``max_clients`` at a time."""

    def __init__(self, model: nn.Module, sample_shape: tuple[int, ...], config: TrainingConfig,
                 device: torch.device, memory_bytes: float, extra_rows: int = 0) -> None:
        """``extra_rows``: vectors per client the caller stacks besides parameters, gradient and start
        (SCAFFOLD's c and c_i)."""
        self.stacked = StackedModel(model, sample_shape)
        self.config, self.device = config, device
        opt_slots = StackedOptimizer(config, 0, 0, device).slots
        per_client = 4 * (self.stacked.dim * (4 + opt_slots + extra_rows)
                          + config.batch_size * (3 * self.stacked.activations + math.prod(sample_shape)))
        self.max_clients = max(1, int(memory_bytes // per_client))

    def train(self, clients: list[StackedClient], hook_for: Callable[[np.ndarray, int], Hook | None]) -> StackResult:
        """Train ``clients`` together; ``hook_for(order, a)`` is the strategy's hook for the clients
        ``order[:a]`` (positions in ``clients``) on the top ``a`` rows, or None."""
        config, device = self.config, self.device
        sizes = [int(c.x.shape[0]) for c in clients]
        rows, counts = batch_plan(sizes, [c.epochs for c in clients], config.batch_size, [c.rng for c in clients])
        steps = (counts > 0).sum(axis=0)
        order = np.argsort(-steps, kind="stable")
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        rows = torch.from_numpy(rows[:, order] + offsets[order][None, :, None]).to(device)
        counts = torch.from_numpy(counts[:, order]).to(device)
        active = (counts > 0).sum(dim=1).tolist()
        x, y = torch.cat([c.x for c in clients]), torch.cat([c.y for c in clients])
        weights = torch.stack([clients[j].start for j in order]).float()
        optimizer = StackedOptimizer(config, len(clients), self.stacked.dim, device)
        loss_sum = torch.zeros(len(clients), device=device)
        slots = torch.arange(config.batch_size, device=device)
        hooks: dict[int, Hook | None] = {}
        grads = torch.empty_like(weights) if self.stacked.by_hand else None
        for step, a in enumerate(active):
            batch, count = rows[step, :a], counts[step, :a]
            valid = (slots < count[:, None]).float()
            inputs, targets = gather(x, batch), gather(y, batch)
            if grads is not None:
                grad = grads[:a]
                loss = self.stacked.loss_and_grad(weights[:a], inputs, targets, valid, count, grad)
            else:
                params = self.stacked.split(weights[:a])
                output = self.stacked.forward(params, inputs)
                per_sample = nn.functional.cross_entropy(output.flatten(0, 1), targets.flatten(), reduction="none")
                loss = (per_sample.view(a, -1) * valid).sum(dim=1) / count
                grad = self.stacked.flat(torch.autograd.grad(loss.sum(), params))
            if a not in hooks:
                hooks[a] = hook_for(order, a)
            if hooks[a] is not None:
                hooks[a](grad, weights[:a])
            optimizer.step(weights, grad, step)
            loss_sum[:a] += loss.detach()
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        mean_loss = (loss_sum.cpu().numpy() / np.maximum(steps[order], 1))[back]
        return StackResult(local=weights[torch.from_numpy(back).to(device)], steps=steps, mean_loss=mean_loss)
