"""FedProx's proximal hook, stragglers, and SCAFFOLD's control variates against hand-computed steps."""

import numpy as np
import pytest
import torch

import raysim
from raysim.client.state import make_state_store
from raysim.strategies.fedprox import add_proximal_gradient
from raysim.client.rng import client_rng
from raysim.config import parse_scenario
from raysim.engine.server import local_epochs
from raysim.engine.worker import ClientBatch, ClientWorker, RoundPlan
from raysim.strategies import Aggregate, ControlUpdate, make_strategy


def test_proximal_gradient_is_mu_times_the_whole_vector_difference():
    torch.manual_seed(0)
    w = torch.randn(50, requires_grad=True)
    anchor = torch.randn(50)
    mu = 0.3
    (mu / 2 * (w - anchor).pow(2).sum()).backward()  # (μ/2)·‖w − w_t‖², squared, whole vector
    grad = torch.zeros(50)
    add_proximal_gradient(grad, w.detach(), anchor, mu)
    torch.testing.assert_close(grad, w.grad)
    torch.testing.assert_close(grad, mu * (w.detach() - anchor))


def test_fedprox_with_mu_zero_reproduces_fedavg_bit_for_bit(ray_session, tiny_scenario):
    fedavg = raysim.run(tiny_scenario, overrides=["name=avg"])
    prox0 = raysim.run(tiny_scenario, overrides=["name=prox0", "strategy.name=fedprox", "strategy.mu=0"])
    prox1 = raysim.run(tiny_scenario, overrides=["name=prox1", "strategy.name=fedprox", "strategy.mu=1"])
    assert np.array_equal(fedavg.global_vector, prox0.global_vector)
    assert not np.array_equal(fedavg.global_vector, prox1.global_vector)


def test_stragglers_are_a_seeded_fraction_running_fewer_epochs():
    scenario = parse_scenario({"num_clients": 100, "sampling": {"clients_per_round": 20},
                               "training": {"epochs": 5, "straggler_fraction": 0.5}})
    ids = np.arange(0, 100, 5)
    epochs = local_epochs(scenario, ids, round_index=3)
    assert (epochs < 5).sum() == 10 and epochs.min() >= 1 and set(epochs[epochs == 5]) == {5}
    assert np.array_equal(epochs, local_epochs(scenario, ids, round_index=3))
    assert not np.array_equal(epochs, local_epochs(scenario, ids, round_index=4))


def test_fedavg_can_drop_stragglers_while_fedprox_keeps_their_work(ray_session, tiny_scenario):
    base = ["training.epochs=3", "training.straggler_fraction=0.5", "rounds=2"]
    dropped = raysim.run(tiny_scenario, overrides=[*base, "name=drop", "training.drop_stragglers=true"])
    kept = raysim.run(tiny_scenario, overrides=[*base, "name=keep", "strategy.name=fedprox", "strategy.mu=0.1"])
    assert dropped.history[0]["stragglers"] == 10 and dropped.history[0]["kept"] == 10
    assert kept.history[0]["kept"] == 20
    again = raysim.run(tiny_scenario, overrides=[*base, "name=drop2", "training.drop_stragglers=true"])
    assert np.array_equal(dropped.global_vector, again.global_vector)


def _tiny_linear_setup():
    """Two clients of a 2-feature, 2-class logistic regression, full-batch steps."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 2)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    offsets = np.array([0, 6, 12])
    scenario = parse_scenario({
        "seed": 1, "num_clients": 2, "sampling": {"clients_per_round": 2},
        "model": {"kind": "logreg"}, "training": {"epochs": 3, "batch_size": 6, "lr": 0.5},
        "strategy": {"name": "scaffold", "server_lr": 1.0},
    })
    worker = ClientWorker.local(scenario, x, y, np.arange(12), offsets, (2,), 2)
    return scenario, worker, x, y, offsets


def _reference_client(x, y, w0, c, ci, lr, epochs, seed, round_index, cid):
    """SCAFFOLD's local steps written out with autograd: y ← y − η(g − c_i + c)."""
    w = torch.tensor(w0, requires_grad=True)
    rng = client_rng(seed, round_index, cid)
    steps = 0
    for _ in range(epochs):
        order = rng.permutation(len(x))  # one full batch per epoch; the order does not change the gradient
        xb, yb = torch.from_numpy(x[order]), torch.from_numpy(y[order])
        weight, bias = w[:4].view(2, 2), w[4:]
        loss = torch.nn.functional.cross_entropy(xb @ weight.T + bias, yb)
        (g,) = torch.autograd.grad(loss, w)
        with torch.no_grad():
            w -= lr * (g - torch.from_numpy(ci) + torch.from_numpy(c))
        steps += 1
    y_final = w.detach().numpy()
    new_ci = ci - c + (w0 - y_final) / (steps * lr)  # option II
    return y_final, new_ci


