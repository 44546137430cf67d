"""Vectorized client training (``training.vectorize``): the same mathematics as the sequential loop.

The stacked trainer is checked against ``train_client`` (and DP-SGD against Opacus's ``train_dp_sgd``)
client by client, for each model kind, optimizer and hook, on clients with 1 sample, many steps and no
step; a client's result must not depend on the clients that share its stack; and through the engine,
vectorized runs must match sequential ones within tolerance and give the same model bit for bit on one
and on two workers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import raysim
from raysim.client.build import build_pipeline
from raysim.client.rng import client_rng
from raysim.client.train import make_optimizer, train_client
from raysim.client.training import ClientRuntime, LocalTraining, VectorizedTraining
from raysim.client.vectorized import StackedClient, StackedModel, StackedTrainer
from raysim.config import ModelConfig, TrainingConfig, parse_scenario
from raysim.config.compat import vectorize_choice
from raysim.errors import ScenarioError
from raysim.models.flat import FlatParams
from raysim.models.task import CLASSIFICATION
from raysim.models.zoo import build_model
from raysim.strategies.fedprox import ProximalClient
from raysim.strategies.scaffold import ScaffoldClient

SEED, ROUND, CLASSES = 7, 2, 4
SIZES = [1, 5, 16, 17, 40, 3, 64]  # one sample, a partial last batch, exact batches, many steps
EPOCHS = [1, 2, 1, 3, 2, 0, 1]  # a straggler's shortened epochs, and a client that takes no step


def _model(kind: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    shape = (1, 6, 6) if kind == "cnn" else (12,)
    config = ModelConfig(kind=kind, hidden=[16], channels=[4]) if kind != "logreg" else ModelConfig(kind=kind)
    return build_model(config, shape, CLASSES), shape


def _data(shape: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, *shape, generator=g), torch.randint(0, CLASSES, (n,), generator=g)) for n in SIZES]


def _sequential(model, config, data, epochs, hook_of=None):
    """Each client from the same start with ``train_client``, as ``LocalTraining`` runs it."""
    flat = FlatParams(model)
    start = flat.vector.clone()
    optimizer = make_optimizer(config, flat.params)
    rows, steps = [], []
    for cid, ((x, y), e) in enumerate(zip(data, epochs)):
        flat.load(start)
        hook = None if hook_of is None else hook_of(cid, start)
        result = train_client(model, flat, optimizer, x, y, epochs=e, batch_size=config.batch_size,
                              rng=client_rng(SEED, ROUND, cid), hook=hook, task=CLASSIFICATION)
        rows.append(flat.vector.clone())
        steps.append(result.steps)
    return start, torch.stack(rows), steps


def _stacked(model, shape, config, data, epochs, start, hook_for=lambda order, a: None, ids=None):
    ids = list(range(len(data))) if ids is None else ids
    trainer = StackedTrainer(model, shape, config, torch.device("cpu"), memory_bytes=2**30)
    clients = [StackedClient(x=data[c][0], y=data[c][1], epochs=epochs[c], rng=client_rng(SEED, ROUND, c), start=start)
               for c in ids]
    return trainer.train(clients, hook_for)


OPTIMIZERS = {
    "sgd": TrainingConfig(batch_size=8, lr=0.1),
    "momentum+wd": TrainingConfig(batch_size=8, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": TrainingConfig(batch_size=8, lr=0.01, optimizer="adam", weight_decay=1e-4),
}


@pytest.mark.parametrize("kind", ["logreg", "mlp", "cnn"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_stacked_training_equals_the_sequential_loop(kind, optimizer):
    model, shape = _model(kind)
    config, data = OPTIMIZERS[optimizer], _data(shape)
    start, expected, steps = _sequential(model, config, data, EPOCHS)
    result = _stacked(model, shape, config, data, EPOCHS, start)
    assert result.steps.tolist() == steps  # every client takes exactly its sequential steps, 0 for no epoch
    assert torch.equal(result.local[5], start)  # the client without a step is left at the start
    moved = (expected - start).norm(dim=1)
    assert (moved[np.array(steps) > 0] > 1e-3).all()  # a real comparison: every training client moved
    assert torch.allclose(result.local, expected, rtol=1e-5, atol=1e-6), (result.local - expected).abs().max()


@pytest.mark.parametrize("half", ["fedprox", "scaffold"])
def test_stacked_hooks_equal_the_sequential_hooks(half):
    model, shape = _model("mlp")
    config, data = OPTIMIZERS["sgd"], _data(shape)
    dim = FlatParams(model).size
    g = torch.Generator().manual_seed(5)
    control = torch.randn(dim, generator=g) * 0.1
    owns = torch.randn(len(data), dim, generator=g) * 0.1
    strategy = ProximalClient(mu=0.5) if half == "fedprox" else ScaffoldClient(lr=config.lr)

    def hook_of(cid, start):
        return strategy.gradient_hook(start, control, owns[cid])

    start, expected, _ = _sequential(model, config, data, EPOCHS, hook_of)
    _, plain, _ = _sequential(model, config, data, EPOCHS)
    assert (expected - plain).abs().max() > 1e-3  # the hook changes the result, so the check below means something

    def hook_for(order, a):
        top = order[:a].tolist()
        return strategy.gradient_hook(start.expand(a, dim), control.expand(a, dim), owns[top])

    result = _stacked(model, shape, config, data, EPOCHS, start, hook_for)
    assert torch.allclose(result.local, expected, rtol=1e-5, atol=1e-6), (result.local - expected).abs().max()


@pytest.mark.parametrize("kind", ["logreg", "mlp", "mlp2"])
def test_the_hand_written_backward_is_autograds_bit_for_bit(kind, monkeypatch):
    """Linear/ReLU stacks backpropagate by hand (``StackedModel.by_hand``); plain training under every optimizer
    and hook, and DP-SGD's per-sample gradients, must give autograd's bits."""
    from raysim.privacy.dp.vectorized_dpsgd import PrivateClient

    if kind == "mlp2":  # two hidden layers: the backward crosses a ReLU between two linear layers
        torch.manual_seed(0)
        model, shape = build_model(ModelConfig(kind="mlp", hidden=[16, 8]), (12,), CLASSES), (12,)
    else:
        model, shape = _model(kind)
    data, start = _data(shape), FlatParams(model).vector.clone()
    dim = start.numel()
    owns = torch.randn(len(data), dim, generator=torch.Generator().manual_seed(5)) * 0.1
    proximal = ProximalClient(mu=0.5)

    def hook_for(order, a):
        return proximal.gradient_hook(start.expand(a, dim), None, owns[order[:a].tolist()])

    clients = [PrivateClient(x=x, y=y, epochs=max(e, 1), seed=c, start=start, accountant_state=None)
               for c, ((x, y), e) in enumerate(zip(data, EPOCHS))]
    runs = {}
    for by_hand in (True, False):
        monkeypatch.setattr(StackedModel, "__init__", _keeping(StackedModel.__init__, by_hand))
        plain = [_stacked(model, shape, config, data, EPOCHS, start, hook) for config in OPTIMIZERS.values()
                 for hook in (lambda order, a: None, hook_for)]
        private = _private(model, shape, 0.8, 0.5, 0.2).train(clients)
        runs[by_hand] = [(r.local, r.mean_loss) for r in plain] + [(private.local, private.mean_loss)]
        monkeypatch.undo()
    assert all((hand - start).abs().max() > 1e-3 for hand, _ in runs[True])  # every run trained
    for (hand, hand_loss), (auto, auto_loss) in zip(runs[True], runs[False]):
        assert torch.equal(hand, auto), (hand - auto).abs().max()
        assert np.array_equal(hand_loss, auto_loss, equal_nan=True)


def _keeping(init, by_hand: bool):
    """``StackedModel.__init__`` with ``by_hand`` forced (False: autograd, as for a convolutional model)."""
    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.by_hand = by_hand
    return patched


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_a_clients_result_does_not_depend_on_the_clients_beside_it(kind):
    model, shape = _model(kind)
    config, data = OPTIMIZERS["momentum+wd"], _data(shape)
    start = FlatParams(model).vector.clone()
    whole = _stacked(model, shape, config, data, EPOCHS, start)
    for ids in ([3], [6, 0], [1, 2, 4]):
        part = _stacked(model, shape, config, data, EPOCHS, start, ids=ids)
        assert torch.equal(part.local, whole.local[ids])  # bit for bit, whatever the stack


def test_the_memory_budget_bounds_the_stack():
    model, shape = _model("mlp")
    dim, config = FlatParams(model).size, OPTIMIZERS["adam"]
    small = StackedTrainer(model, shape, config, torch.device("cpu"), memory_bytes=40 * 4 * dim * 6)
    large = StackedTrainer(model, shape, config, torch.device("cpu"), memory_bytes=400 * 4 * dim * 6)
    assert 1 <= small.max_clients < 40 and large.max_clients > 9 * small.max_clients


# DP-SGD ------------------------------------------------------------------------------------------------


def _private(model, shape, z, clip, lr):
    from raysim.privacy.dp.vectorized_dpsgd import PrivateStackedTrainer

    stacked = StackedTrainer(model, shape, TrainingConfig(batch_size=8), torch.device("cpu"), 2**30).stacked
    return PrivateStackedTrainer(stacked, 8, lr, z, clip, "rdp", 1e-5, torch.device("cpu"))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_vectorized_dpsgd_takes_opacus_batches_clipping_and_accounting_client_by_client(kind):
    """With the noise off, the model equals Opacus's client by client (the same Poisson batches, clipping and
    scaling); with it on, the accountants and ε are Opacus's, and the noise is another draw of the same law."""
    from raysim.privacy.dp.local_dpsgd import train_dp_sgd
    from raysim.privacy.dp.vectorized_dpsgd import PrivateClient

    model, shape = _model(kind)
    flat = FlatParams(model)
    start, data, epochs = flat.vector.clone(), _data(shape), [1, 2, 1, 1, 2, 1, 1]
    seeds = [int(client_rng(SEED, ROUND, c).integers(2**63)) for c in range(len(data))]
    clip, lr = 0.5, 0.2
    for z in (0.0, 0.8):
        expected, states = [], []
        for (x, y), e, seed in zip(data, epochs, seeds):
            flat.load(start)
            result = train_dp_sgd(model, x, y, epochs=e, batch_size=8, lr=lr, noise_multiplier=z, max_grad_norm=clip,
                                  accountant_state=None, delta=1e-5, seed=seed)
            flat.rebind_grads()
            expected.append(flat.vector.clone())
            states.append((result.steps, result.accountant_state, result.epsilon))
        clients = [PrivateClient(x=x, y=y, epochs=e, seed=s, start=start, accountant_state=None)
                   for (x, y), e, s in zip(data, epochs, seeds)]
        got = _private(model, shape, z, clip, lr).train(clients)
        assert got.steps.tolist() == [s for s, _, _ in states]
        assert got.accountant_states == [a for _, a, _ in states]
        assert np.allclose(got.epsilons, [eps for _, _, eps in states], rtol=1e-12)
        expected = torch.stack(expected)
        assert (expected - start).norm(dim=1).min() > 1e-2
        if z == 0:
            assert torch.allclose(got.local, expected, rtol=1e-5, atol=1e-6), (got.local - expected).abs().max()
        else:  # the same clipped steps plus noise of another draw: far apart at this tiny scale, equally far
            assert not torch.allclose(got.local, expected, atol=1e-3)
        for ids in ([6], [2, 4], [0, 1, 3, 5]):  # a client's result does not depend on the clients beside it
            part = _private(model, shape, z, clip, lr).train([clients[i] for i in ids])
            assert torch.equal(part.local, got.local[ids])


