"""Differential privacy in the engine: central DP-FedAvg, local DP-SGD and distributed DP, with their accounting."""

import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

import raysim
from raysim.config import PrivacyConfig, apply_overrides, parse_scenario
from raysim.engine import checkpoint
from raysim.models.initial import initial_global
from raysim.engine.worker import ClientBatch, ClientWorker, RoundPlan
from raysim.errors import ScenarioError
from raysim.privacy.dp.local_target import local_noise_for_target
from raysim.privacy.dp.server import CentralDP
from raysim.privacy.secagg.sealed_state import sealed_width

CENTRAL = ["privacy.mechanism=central", "privacy.noise_multiplier=0.5"]
DISTRIBUTED = ["privacy.mechanism=distributed", "privacy.noise_multiplier=0.5", "secure_aggregation.threshold=0.5"]


def rdp_epsilons(z: float, q: float, rounds: int, delta: float = 1e-5) -> list[float]:
    """ε after each of ``rounds`` steps of (z, q), straight from Opacus's RDP accountant."""
    accountant, out = RDPAccountant(), []
    for _ in range(rounds):
        accountant.step(noise_multiplier=z, sample_rate=q)
        out.append(accountant.get_epsilon(delta))
    return out


@pytest.mark.parametrize(("kind", "steps", "expected"), [("rdp", 2250, 7.32911117143), ("prv", 2249, 6.777395712150674)])
def test_opacus_accountant_vectors_through_the_servers_privacy_report(kind, steps, expected):
    dp = CentralDP(PrivacyConfig(mechanism="central", noise_multiplier=1.5, accountant=kind, delta=1e-5),
                   sample_rate=0.04, rounds=steps, total_weight=100.0, expected_cohort=4.0)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        dp.aggregate(np.zeros(2), unclipped=4, rng=rng, server_noise=True)
    report = dp.report("central", steps, "poisson", "Poisson sampling")
    assert report["epsilon"] == pytest.approx(expected, rel=1e-6)
    assert report["noise_multiplier"] == 1.5 and report["sample_rate"] == 0.04 and report["accountant"] == kind


def test_server_noise_has_the_dp_fedavg_standard_deviation():
    dp = CentralDP(PrivacyConfig(mechanism="central", noise_multiplier=2.0, clip_norm=0.5),
                   sample_rate=0.1, rounds=1, total_weight=1000.0, expected_cohort=100.0)
    noisy = dp.aggregate(np.zeros(200_000), unclipped=100, rng=np.random.default_rng(1), server_noise=True)
    sigma = 2.0 * 0.5 / (0.1 * 1000.0)  # σ = z·S/(qW)
    assert abs(noisy.std() / sigma - 1) < 0.01 and abs(noisy.mean()) < 3 * sigma / np.sqrt(noisy.size)


def test_every_clients_delta_respects_the_clip_bound():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    y = rng.integers(0, 3, 60)
    scenario = parse_scenario({"num_clients": 6, "sampling": {"clients_per_round": 6}, "model": {"kind": "mlp", "hidden": [8]},
                               "training": {"lr": 0.5, "epochs": 3, "batch_size": 4}, "privacy": {"mechanism": "central"}})
    worker = ClientWorker.local(scenario, x, y, np.arange(60), np.arange(0, 61, 10), (4,), 3)
    torch.manual_seed(0)
    global_vec = worker.runtime.flat.numpy()
    for cid in range(6):
        chunk = worker.train(global_vec, None, 0, RoundPlan(clip_norm=0.05), 0,
                             ClientBatch(np.array([cid]), np.array([3])))
        assert np.linalg.norm(chunk.delta_sum / chunk.weight_sum) <= 0.05 * (1 + 1e-6)
        assert chunk.unclipped == 0  # three epochs at lr 0.5 move much further than 0.05