def test_scaffold_two_rounds_match_hand_computed_x_c_and_c_i():
    scenario, worker, x, y, offsets = _tiny_linear_setup()
    strategy = make_strategy(scenario.strategy, num_clients=2, dim=6, store=make_state_store("memory", 6))
    rng = np.random.default_rng(5)
    global_vec = rng.normal(size=6).astype(np.float32)
    ref_x, ref_c, ref_ci = global_vec.astype(np.float64), np.zeros(6), np.zeros((2, 6))
    ids = np.array([0, 1])
    for round_index in range(2):
        batch = ClientBatch(ids, np.array([3, 3]), strategy.client_states(ids))
        chunk = worker.train(global_vec, strategy.server_state(), round_index, RoundPlan(), 0, batch)
        aggregate = Aggregate((chunk.delta_sum / chunk.weight_sum).astype(np.float32), chunk.weight_sum, 2,
                              ControlUpdate(client_ids=ids, deltas=chunk.state_deltas,
                                            delta_sum=chunk.state_deltas.astype(np.float64).sum(axis=0)))
        global_vec = strategy.apply(global_vec, aggregate)

        ys, new_cis = [], []
        for cid in ids:
            lo, hi = offsets[cid], offsets[cid + 1]
            y_i, ci_new = _reference_client(x[lo:hi], y[lo:hi], ref_x.astype(np.float32), ref_c.astype(np.float32),
                                            ref_ci[cid].astype(np.float32), 0.5, 3, scenario.seed, round_index, cid)
            ys.append(y_i)
            new_cis.append(ci_new)
        delta_c = np.array(new_cis) - ref_ci
        ref_x = ref_x + np.mean([yy - ref_x for yy in ys], axis=0)  # equal client sizes: weighted = plain mean
        ref_c = ref_c + delta_c.sum(axis=0) / 2  # c ← c + (1/N) Σ Δc_i, N = 2
        ref_ci = np.array(new_cis)
        np.testing.assert_allclose(global_vec, ref_x, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(strategy.server_state(), ref_c, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(strategy.client_states(ids), ref_ci, rtol=1e-4, atol=1e-5)
    assert np.abs(ref_c).sum() > 0  # the check above exercised a non-zero control variate


def test_scaffold_runs_end_to_end_with_a_disk_store_and_is_worker_count_independent(ray_session, tiny_scenario):
    over = ["strategy.name=scaffold", "strategy.state_store=disk", "rounds=4"]
    one = raysim.run(tiny_scenario, overrides=[*over, "executor.num_workers=1", "name=s1"])
    two = raysim.run(tiny_scenario, overrides=[*over, "executor.num_workers=2", "name=s2"])
    assert np.array_equal(one.global_vector, two.global_vector)
    assert (one.run_dir / "client_state").is_dir()
    assert one.history[-1]["accuracy"] > 0.5


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["strategy.name=fedprox", "strategy.mu=-0.1"], "strategy.mu"),
        (["training.straggler_fraction=1.5"], "training.straggler_fraction"),
        (["strategy.name=scaffold", "training.optimizer=adam"], "strategy.name"),
        (["strategy.name=scaffold", "training.momentum=0.9"], "strategy.name"),
        (["strategy.mu=0.5"], "strategy.mu"),
    ],
)
def test_bad_algorithm_settings_name_their_field(tiny_scenario, overrides, field):
    from raysim.config import apply_overrides
    from raysim.errors import ScenarioError

    with pytest.raises(ScenarioError, match=field.replace(".", r"\.")):
        parse_scenario(apply_overrides(tiny_scenario, overrides))