def test_clipped_per_sample_norms_are_at_most_c_and_the_noise_std_is_sigma_c():
    from raysim.privacy.dp.vectorized_dpsgd import LayerSamples, PrivateStackedTrainer, clip_factors

    g = torch.Generator().manual_seed(3)
    scale = torch.tensor([0.01, 1.0, 10.0])[:, None, None]
    out_grad, inputs = torch.randn(3, 6, 5, generator=g) * scale, torch.randn(3, 6, 10, generator=g)
    formed = out_grad[..., :, None] * inputs[..., None, :]  # the per-sample weight gradients, written out
    norms = (formed.square().sum(dim=(2, 3)) + out_grad.square().sum(dim=2)).sqrt()
    layer = LayerSamples(out_grad, inputs, None)
    assert torch.allclose(layer.norms2().sqrt(), norms, rtol=1e-5)  # the factored norm is the norm
    counts, clip = torch.tensor([6, 4, 0]), 0.7
    factor = clip_factors([layer], counts, clip)
    clipped = factor * norms
    assert (clipped <= clip + 1e-6).all()
    assert torch.allclose(clipped[0], norms[0])  # small gradients pass unclipped
    assert torch.allclose(clipped[1, :4], torch.full((4,), clip), rtol=1e-5)  # large ones land on C
    assert (factor[1, 4:] == 0).all() and (factor[2] == 0).all()  # padding contributes nothing
    weight, bias = layer.clipped_sum(factor)
    assert torch.allclose(weight[1], (factor[1, :, None, None] * formed[1]).sum(0).reshape(-1), atol=1e-5)
    assert torch.allclose(bias[1], (factor[1, :, None] * out_grad[1]).sum(0), atol=1e-5)
    assert torch.equal(weight[2], torch.zeros(50))

    model = build_model(ModelConfig(kind="mlp", hidden=[128]), (64,), 10)  # 9,610 parameters
    stacked = StackedTrainer(model, (64,), TrainingConfig(), torch.device("cpu"), 2**30).stacked
    sigma = 1.5
    trainer = PrivateStackedTrainer(stacked, 8, 0.1, sigma, clip, "rdp", 1e-5, torch.device("cpu"))
    scales = [1.0] * 10 + [0.25] * 10  # a step's lr / expected batch size, per client
    noise = trainer._noise(torch.empty(20, 9610), [torch.Generator().manual_seed(s) for s in range(20)], scales)
    for drawn, scale in ((noise[:10], 1.0), (noise[10:], 0.25)):  # 10 clients x 9,610 draws each
        assert abs(float(drawn.std()) / (sigma * clip * scale) - 1) < 0.01  # its standard error is 0.23%
        assert abs(float(drawn.mean()) / scale) < 0.02  # standard error 0.0034
    alone = torch.empty(9610).normal_(0.0, sigma * clip * 0.25, generator=torch.Generator().manual_seed(13))
    assert torch.equal(noise[13], alone)  # each client's step: one draw from its own generator


