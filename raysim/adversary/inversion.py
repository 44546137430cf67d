"""Gradient inversion: reconstructing a client's training batch from what the server received of its update.

* DLG (Zhu, Liu, Han, NeurIPS 2019): optimize dummy inputs (and soft labels) with L-BFGS until their
  gradient matches the observed one in squared L2 distance.
* iDLG (Zhao, Mopuri, Bilen, 2020): for cross-entropy, the last layer's bias gradient is p − y summed over
  the batch, negative exactly at the labels present, so the labels come first and DLG then optimizes the
  inputs alone. For a batch, the ``count`` most negative entries are taken (each label once; a batch that
  repeats a label loses the repeats).
* Geiping, Bauermeister, Dröge, Moeller (NeurIPS 2020): maximize the cosine similarity of the gradients
  with Adam on signed gradients, plus a total-variation prior for image-shaped samples, inside the data's
  box.

A multi-step FedAvg update is used as a pseudo-gradient, as those papers do: g = −Δ/(η·steps) (the mean
step's gradient). What the attack is handed is the server's view: one client's update with plain
FedAvg, the survivors' sum under secure aggregation, the noised aggregate under central DP, or the
client's DP-SGD update; the same code attacks each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from raysim.models.flat import FlatParams


@dataclass
class Reconstruction:
    """The attack's batch: samples shaped like the data and the labels it settled on."""

    x: np.ndarray
    labels: np.ndarray
    objective: float


def recover_labels(bias_grad: np.ndarray, count: int) -> np.ndarray:
    """iDLG: the ``count`` labels whose bias gradient is most negative (for one sample, the one negative entry).

    A batch larger than the classes repeats labels: each label with a negative entry gets a share of the
    ``count`` in proportion to it (∂L/∂b_c is about −n_c/B when the model is unsure), largest remainders first.
    """
    order = np.argsort(bias_grad, kind="stable")
    if count <= len(bias_grad):
        return np.sort(order[:count])
    mass = np.maximum(-np.asarray(bias_grad, dtype=np.float64), 0.0)
    if mass.sum() == 0:
        mass = np.ones_like(mass)
    share = mass / mass.sum() * count
    counts = np.floor(share).astype(int)
    for c in np.argsort(-(share - counts), kind="stable")[: count - counts.sum()]:
        counts[c] += 1
    return np.repeat(np.arange(len(bias_grad)), counts)


def _gradient(model: nn.Module, flat: FlatParams, x: torch.Tensor, y: torch.Tensor, soft: bool) -> torch.Tensor:
    logits = model(x)
    if soft:  # DLG's joint optimization: y holds label logits
        loss = torch.mean(torch.sum(-torch.softmax(y, dim=-1) * torch.log_softmax(logits, dim=-1), dim=-1))
    else:
        loss = nn.functional.cross_entropy(logits, y)
    grads = torch.autograd.grad(loss, flat.params, create_graph=True)
    return torch.cat([g.reshape(-1) for g in grads])


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    if x.dim() < 4:
        return x.new_zeros(())
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def invert(model: nn.Module, weights: np.ndarray, target: np.ndarray, sample_shape: tuple[int, ...], count: int,
           num_classes: int, *, method: str = "idlg", iterations: int = 300, seed: int = 0,
           box: tuple[float, float] = (-3.0, 3.0), tv_weight: float = 1e-2) -> Reconstruction:
    """Reconstruct ``count`` samples whose gradient at ``weights`` matches the pseudo-gradient ``target``.

    ``method``: ``dlg`` (labels optimized jointly), ``idlg`` (labels from the bias gradient, then DLG's L-BFGS),
    ``geiping`` (labels as iDLG, cosine distance with Adam and a TV prior). ``model``'s trainable parameters
    are set to ``weights`` (a flat vector in ``FlatParams`` order); its buffers are left alone.
    """
    generator = torch.Generator().manual_seed(seed)
    flat = FlatParams(model)
    flat.load(np.asarray(weights, dtype=np.float32))
    model.eval()  # the attack reads the model the server holds; dropout off
    goal = torch.from_numpy(np.asarray(target, dtype=np.float32))
    x = torch.randn((count, *sample_shape), generator=generator).requires_grad_(True)
    last_bias = goal[-num_classes:].numpy()  # every zoo model ends with a Linear whose bias is the last parameter
    labels = recover_labels(last_bias, count) if method != "dlg" else None
    if method == "dlg":
        soft = torch.randn((count, num_classes), generator=generator).requires_grad_(True)
        variables, y = [x, soft], soft
    else:
        variables, y = [x], torch.from_numpy(labels).long()
    if method == "geiping":
        optimizer = torch.optim.Adam(variables, lr=0.1)
        # The paper's schedule: the step size falls tenfold at 3/8, 5/8 and 7/8 of the iterations.
        schedule = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=[iterations * 3 // 8, iterations * 5 // 8, iterations * 7 // 8], gamma=0.1)
        for _ in range(iterations):
            optimizer.zero_grad()
            g = _gradient(model, flat, x, y, soft=False)
            objective = 1 - torch.nn.functional.cosine_similarity(g, goal, dim=0) + tv_weight * _total_variation(x)
            objective.backward()
            x.grad.sign_()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                x.clamp_(*box)
        final = float(objective.detach())
    else:
        optimizer = torch.optim.LBFGS(variables, lr=1.0, max_iter=iterations, history_size=100,
                                      line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            distance = torch.sum((_gradient(model, flat, x, y, soft=method == "dlg") - goal) ** 2)
            distance.backward()
            return distance

        final = float(optimizer.step(closure).detach())
    if method == "dlg":
        labels = np.asarray(torch.argmax(y.detach(), dim=-1).numpy())
    return Reconstruction(x=x.detach().numpy(), labels=np.asarray(labels), objective=final)


def pseudo_gradient(update: np.ndarray, lr: float, steps: float) -> np.ndarray:
    """The mean step's gradient a FedAvg update Δ stands for: −Δ/(η·steps)."""
    return -np.asarray(update, dtype=np.float64) / (lr * max(steps, 1.0))


def _matching(reconstructed: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pairwise MSE of true (rows) and reconstructed (columns) samples, and the reconstruction matched to each
    true sample (Hungarian)."""
    from scipy.optimize import linear_sum_assignment  # scipy ships with scikit-learn

    a = reconstructed.reshape(len(reconstructed), -1)
    b = true.reshape(len(true), -1)
    cost = ((b[:, None, :] - a[None, :, :]) ** 2).mean(axis=-1)
    return cost, linear_sum_assignment(cost)[1]


def matched_order(reconstructed: np.ndarray, true: np.ndarray) -> np.ndarray:
    """The reconstructions reordered to sit beside the true samples they were matched to."""
    return reconstructed[_matching(reconstructed, true)[1]]


def matched_error(reconstructed: np.ndarray, true: np.ndarray, data_range: float) -> tuple[float, float]:
    """(MSE, PSNR in dB) after matching each true sample to a reconstructed one (Hungarian, on MSE)."""
    cost, cols = _matching(reconstructed, true)
    mse = float(cost[np.arange(len(cols)), cols].mean())
    return mse, float(10 * np.log10(data_range**2 / mse)) if mse > 0 else float("inf")


def label_accuracy(recovered: np.ndarray, true: np.ndarray) -> float:
    """The share of the true labels found, as multisets (order does not matter)."""
    found = 0
    pool = list(np.asarray(recovered).tolist())
    for label in np.asarray(true).tolist():
        if label in pool:
            pool.remove(label)
            found += 1
    return found / max(len(true), 1)
