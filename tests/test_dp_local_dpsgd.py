"""Specifications of one client's DP-SGD through Opacus: in-place updates, persistent accountant, clean model afterwards."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from raysim.errors import ScenarioError
from raysim.privacy.dp.local_dpsgd import train_dp_sgd

SETTINGS = dict(epochs=1, batch_size=32, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _data(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 12)).astype(np.float32)
    x.setflags(write=False)  # as read zero-copy from the object store
    return x, rng.integers(0, 3, n)


def _hook_count(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def test_dp_sgd_updates_the_models_own_parameters_in_place():
    model = _mlp()
    originals = list(model.parameters())
    before = [p.detach().clone() for p in originals]
    result = train_dp_sgd(model, *_data(), accountant_state=None, seed=1, **SETTINGS)
    assert result.steps > 0
    assert list(model.parameters()) == originals
    assert all(not torch.equal(p.detach(), b) for p, b in zip(originals, before))
    assert all(p.grad is None for p in originals)


def test_epsilon_grows_across_rounds_with_the_persisted_accountant():
    model, (x, y) = _mlp(), _data()
    first = train_dp_sgd(model, x, y, accountant_state=None, seed=1, **SETTINGS)
    state = pickle.loads(pickle.dumps(first.accountant_state))
    second = train_dp_sgd(model, x, y, accountant_state=state, seed=2, **SETTINGS)
    assert 0 < first.epsilon < second.epsilon < math.inf
    assert sum(n for _, _, n in second.accountant_state["history"]) == first.steps + second.steps
    assert math.isfinite(second.mean_loss)


def test_hooks_and_per_sample_state_do_not_accumulate_across_clients():
    model, (x, y) = _mlp(), _data()
    assert _hook_count(model) == 0
    state = None
    for seed in range(3):
        state = train_dp_sgd(model, x, y, accountant_state=state, seed=seed, **SETTINGS).accountant_state
        assert _hook_count(model) == 0
        assert not hasattr(model, "autograd_grad_sample_hooks")
        assert not any(hasattr(p, "grad_sample") or hasattr(p, "_forward_counter") for p in model.parameters())


def test_sample_rate_and_steps_follow_the_batch_size_and_epochs():
    x, y = _data(n=200)
    result = train_dp_sgd(_mlp(), x, y, accountant_state=None, seed=3, **{**SETTINGS, "epochs": 2})
    assert result.sample_rate == 1 / math.ceil(200 / 32)
    assert result.steps == 2 * math.ceil(200 / 32)
    assert result.accountant_state["history"] == [(1.0, result.sample_rate, result.steps)]


def test_same_seed_gives_the_same_model_and_loss():
    x, y = _data()
    a, b = _mlp(), _mlp()
    ra = train_dp_sgd(a, x, y, accountant_state=None, seed=4, **SETTINGS)
    rb = train_dp_sgd(b, x, y, accountant_state=None, seed=4, **SETTINGS)
    assert ra.mean_loss == rb.mean_loss
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_tiny_sampling_rate_survives_empty_poisson_batches():
    x, y = _data(n=40)
    result = train_dp_sgd(_mlp(), x, y, accountant_state=None, seed=5, **{**SETTINGS, "batch_size": 1})
    assert result.steps == 40 and result.epsilon > 0


def test_frozen_parameters_stay_frozen_and_trainable_ones_move():
    model = _mlp()
    frozen = model[0].weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    train_dp_sgd(model, *_data(), accountant_state=None, seed=6, **SETTINGS)
    assert torch.equal(frozen, before)
    assert model[2].weight.requires_grad


def test_batchnorm_model_is_rejected_with_a_scenario_error():
    model = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    with pytest.raises(ScenarioError, match="model"):
        train_dp_sgd(model, *_data(), accountant_state=None, seed=7, **SETTINGS)
    assert _hook_count(model) == 0


def test_invalid_clip_bound_names_the_field():
    with pytest.raises(ScenarioError, match="privacy.max_grad_norm"):
        train_dp_sgd(_mlp(), *_data(), accountant_state=None, seed=8, **{**SETTINGS, "max_grad_norm": 0.0})


def test_noisy_steps_that_leave_every_parameter_unchanged_are_reported():
    # An update far below float32 resolution stands in for an optimizer detached from the model (opacus#820).
    with pytest.raises(RuntimeError, match="no trainable parameter changed"):
        train_dp_sgd(_mlp(), *_data(), accountant_state=None, seed=9, **{**SETTINGS, "lr": 1e-30})


def test_tensor_inputs_train_like_numpy_inputs():
    x, y = _data()
    a, b = _mlp(), _mlp()
    train_dp_sgd(a, x, y, accountant_state=None, seed=10, **SETTINGS)
    train_dp_sgd(b, torch.as_tensor(x.copy()), torch.as_tensor(y), accountant_state=None, seed=10, **SETTINGS)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_lora_adapters_move_and_the_frozen_base_stays_put():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_mlp(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], lora_dropout=0.0))
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    train_dp_sgd(model, *_data(), accountant_state=None, seed=11, **SETTINGS)
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n], before) for n, before in trainable.items())
    assert all(torch.equal(after[n], before) for n, before in frozen.items())
    assert _hook_count(model) == 0


class _Recorder(torch.nn.Module):
    """``inner``, noting every batch it is fed (the Poisson batches DP-SGD drew)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.batches = inner, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.detach().clone())
        return self.inner(x)