@pytest.mark.parametrize(("mu", "bounded"), [(10.0, True), (0.0, False)])
def test_local_dp_sgd_takes_fedprox_s_proximal_term_in_every_private_step(mu, bounded):
    # With lr·μ = 1 each step w ← w − lr·(g̃ + μ(w − w_t)) lands at w_t − lr·g̃: whatever the number of steps,
    # the delta is one noise-free step of per-sample gradients clipped to 1, so its norm is at most lr. The
    # batch holds the client's 10 samples (q = 1), so that mean is over exactly the samples drawn.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 4)).astype(np.float32), rng.integers(0, 3, 60)
    scenario = parse_scenario({"num_clients": 6, "sampling": {"clients_per_round": 6}, "model": {"kind": "mlp", "hidden": [8]},
                               "strategy": {"name": "fedprox", "mu": mu}, "training": {"lr": 0.1, "epochs": 3, "batch_size": 10},
                               "privacy": {"mechanism": "local", "noise_multiplier": 0.0, "clip_norm": 1.0}})
    worker = ClientWorker.local(scenario, x, y, np.arange(60), np.arange(0, 61, 10), (4,), 3)
    global_vec = worker.runtime.flat.numpy()
    chunk = worker.train(global_vec, None, 0, RoundPlan(per_client=True), 0,
                         ClientBatch(np.arange(6), np.full(6, 3), dp_states=[None] * 6))
    norms = np.linalg.norm(chunk.rows, axis=1)
    assert (norms <= 0.1 * (1 + 1e-5)).all() == bounded and norms.min() > 0.01


