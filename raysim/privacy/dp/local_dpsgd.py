"""One client's local training with DP-SGD (Abadi et al., CCS 2016) through Opacus's ``PrivacyEngine``.

Sample-level privacy inside a client: Poisson-sampled batches, per-sample gradients clipped
to ``max_grad_norm`` and Gaussian noise of std ``noise_multiplier · max_grad_norm`` per
step. The sample rate is Opacus's ``1 / ceil(n / batch_size)`` (= batch_size / n when it
divides n), which is both the rate the Poisson loader draws with and the rate the
accountant is stepped with, and an epoch is ``ceil(n / batch_size)`` steps.

A strategy's data-free term (FedProx's proximal gradient μ(w − w_t), SCAFFOLD's correction c − c_i) joins
each private step as ``step_term``: it is evaluated at the weights before the step and applied with the
noised gradient, so the step is SGD on g̃ + h(w). It reads no example, so the steps stay the same
sequence of subsampled Gaussian mechanisms and the accounting is unchanged (this is how Noble et al.,
AISTATS 2022, privatize SCAFFOLD with sample-level DP: DP-SCAFFOLD's Δc_i is post-processing of the
private trajectory).

Each client owns an accountant whose history persists across rounds: the caller passes the
picklable state in and stores the one that comes back. The worker reuses one model across
clients, so the module is trained in place and Opacus's hooks and per-parameter attributes
are removed before returning. A guard raises if noisy steps left every trainable parameter
unchanged, since Opacus combined with PEFT has been reported to train silently wrong
(opacus#820); the tests check that LoRA adapters do move with the installed versions.
Sampling and noise come from torch generators seeded from ``seed``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.validators.errors import UnsupportedModuleError
from torch.utils.data import DataLoader, Dataset

from raysim.errors import ScenarioError
from raysim.privacy.dp.accountant import PrivacyAccountant, validate_noise_multiplier


@dataclass(frozen=True)
class DPSGDResult:
    """What one client's private local training produced; ``accountant_state`` replaces the one passed in."""

    steps: int
    mean_loss: float
    accountant_state: dict[str, Any]
    epsilon: float
    sample_rate: float


class _Arrays(Dataset):
    """A client's examples, fetched a whole batch at a time (``__getitems__``) rather than row by row."""

    def __init__(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self.x = torch.as_tensor(x)
            self.y = torch.as_tensor(y)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.as_tensor(indices, dtype=torch.long)
        return self.x[rows], self.y[rows]


def _whole_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


def train_dp_sgd(
    model: torch.nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    noise_multiplier: float,
    max_grad_norm: float,
    accountant_state: dict[str, Any] | None,
    delta: float,
    seed: int,
    device: str = "cpu",
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    accountant: str = "rdp",
    step_term: Callable[[], Callable[[], None]] | None = None,
) -> DPSGDResult:
    """Train ``model`` (already on ``device``) in place with DP-SGD and return the client's updated accountant.

    ``x``/``y`` are the client's examples (numpy, possibly read-only, or tensors). Trainable
    parameters are those with ``requires_grad``; frozen ones are left alone.
    ``accountant_state`` is the ``accountant_state`` of this client's previous result, or
    None the first time it trains; ``accountant`` ("rdp" or "prv") must match it. ``step_term``, called
    before each step, returns what applies the strategy's term after it (see the module's docstring). RDP is
    the cheap choice per client (its per-step curve is memoised per (z, q)); PRV recomputes
    its FFT composition on every call (~0.1–0.5 s).
    """
    _validate(x, y, epochs=epochs, batch_size=batch_size, lr=lr, max_grad_norm=max_grad_norm)
    validate_noise_multiplier(noise_multiplier)
    client_accountant = PrivacyAccountant(accountant, delta)
    if accountant_state is not None:
        client_accountant.load_state_dict(accountant_state)
    sample_seed, noise_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    loader = DataLoader(
        _Arrays(x, y), batch_size=batch_size, collate_fn=_whole_batch, generator=torch.Generator().manual_seed(sample_seed)
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=accountant)
    engine.accountant.load_state_dict(client_accountant.state_dict())
    model.train()
    try:
        private_model, private_optimizer, private_loader = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(trainable, lr=lr),
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
            noise_generator=torch.Generator(device=device).manual_seed(noise_seed),
        )
    except UnsupportedModuleError as error:
        raise ScenarioError(
            f"model: not compatible with DP-SGD ({error}); replace BatchNorm with GroupNorm or pick a supported model"
        ) from error
    try:
        steps, mean_loss = _run_epochs(
            private_model, private_optimizer, private_loader, epochs=epochs, device=device,
            loss_fn=loss_fn if loss_fn is not None else torch.nn.CrossEntropyLoss(), step_term=step_term,
        )
    finally:
        private_model.cleanup()  # removes Opacus's hooks and its per-parameter attributes from ``model``
        for p in trainable:
            p.grad = None
    _check_parameters_moved(trainable, before, steps=steps, noise_multiplier=noise_multiplier)
    client_accountant.load_state_dict(engine.accountant.state_dict())
    return DPSGDResult(
        steps=steps,
        mean_loss=mean_loss,
        accountant_state=client_accountant.state_dict(),
        epsilon=client_accountant.epsilon(),
        sample_rate=1.0 / len(loader),
    )


def _run_epochs(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    epochs: int,
    device: str,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    step_term: Callable[[], Callable[[], None]] | None = None,
) -> tuple[int, float]:
    """The plain training loop over Poisson batches; the private optimizer clips, noises and steps the accountant."""
    steps, loss_sum, loss_batches = 0, torch.zeros((), device=device), 0
    with warnings.catch_warnings():
        # Opacus's full backward hooks on the input layer trigger this benign PyTorch notice.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        for _ in range(epochs):
            for xb, yb in loader:
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                loss.backward()
                apply_term = None if step_term is None else step_term()  # at the weights before the step
                optimizer.step()  # an empty Poisson batch still takes a (noise-only) step
                if apply_term is not None:
                    apply_term()
                steps += 1
                if len(xb):
                    loss_sum += loss.detach()
                    loss_batches += 1
    return steps, float(loss_sum) / loss_batches if loss_batches else math.nan


def _check_parameters_moved(
    trainable: list[torch.nn.Parameter], before: list[torch.Tensor], *, steps: int, noise_multiplier: float
) -> None:
    if steps and noise_multiplier > 0 and all(torch.equal(p.detach(), b) for p, b in zip(trainable, before)):
        raise RuntimeError(
            f"DP-SGD took {steps} noisy steps but no trainable parameter changed: the private optimizer is not "
            "updating the model's own parameters (see opacus#820 for the Opacus/PEFT case)"
        )


def _validate(
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    max_grad_norm: float,
) -> None:
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"a client needs as many labels as examples, and at least one (got {len(x)} and {len(y)})")
    if not epochs >= 1:
        raise ScenarioError(f"client.epochs: must be >= 1 (got {epochs})")
    if not batch_size >= 1:
        raise ScenarioError(f"client.batch_size: must be >= 1 (got {batch_size})")
    if not lr > 0:
        raise ScenarioError(f"client.lr: must be > 0 (got {lr})")
    if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        raise ScenarioError(
            f"privacy.max_grad_norm: must be finite and > 0 (got {max_grad_norm}); "
            "per-sample clipping needs a bound such as 1.0"
        )