@pytest.mark.parametrize(("n", "batch_size", "epochs"), [(24, 32, 3), (40, 8, 1)])  # q = 1 (full batches), q = 1/5
def test_without_noise_and_with_a_huge_clip_dp_sgd_is_plain_sgd_on_the_same_batches(n, batch_size, epochs):
    x, y = _data(n=n)
    model = _Recorder(_mlp())
    labels: list[torch.Tensor] = []

    def loss_fn(output, target):
        labels.append(target.clone())
        return torch.nn.functional.cross_entropy(output, target)

    plain = _mlp()
    settings = {**SETTINGS, "batch_size": batch_size, "epochs": epochs, "noise_multiplier": 0.0, "max_grad_norm": 1e12}
    result = train_dp_sgd(model, x, y, accountant_state=None, seed=12, loss_fn=loss_fn, **settings)
    assert result.steps == epochs * math.ceil(n / batch_size) == len(model.batches)
    # Opacus averages the summed per-sample gradients over the expected batch size n·q, not the drawn one.
    expected_batch = int(n * result.sample_rate)
    assert expected_batch == min(n, batch_size)
    if batch_size >= n:
        assert all(len(xb) == n for xb in model.batches)  # q = 1: every step sees every sample
    else:
        assert len({len(xb) for xb in model.batches}) > 1  # Poisson batches of varying size
    sgd = torch.optim.SGD(plain.parameters(), lr=SETTINGS["lr"])
    for xb, yb in zip(model.batches, labels):
        sgd.zero_grad()
        (torch.nn.functional.cross_entropy(plain(xb), yb, reduction="sum") / expected_batch).backward()
        sgd.step()
    for p, q in zip(model.inner.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.equal(model.inner[0].weight, _mlp()[0].weight)


def test_the_noise_has_std_lr_times_z_times_c_over_the_expected_batch_size_per_step():
    # A loss with zero gradient: every parameter change is the Gaussian noise of DP-SGD alone.
    torch.manual_seed(0)
    model = torch.nn.Linear(12, 4000)  # 52,000 parameters
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    z, clip, lr, n, batch_size = 2.0, 0.5, 0.1, 40, 8  # q = 1/5: 5 steps, expected batch n·q = 8
    result = train_dp_sgd(model, *_data(n=n), accountant_state=None, seed=13, loss_fn=lambda out, y: 0.0 * out.sum(),
                          **{**SETTINGS, "lr": lr, "noise_multiplier": z, "max_grad_norm": clip, "batch_size": batch_size})
    assert result.steps == 5
    change = (torch.cat([p.detach().flatten() for p in model.parameters()]) - before).double()
    expected_std = lr * z * clip / batch_size * math.sqrt(result.steps)  # independent steps add in variance
    relative_error = 1 / math.sqrt(2 * change.numel())  # of a sample std: 0.3% here
    assert float(change.std()) == pytest.approx(expected_std, rel=6 * relative_error)
    assert abs(float(change.mean())) < 6 * expected_std / math.sqrt(change.numel())
    kurtosis = float(((change - change.mean()) ** 4).mean() / change.var() ** 2)
    assert kurtosis == pytest.approx(3.0, abs=0.15)  # Gaussian, not e.g. uniform (1.8) or Laplace (6)


def test_each_per_sample_gradient_is_clipped_to_c_before_averaging():
    # Four samples of very different gradient norms; with z = 0 and q = 1 one step moves the model by
    # -lr/n · Σ_i g_i · min(1, C / ‖g_i‖), with each g_i computed here one sample at a time.
    x, y = _data(n=4)
    x = x * np.array([[10.0], [1.0], [1e-2], [30.0]], dtype=np.float32)  # gradient norms ~7.2, 1.8, 0.8, 85
    clip, lr = 1.0, 0.1
    model, reference = _mlp(), _mlp()
    per_sample = []
    for i in range(4):
        reference.zero_grad()
        torch.nn.functional.cross_entropy(reference(torch.as_tensor(x[i : i + 1])), torch.as_tensor(y[i : i + 1])).backward()
        per_sample.append(torch.cat([p.grad.flatten() for p in reference.parameters()]))
    norms = torch.stack([g.norm() for g in per_sample])
    assert (norms > 3 * clip).sum() >= 2 and (norms < clip).sum() >= 1  # some are clipped, one is not
    clipped = [g * min(1.0, clip / (float(g.norm()) + 1e-6)) for g in per_sample]
    assert all(float(g.norm()) <= clip * (1 + 1e-6) for g in clipped)
    expected_step = -lr * torch.stack(clipped).sum(0) / 4
    unclipped_step = -lr * torch.stack(per_sample).sum(0) / 4

    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    train_dp_sgd(model, x, y, accountant_state=None, seed=14,
                 **{**SETTINGS, "lr": lr, "noise_multiplier": 0.0, "max_grad_norm": clip, "batch_size": 4})
    step = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    torch.testing.assert_close(step, expected_step, rtol=1e-4, atol=1e-7)
    assert float(step.norm()) <= lr * clip * (1 + 1e-5)  # n clipped gradients of norm <= C, averaged over n
    assert float((step - unclipped_step).norm()) > 0.5 * float(step.norm())  # the clipping mattered