# The switch --------------------------------------------------------------------------------------------


def _scenario(**training):
    return parse_scenario({"data": {"source": "synthetic", "num_features": 8, "num_classes": 3},
                           "model": {"kind": "mlp", "hidden": [8]}, "training": training})


def test_auto_vectorizes_the_zoo_and_falls_back_for_a_transformers_model():
    on, why = vectorize_choice(_scenario(vectorize="auto"))
    assert on and "auto" in why
    assert vectorize_choice(_scenario()) == (False, "training.vectorize is false")
    text = parse_scenario({"data": {"source": "shakespeare_lm"}, "model": {"kind": "hf_causal_lm"},
                           "training": {"vectorize": "auto"}})
    on, why = vectorize_choice(text)
    assert not on and "transformers" in why
    runtime = ClientRuntime.of(_scenario(), _model("mlp")[0], CLASSIFICATION, torch.device("cpu"))
    assert isinstance(build_pipeline(_scenario(vectorize="auto"), 4, runtime=runtime, feature_shape=(12,)).stages[0],
                      VectorizedTraining)
    assert type(build_pipeline(_scenario(), 4, runtime=runtime, feature_shape=(12,)).stages[0]) is LocalTraining


def test_true_refuses_what_it_cannot_vectorize_with_one_line():
    with pytest.raises(ScenarioError) as err:
        parse_scenario({"data": {"source": "shakespeare_lm"}, "model": {"kind": "hf_causal_lm"},
                        "training": {"vectorize": True}})
    message = str(err.value)
    assert "\n" not in message and message.startswith("training.vectorize: true cannot vectorize a transformers model")