def test_with_compression_what_a_client_sends_is_clipped_after_it_is_compressed():
    """Compress, then clip: a 2-bit stochastic quantizer can round a vector's norm up past S, so only this
    order keeps every sent update within S; the rows are still quantized (few distinct values)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    y = rng.integers(0, 3, 60)
    scenario = parse_scenario({"num_clients": 6, "sampling": {"clients_per_round": 6}, "model": {"kind": "mlp", "hidden": [8]},
                               "training": {"lr": 0.5, "epochs": 3, "batch_size": 4}, "privacy": {"mechanism": "central"},
                               "compression": {"kind": "quantize", "bits": 2, "stochastic": True,
                                               "error_feedback": False}})
    worker = ClientWorker.local(scenario, x, y, np.arange(60), np.arange(0, 61, 10), (4,), 3)
    names = [type(stage).__name__ for stage in worker.pipeline.stages]
    assert names.index("Compression") < names.index("DPClip")
    global_vec = worker.runtime.flat.numpy()
    chunk = worker.train(global_vec, None, 0, RoundPlan(clip_norm=0.05, per_client=True), 0,
                         ClientBatch(np.arange(6), np.full(6, 3)))
    norms = np.linalg.norm(chunk.rows, axis=1)
    assert (norms <= 0.05 * (1 + 1e-6)).all() and (norms > 0.049).all()  # clipped to S, after quantization
    assert all(len(np.unique(row)) <= 4 for row in chunk.rows)  # 2 bits: at most four levels, scaled together
    assert (chunk.bytes_up < 4 * chunk.rows.shape[1] / 8).all()  # the quantized message, not a dense vector


def test_central_dp_with_compression_through_the_engine(ray_session, tiny_scenario):
    overrides = ["privacy.mechanism=central", "privacy.noise_multiplier=1.0", "privacy.clip_norm=0.5",
                 'compression.kind="topk"', "compression.fraction=0.1", "compression.error_feedback=false"]
    run = raysim.run(tiny_scenario, overrides=[*overrides, "name=dpc"])
    one = raysim.run(tiny_scenario, overrides=[*overrides, "executor.num_workers=1", "name=dpc1"])
    plain = raysim.run(tiny_scenario, overrides=[*overrides[:3], "name=dp"])
    assert np.array_equal(run.global_vector, one.global_vector)
    assert run.summary["privacy"]["epsilon"] == plain.summary["privacy"]["epsilon"]  # compression costs no ε
    assert all(m["compression_ratio"] > 5 for m in run.history)


def test_central_dp_with_no_noise_and_no_clip_is_fedavg_bit_for_bit(ray_session, tiny_scenario):
    uniform = ["strategy.client_weighting=uniform"]
    fedavg = raysim.run(tiny_scenario, overrides=[*uniform, "name=avg"])
    dp = raysim.run(tiny_scenario, overrides=[*uniform, "name=dp0", "privacy.mechanism=central",
                                               "privacy.noise_multiplier=0", "privacy.clip_norm=.inf"])
    assert np.array_equal(fedavg.global_vector, dp.global_vector)


def test_dp_scaffold_with_no_noise_and_no_clip_is_scaffold_bit_for_bit(ray_session, tiny_scenario):
    # Under DP each c_i goes back sealed and only the chunks' sums of Δc_i reach the server.
    scaffold = ["strategy.name=scaffold", "strategy.client_weighting=uniform"]
    plain = raysim.run(tiny_scenario, overrides=[*scaffold, "name=sc"])
    dp = raysim.run(tiny_scenario, overrides=[*scaffold, "name=sc0", "privacy.mechanism=central", "checkpoint.every=2",
                                               "privacy.noise_multiplier=0", "privacy.clip_norm=.inf"])
    assert np.array_equal(plain.global_vector, dp.global_vector)
    store = checkpoint.latest(dp.run_dir).load_state()["strategy"].store
    assert store.num_stored >= 20 and store.dim == sealed_width(dp.global_vector.size)  # each c_i held sealed
    # A control clip near zero leaves c and every c_i near zero: SCAFFOLD's correction vanishes and it is FedAvg.
    fedavg = raysim.run(tiny_scenario, overrides=["strategy.client_weighting=uniform", "name=avg"])
    clipped = raysim.run(tiny_scenario, overrides=[*scaffold, "name=sc_c", "privacy.mechanism=central",
                                                    "privacy.noise_multiplier=0", "privacy.clip_norm=.inf",
                                                    "privacy.control_clip_norm=1e-9"])
    assert np.abs(clipped.global_vector - fedavg.global_vector).max() < 1e-6
    assert np.abs(plain.global_vector - fedavg.global_vector).max() > 1e-3


def test_dp_scaffold_noises_both_sums_at_root_two_z_and_accounts_once_at_z(ray_session, tiny_scenario):
    config = PrivacyConfig(mechanism="central", noise_multiplier=2.0, clip_norm=0.5, control_clip_norm=3.0)
    pair = CentralDP(config, sample_rate=0.1, rounds=1, total_weight=1000.0, expected_cohort=100.0, blocks=2)
    noisy = pair.aggregate(np.zeros(200_000), unclipped=100, rng=np.random.default_rng(1), server_noise=True)
    assert abs(noisy.std() / (np.sqrt(2) * 2.0 * 0.5 / 100.0) - 1) < 0.01  # √2·z·S/(qW) on Σ w·Δy
    control = pair.noise_sum(np.zeros(200_000), 3.0, np.random.default_rng(2))
    assert abs(control.std() / (np.sqrt(2) * 2.0 * 3.0) - 1) < 0.01  # √2·z·S_c on Σ Δc
    dp = [*CENTRAL, "strategy.name=scaffold", "privacy.control_clip_norm=2"]
    run = raysim.run(tiny_scenario, overrides=[*dp, "name=dpsc"])
    one = raysim.run(tiny_scenario, overrides=[*dp, "name=dpsc1", "executor.num_workers=1"])
    assert np.array_equal(run.global_vector, one.global_vector)
    assert [m["epsilon"] for m in run.history] == pytest.approx(rdp_epsilons(0.5, 0.1, 3), rel=1e-9)
    assert run.history[-1]["dp_noise_stddev"] == pytest.approx(np.sqrt(2) * 0.5 * 1.0 / 20)
    assert run.summary["privacy"]["control_clip_norm"] == 2


def test_error_feedback_under_central_dp_keeps_each_residual_sealed_and_exact(ray_session, tiny_scenario):
    topk = ["strategy.client_weighting=uniform", 'compression.kind="topk"', "compression.fraction=0.1",
            "compression.error_feedback=true"]
    plain = raysim.run(tiny_scenario, overrides=[*topk, "name=ef"])
    dp = raysim.run(tiny_scenario, overrides=[*topk, "name=ef_dp", "privacy.mechanism=central",
                                               "privacy.noise_multiplier=0", "privacy.clip_norm=.inf"])
    assert np.array_equal(plain.global_vector, dp.global_vector)  # the sealed residuals round-trip exactly


def test_central_dp_reports_epsilon_every_round_and_a_privacy_block(ray_session, tiny_scenario):
    result = raysim.run(tiny_scenario, overrides=CENTRAL)
    eps = [m["epsilon"] for m in result.history]
    assert all(b > a > 0 for a, b in zip(eps, eps[1:]))
    block = result.summary["privacy"]
    assert block["epsilon"] == eps[-1] and block["noise_multiplier"] == 0.5 and block["clip_norm"] == 1.0
    assert block["sample_rate"] == 0.1 and block["rounds"] == 3 and block["delta"] == 1e-5
    assert "Poisson" in block["sampling_assumption"]


def test_adaptive_clipping_shrinks_a_clip_far_above_every_update(ray_session, tiny_scenario):
    result = raysim.run(tiny_scenario, overrides=[*CENTRAL, "privacy.clip_norm=100", "privacy.adaptive.learning_rate=0.5"])
    assert all(m["dp_unclipped_fraction"] == 1.0 for m in result.history)
    clip, expected = 100.0, []
    for r in range(3):  # C ← C·exp(−η(b̄ − γ)), b̄ = (20 + N(0, σ_b²))/20 with σ_b = 20/20, drawn after the update noise
        rng = np.random.default_rng([3, r, 13])
        rng.standard_normal(result.global_vector.size)
        clip *= math.exp(-0.5 * ((20 + rng.normal(0.0, 1.0)) / 20 - 0.5))
        expected.append(clip)
    assert [m["dp_clip_norm"] for m in result.history] == pytest.approx(expected, rel=1e-12)


def test_target_epsilon_solves_z_and_the_budget_stops_or_warns(ray_session, tiny_scenario):
    poisson = ["sampling.kind=poisson", "sampling.rate=0.1"]
    solved = raysim.run(tiny_scenario, overrides=[*poisson, "privacy.mechanism=central", "privacy.target_epsilon=3", "name=t"])
    z = get_noise_multiplier(target_epsilon=3, target_delta=1e-5, sample_rate=0.1, steps=3, accountant="rdp")
    assert solved.summary["privacy"]["noise_multiplier"] == z
    assert solved.summary["privacy"]["epsilon"] == pytest.approx(rdp_epsilons(z, 0.1, 3)[-1], rel=1e-9)
    capped = [*CENTRAL, "privacy.budget_epsilon=9", "rounds=6"]
    eps = rdp_epsilons(0.5, 0.1, 6)  # 7.355, 9.131, ...: only the first round fits within ε = 9
    stopped = raysim.run(tiny_scenario, overrides=[*capped, "name=stop"])
    assert len(stopped.history) == 1 and stopped.summary["privacy"]["epsilon"] == pytest.approx(eps[0], rel=1e-9)
    warned = raysim.run(tiny_scenario, overrides=[*capped, "name=warn", "privacy.on_budget=warn"])
    assert [m["epsilon"] for m in warned.history] == pytest.approx(eps, rel=1e-9)
    assert "dp_budget_exceeded" in warned.history[1] and "dp_budget_exceeded" not in warned.history[0]


def test_local_dp_sgd_keeps_each_clients_accountant_across_rounds(ray_session, tiny_scenario):
    result = raysim.run(tiny_scenario, overrides=["num_clients=10", "sampling.clients_per_round=5", "rounds=4",
                                                  "privacy.mechanism=local", "privacy.noise_multiplier=1.0"])
    eps_max = [m["epsilon_max"] for m in result.history]
    assert eps_max[-1] > eps_max[0] > 0  # clients sampled again continue their own accounting
    assert result.history[-1]["dp_clients_accounted"] <= 10
    assert result.summary["privacy"]["mechanism"].startswith("local DP-SGD")


def test_local_dp_sgd_solves_one_z_for_every_clients_worst_case():
    sizes = np.array([10, 16, 33, 80, 80])  # ⌈n/16⌉ = 1, 1, 3, 5, 5 batches an epoch
    solved = local_noise_for_target(2.0, sizes, batch_size=16, epochs=2, rounds=3, delta=1e-5)
    each = {k: get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=1 / k, steps=3 * 2 * k,
                                    accountant="rdp") for k in (1, 3, 5)}
    assert solved.noise_multiplier == max(each.values()) and solved.batches_per_epoch == max(each, key=each.get)
    assert solved.steps == 3 * 2 * solved.batches_per_epoch


def test_local_dp_sgd_with_a_target_epsilon_spends_it_on_a_client_of_every_round(ray_session, tiny_scenario):
    result = raysim.run(tiny_scenario, overrides=[
        "num_clients=10", "data.num_samples=600", "partition.kind=iid", "sampling.clients_per_round=10", "rounds=2",
        "privacy.mechanism=local", "privacy.target_epsilon=4", "name=local_target"])
    # 480 training samples (a fifth is the test set): 48 a client, 3 Poisson batches an epoch, every round
    z = get_noise_multiplier(target_epsilon=4, target_delta=1e-5, sample_rate=1 / 3, steps=2 * 3, accountant="rdp")
    block = result.summary["privacy"]
    assert block["noise_multiplier"] == z and block["target_epsilon"] == 4
    assert block["epsilon"] == pytest.approx(rdp_epsilons(z, 1 / 3, 6)[-1], rel=1e-9) and block["epsilon"] <= 4
    assert "1/3" in block["noise_solved"]


def test_local_dp_scaffold_corrects_every_private_step_and_costs_no_epsilon(ray_session, tiny_scenario):
    local = ["num_clients=20", "sampling.clients_per_round=10", "privacy.mechanism=local", "privacy.noise_multiplier=1.0"]
    fedavg = raysim.run(tiny_scenario, overrides=[*local, "name=ldp"])
    scaffold = raysim.run(tiny_scenario, overrides=[*local, "strategy.name=scaffold", "name=ldp_sc"])
    one = raysim.run(tiny_scenario, overrides=[*local, "strategy.name=scaffold", "name=ldp_sc1", "executor.num_workers=1"])
    assert np.array_equal(scaffold.global_vector, one.global_vector)
    assert np.abs(scaffold.global_vector - fedavg.global_vector).max() > 1e-3  # rounds 2 and 3 are corrected
    # Δc_i is post-processing of the private trajectory: every client's accountant is exactly FedAvg's.
    assert [m["epsilon_max"] for m in scaffold.history] == [m["epsilon_max"] for m in fedavg.history]
    assert [m["epsilon_mean"] for m in scaffold.history] == [m["epsilon_mean"] for m in fedavg.history]


def test_distributed_dp_noise_travels_inside_the_secure_sum(ray_session, tiny_scenario):
    result = raysim.run(tiny_scenario, overrides=[*DISTRIBUTED, "secure_aggregation.diagnostics=true"])
    last = result.history[-1]
    assert last["secagg_aborted"] == 0 and last["dp_empty_round"] == 0
    assert [m["epsilon"] for m in result.history] == pytest.approx(rdp_epsilons(0.5, 0.1, 3), rel=1e-9)
    assert last["dp_effective_noise_multiplier"] == pytest.approx(0.5 * np.sqrt(20 / 10))
    c, d = (2**26 - 1) / 2, result.global_vector.size  # S·scale with 26 quantization bits for 20 clients
    assert last["dp_l2_sensitivity"] == pytest.approx(math.sqrt(c * c + d / 4 + c + math.sqrt(d) / 2), rel=1e-12)
    assert last["secagg_quantization_error"] > 1e-3  # the released sum carries the clients' noise
    assert result.final_accuracy >= 0.6046 - 0.01  # what this run reaches (0.6046), less a small margin


def test_the_shared_random_mask_travels_inside_the_noised_secure_sum(ray_session, tiny_scenario):
    mask = [*DISTRIBUTED, 'compression.kind="random_mask"', "compression.fraction=0.25", "rounds=1"]
    run = raysim.run(tiny_scenario, overrides=[*mask, "name=dd_mask"])
    one = raysim.run(tiny_scenario, overrides=[*mask, "name=dd_mask1", "executor.num_workers=1"])
    assert np.array_equal(run.global_vector, one.global_vector)
    assert run.history[0]["epsilon"] == pytest.approx(rdp_epsilons(0.5, 0.1, 1)[0], rel=1e-9)  # as unmasked
    d = run.global_vector.size
    k, c = math.ceil(0.25 * d), (2**26 - 1) / 2  # the noise is sized to the k masked words' sensitivity
    assert run.history[0]["dp_l2_sensitivity"] == pytest.approx(math.sqrt(c * c + k / 4 + c + math.sqrt(k) / 2), rel=1e-12)
    # The round moves only the mask's coordinates: the rest of the model is the initial one.
    assert (run.global_vector != initial_global(parse_scenario(tiny_scenario), (16,), 5)).sum() == k


def test_an_aborted_distributed_round_releases_nothing_and_is_still_accounted(ray_session, tiny_scenario):
    aborted = raysim.run(tiny_scenario, overrides=[*DISTRIBUTED, "rounds=2", "secure_aggregation.threshold=15",
                                                   "secure_aggregation.dropout.masked_input=0.9"])
    assert all(m["secagg_aborted"] == 1 and m["dp_empty_round"] == 1 for m in aborted.history)
    assert np.array_equal(aborted.global_vector, initial_global(parse_scenario(tiny_scenario), (16,), 5))
    assert [m["epsilon"] for m in aborted.history] == pytest.approx(rdp_epsilons(0.5, 0.1, 2), rel=1e-9)
    assert aborted.summary["privacy"]["empty_rounds"] == 2


def test_over_selection_is_accounted_at_the_worst_case_participation_rate(ray_session, tiny_scenario):
    result = raysim.run(tiny_scenario, overrides=[
        *CENTRAL, "sampling.clients_per_round=10", "system.speed.kind=lognormal", "system.speed.mean=100",
        "system.speed.sigma=1", "system.over_selection=1.3"])
    assert all(m["clients"] == 13 and m["kept"] == 10 for m in result.history)
    assert [m["epsilon"] for m in result.history] == pytest.approx(rdp_epsilons(0.5, 13 / 200, 3), rel=1e-9)
    block = result.summary["privacy"]
    assert block["sample_rate"] == 13 / 200 and block["denominator_rate"] == 10 / 200
    assert "⌈K·over_selection⌉/N = 13/200" in block["sampling_assumption"]


@pytest.mark.parametrize(("overrides", "field"), [
    (["privacy.mechanism=central", "privacy.delta=1"], "privacy.delta"),
    (["privacy.mechanism=central", "privacy.target_epsilon=0"], "privacy.target_epsilon"),
    (["privacy.mechanism=central", "privacy.noise_multiplier=-1"], "privacy.noise_multiplier"),
    (["sampling.kind=poisson", "sampling.rate=1.5"], "sampling.rate"),
    (["sampling.kind=poisson", "sampling.rate=0"], "sampling.rate"),
    (["privacy.mechanism=distributed"], "privacy.mechanism"),
    (["privacy.mechanism=central", "privacy.control_clip_norm=1"], "privacy.control_clip_norm"),
])
def test_bad_privacy_settings_name_their_field(tiny_scenario, overrides, field):
    with pytest.raises(ScenarioError, match=field.replace(".", r"\.")):
        parse_scenario(apply_overrides(tiny_scenario, overrides))