# Through the engine ------------------------------------------------------------------------------------


def test_vectorized_runs_match_sequential_and_are_bit_identical_on_one_and_two_workers(ray_session, tiny_scenario):
    base = {**tiny_scenario, "training": {**tiny_scenario["training"], "epochs": 2, "momentum": 0.5}}
    sequential = raysim.run(base)
    two = raysim.run(base, overrides=["training.vectorize=true", "name=vec2"])
    one = raysim.run(base, overrides=["training.vectorize=true", "executor.num_workers=1", "name=vec1"])
    assert (two.run_dir / "final_model.npy").read_bytes() == (one.run_dir / "final_model.npy").read_bytes()
    a, b = sequential.global_vector, two.global_vector
    assert not np.array_equal(a, b)  # a different computation ...
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-5  # ... of the same mathematics
    assert two.summary["vectorize"]["on"] is True
    assert [r["kept"] for r in two.history] == [r["kept"] for r in sequential.history]
    assert np.allclose([r["loss"] for r in two.history], [r["loss"] for r in sequential.history], rtol=1e-5)


def test_vectorized_local_dpsgd_and_scaffold_through_the_engine_match_sequential(ray_session, tiny_scenario):
    dp = {**tiny_scenario, "rounds": 2, "privacy": {"mechanism": "local", "noise_multiplier": 1.0, "clip_norm": 1.0}}
    noiseless = {**dp, "privacy": {**dp["privacy"], "noise_multiplier": 0.0}}
    scaffold = {**tiny_scenario, "rounds": 2, "strategy": {"name": "scaffold"}}
    for scenario in (noiseless, scaffold, dp):
        sequential = raysim.run(scenario)
        vectorized = raysim.run(scenario, overrides=["training.vectorize=true", "name=vec"])
        a, b = sequential.global_vector, vectorized.global_vector
        assert sequential.summary.get("privacy") == vectorized.summary.get("privacy")  # the same accounting
        if scenario is not dp:
            assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-5
    assert not np.allclose(a, b, atol=1e-4)  # with noise on, another draw of it
    two = vectorized.global_vector
    one = raysim.run(dp, overrides=["training.vectorize=true", "executor.num_workers=1", "name=vec1"]).global_vector
    assert np.array_equal(one, two)  # private stacks, packed differently on one worker: bit for bit


def test_vectorized_fedbuff_matches_sequential_fedbuff(ray_session, tiny_scenario):
    fedbuff = ['system.speed={"kind": "lognormal", "mean": 100, "sigma": 0.5}', 'asynchronous.mode="fedbuff"']
    sequential = raysim.run(tiny_scenario, overrides=fedbuff)
    vectorized = raysim.run(tiny_scenario, overrides=[*fedbuff, "training.vectorize=true", "name=vec"])
    one = raysim.run(tiny_scenario, overrides=[*fedbuff, "training.vectorize=true", "executor.num_workers=1", "name=vec1"])
    a, b = sequential.global_vector, vectorized.global_vector
    assert len(vectorized.history) == len(sequential.history) > 0
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-5
    assert np.array_equal(one.global_vector, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stacked_training_on_cuda_matches_the_cpu():
    model, shape = _model("cnn")
    config, data = OPTIMIZERS["adam"], _data(shape)
    start = FlatParams(model).vector.clone()
    cpu = _stacked(model, shape, config, data, EPOCHS, start)
    cuda = torch.device("cuda")
    model = model.to(cuda)
    trainer = StackedTrainer(model, shape, config, cuda, memory_bytes=2**30)
    clients = [StackedClient(x=x.to(cuda), y=y.to(cuda), epochs=e, rng=client_rng(SEED, ROUND, c), start=start.to(cuda))
               for c, ((x, y), e) in enumerate(zip(data, EPOCHS))]
    result = trainer.train(clients, lambda order, a: None)
    assert result.local.device.type == "cuda"
    assert torch.allclose(result.local.cpu(), cpu.local, rtol=1e-4, atol=1e-5)


def test_a_private_clients_bits_do_not_depend_on_how_wide_its_stack_mates_batches_are():
    """A client of small Poisson batches trained alone, and beside clients whose batches are wider than the private
    width on some steps (so they go on in a second row): the same bits, for both kinds of client. Padding each step
    to the stack's widest batch made a one-row ``bmm`` over a longer row associate otherwise (this CPU, widths
    from 13 on), so a client's model changed with its stack mates, and so with the worker count."""
    from raysim.privacy.dp.vectorized_dpsgd import PrivateClient, PrivateStackedTrainer, opacus_rate

    torch.manual_seed(0)
    classes = 5
    model = build_model(ModelConfig(kind="mlp", hidden=[32]), (16,), classes)
    start = FlatParams(model).vector.clone()
    g = torch.Generator().manual_seed(5)
    sizes = [24, 2000, 1500]  # batches of 24, and of about 32 (up to 45: the width is 38)
    clients = [PrivateClient(x=torch.randn(n, 16, generator=g), y=torch.randint(0, classes, (n,), generator=g),
                             epochs=1, seed=11 + k, start=start, accountant_state=None) for k, n in enumerate(sizes)]
    stacked = StackedTrainer(model, (16,), TrainingConfig(batch_size=32), torch.device("cpu"), 2**30).stacked

    def trained(members: list[int]) -> torch.Tensor:
        return PrivateStackedTrainer(stacked, 32, 0.1, 1.0, 1.0, "rdp", 1e-5, torch.device("cpu")).train(
            [clients[k] for k in members]).local

    trainer = PrivateStackedTrainer(stacked, 32, 0.1, 1.0, 1.0, "rdp", 1e-5, torch.device("cpu"))
    _, counts = trainer.batches(clients, [opacus_rate(n, 32) for n in sizes], np.arange(len(sizes)))
    assert counts[0].max() <= trainer.width < min(counts[1].max(), counts[2].max())
    together = trained([0, 1, 2])
    assert torch.equal(trained([0]), together[[0]])
    assert torch.equal(trained([2, 0]), together[[2, 0]])
    assert torch.equal(trained([1]), together[[1]])
