"""Async FL on the virtual clock: FedAsync and FedBuff updates, the planned schedule, the engine end to end."""

import numpy as np
import pytest

import raysim
from raysim.compression import dense_bytes
from raysim.config import apply_overrides, parse_scenario
from raysim.data.load import load_data, partition_data
from raysim.engine.async_schedule import AsyncSchedule
from raysim.engine.async_server import staleness_stats
from raysim.engine.system_model import client_system
from raysim.errors import ScenarioError
from raysim.strategies.fedasync import fedasync_update
from raysim.strategies.fedbuff import fedbuff_pseudo_gradient
from raysim.strategies.staleness import FEDBUFF_DEFAULT, StalenessFunction, fedbuff_buffer_delta


# -- the update rules ------------------------------------------------------------------
def test_fedasync_golden_case_mixes_10_and_2_into_7_6():
    # reference/test_vectors.md: α = 0.9, polynomial a = 1, staleness 2 → α_t = 0.3; 0.7·10 + 0.3·2 = 7.6
    x = np.array([10.0], dtype=np.float32)
    out = fedasync_update(x, np.array([1.5], np.float32), np.array([0.5], np.float32), 2,
                          alpha=0.9, fn=StalenessFunction("polynomial", a=1.0))
    assert out.dtype == np.float32 and np.isclose(out[0], 7.6, rtol=1e-6)
    assert x[0] == 10.0  # the old global vector is not modified


def test_fedbuff_over_folds_is_the_papers_staleness_weighted_sum_over_k():
    rng = np.random.default_rng(0)
    deltas, staleness = rng.normal(size=(6, 5)).astype(np.float32), np.array([0, 0, 1, 3, 3, 7])
    folds = [(d, deltas[staleness == d].astype(np.float64).sum(axis=0), float((staleness == d).sum()))
             for d in np.unique(staleness)]  # uniform weights: one fold per staleness
    mean_delta, weight = fedbuff_pseudo_gradient(folds, FEDBUFF_DEFAULT)
    assert weight == 6
    np.testing.assert_allclose(mean_delta, fedbuff_buffer_delta(deltas, staleness), rtol=1e-5)


def test_a_fedbuff_step_whose_updates_were_all_rejected_carries_no_weight():
    mean_delta, weight = fedbuff_pseudo_gradient([(0, np.zeros(3), 0.0)], FEDBUFF_DEFAULT)
    assert weight == 0 and not mean_delta.any()


def test_staleness_stats_give_mean_max_and_a_power_of_two_histogram():
    stats = staleness_stats(np.array([0, 1, 2, 3, 5, 40]))
    assert stats["staleness_mean"] == pytest.approx(51 / 6) and stats["staleness_max"] == 40
    assert stats["staleness_hist"] == [1, 1, 2, 1, 0, 0, 1]  # bins 0, 1, 2-3, 4-7, 8-15, 16-31, 32+


# -- the planned schedule --------------------------------------------------------------
def _three_client_schedule(tmp_path, **run):
    """Clients 0, 1, 2 of 10 samples at 10, 4 and 2.5 samples/s: tasks of exactly 1, 2.5 and 4 virtual seconds."""
    trace = tmp_path / "trace.csv"
    trace.write_text("client_id,speed,up_bw,down_bw\n0,10,1,1\n1,4,1,1\n2,2.5,1,1\n")
    scenario = parse_scenario({
        "num_clients": 3, "rounds": 6, "data": {"num_samples": 100}, "sampling": {"clients_per_round": 3},
        "system": {"trace": str(trace)}, "asynchronous": {"mode": "fedasync", "concurrency": 3, **run},
    })
    return AsyncSchedule(client_system(scenario, np.full(3, 10)), scenario, model_bytes=0)


def test_fedasync_events_follow_virtual_time_with_ties_to_the_lower_client_id(tmp_path):
    schedule = _three_client_schedule(tmp_path)
    steps = [schedule.next_step() for _ in range(6)]
    got = [(p.time, p.arrivals[0].client, p.arrivals[0].version, int(p.staleness[0])) for p in steps]
    # client 0 finishes every second and is re-dispatched from the newest version; clients 1 and 2
    # started from version 0; at t = 4 clients 0 and 2 tie and client 0 goes first.
    assert got == [(1.0, 0, 0, 0), (2.0, 0, 1, 0), (2.5, 1, 0, 2), (3.0, 0, 2, 1), (4.0, 0, 4, 0), (4.0, 2, 0, 5)]


def test_updates_staler_than_max_staleness_are_dropped_and_counted(tmp_path):
    schedule = _three_client_schedule(tmp_path, max_staleness=4)
    steps = [schedule.next_step() for _ in range(6)]
    assert [p.stale_dropped for p in steps] == [0, 0, 0, 0, 0, 1]  # client 2's update (staleness 5) at t = 4
    assert all(int(p.staleness.max()) <= 4 for p in steps)
    assert (steps[5].time, steps[5].arrivals[0].client) == (5.0, 0)


def test_resolve_names_every_used_update_from_a_version_with_its_step(tmp_path):
    schedule = _three_client_schedule(tmp_path)
    assert sorted(schedule.resolve(0)) == [(0, 1), (1, 3), (2, 6)]
    assert schedule.resolve(1) == [(0, 2)]


# -- scenario validation ---------------------------------------------------------------
def _raw(**blocks):
    base = {"num_clients": 50, "system": {"speed": {"kind": "lognormal", "mean": 100, "sigma": 1}},
            "asynchronous": {"mode": "fedbuff", "concurrency": 10, "buffer_size": 5}}
    base.update(blocks)
    return base


@pytest.mark.parametrize(("overrides", "field"), [
    (["asynchronous.concurrency=0"], "asynchronous.concurrency"),
    (["asynchronous.buffer_size=11"], "asynchronous.buffer_size"),
    (["asynchronous.concurrency=51", "asynchronous.buffer_size=1"], "asynchronous.concurrency"),
    (["system.speed.mean=-5"], "system.speed.mean"),
    (["system.up_bw={kind: uniform, low: -1, high: 3}"], "system.up_bw.low"),
    (["asynchronous.alpha=1.5"], "asynchronous.alpha"),
    (["asynchronous.max_staleness=-1"], "asynchronous.max_staleness"),
    (["asynchronous.staleness.a=-1"], "asynchronous.staleness.a"),
    (["system.dropout=1"], "system.dropout"),
    (["system.over_selection=1.3"], "system.over_selection"),
    (["system=null"], "asynchronous:"),
    (["strategy.name=scaffold"], "strategy.name"),
    (["asynchronous.mode=fedasync", "strategy.name=fedadam"], "strategy.name"),
])
def test_bad_async_and_system_settings_are_one_line_errors_naming_the_field(overrides, field):
    with pytest.raises(ScenarioError) as err:
        parse_scenario(apply_overrides(_raw(), overrides))
    message = str(err.value)
    assert message.startswith(field) and "\n" not in message


def test_fedprox_and_server_optimizers_compose_with_fedbuff():
    scenario = parse_scenario(apply_overrides(_raw(), ["strategy.name=fedprox", "strategy.mu=0.01"]))
    assert scenario.asynchronous.mode == "fedbuff" and scenario.strategy.mu == 0.01
    assert parse_scenario(apply_overrides(_raw(), ["strategy.name=fedadam"])).strategy.name == "fedadam"


def test_a_malformed_trace_stops_the_run_with_its_line_before_ray_starts(tmp_path, tiny_scenario):
    trace = tmp_path / "trace.csv"
    trace.write_text("client_id,speed,up_bw,down_bw\n0,10,1,1\n1,fast,1,1\n")
    with pytest.raises(ScenarioError, match=r"system.trace: .*trace.csv, line 3: speed"):
        raysim.run(tiny_scenario, overrides=[f"system.trace={trace}"])


# -- the engine end to end -------------------------------------------------------------
ASYNC = {
    "fedbuff": ["asynchronous.mode=fedbuff", "asynchronous.concurrency=16", "asynchronous.buffer_size=4",
                "asynchronous.max_staleness=6", "system.dropout=0.05"],
    "fedasync": ["asynchronous.mode=fedasync", "asynchronous.concurrency=8", "asynchronous.alpha=0.6",
                 "strategy.name=fedprox", "strategy.mu=0.1"],
}
SYSTEM = ["system.speed={kind: lognormal, mean: 100, sigma: 1}", "rounds=8"]


def _tiny(out_dir):
    """The suite's tiny scenario (tests/conftest.py), for a module-scoped fixture."""
    return {
        "name": "tiny", "seed": 3, "num_clients": 200, "rounds": 3,
        "data": {"source": "synthetic", "num_samples": 12000, "num_features": 16, "num_classes": 5},
        "partition": {"kind": "dirichlet", "alpha": 0.5, "min_size": 5}, "sampling": {"clients_per_round": 20},
        "model": {"kind": "mlp", "hidden": [32]}, "training": {"epochs": 1, "batch_size": 16, "lr": 0.1},
        "executor": {"num_workers": 2, "clients_per_call": 3}, "tracking": {"progress": False},
        "output": {"dir": str(out_dir)},
    }


@pytest.fixture(scope="module")
def async_runs(ray_session, tmp_path_factory):
    """Each mode run once with 1 worker and once with 2."""
    raw = _tiny(tmp_path_factory.mktemp("async"))
    return {(mode, workers): raysim.run(raw, overrides=[*SYSTEM, *extra, f"executor.num_workers={workers}",
                                                          f"name={mode}-{workers}"])
            for mode, extra in ASYNC.items() for workers in (1, 2)}


def _schedule_for(raw, overrides):
    scenario = parse_scenario(apply_overrides(raw, overrides))
    part = partition_data(scenario, load_data(scenario))
    return AsyncSchedule(client_system(scenario, part.sizes()), scenario, model_bytes=0)


@pytest.mark.parametrize("mode", ["fedbuff", "fedasync"])
def test_an_async_run_is_bit_identical_with_one_and_two_workers(async_runs, mode):
    one, two = async_runs[(mode, 1)], async_runs[(mode, 2)]
    assert np.array_equal(one.global_vector, two.global_vector)
    timing_free = [{k: v for k, v in m.items() if "second" not in k} for m in one.history]
    assert timing_free == [{k: v for k, v in m.items() if "second" not in k} for m in two.history]
    assert [m["round"] for m in one.history] == list(range(1, 9))
    assert one.history[-1]["accuracy"] > 0.2


@pytest.mark.parametrize("mode", ["fedbuff", "fedasync"])
def test_the_version_cache_holds_only_the_current_version_and_those_in_flight_clients_need(async_runs, tmp_path, mode):
    schedule = _schedule_for(_tiny(tmp_path), [*SYSTEM, *ASYNC[mode]])
    used = [(task.version, plan.step) for plan in (schedule.next_step() for _ in range(8)) for task in plan.arrivals]
    for metrics in async_runs[(mode, 1)].history:
        s = metrics["round"]
        needed = {version for version, step in used if version < s < step}
        assert metrics["versions_cached"] == 1 + len(needed)
        assert metrics["versions_cached"] <= parse_scenario(apply_overrides(_tiny(tmp_path), [*SYSTEM, *ASYNC[mode]])).asynchronous.concurrency + 1


def test_the_engine_counts_the_drops_the_schedule_plans(async_runs, tmp_path):
    schedule = _schedule_for(_tiny(tmp_path), [*SYSTEM, *ASYNC["fedbuff"]])
    plans = [schedule.next_step() for _ in range(8)]
    history = async_runs[("fedbuff", 1)].history
    assert [m["stale_dropped"] for m in history] == [p.stale_dropped for p in plans]
    assert [m["dropouts"] for m in history] == [p.dropouts for p in plans]
    assert history[-1]["dropouts_total"] == sum(p.dropouts for p in plans)
    assert [m["virtual_time"] for m in history] == [p.time for p in plans]
    assert all(m["staleness_max"] <= 6 and m["clients"] == 4 for m in history)


def test_sync_rounds_over_select_keep_the_first_k_and_report_virtual_time(ray_session, tiny_scenario):
    result = raysim.run(tiny_scenario, overrides=[*SYSTEM, "rounds=3", "system.over_selection=1.3"])
    times = [m["virtual_time"] for m in result.history]
    for m in result.history:
        assert m["clients"] == 26 and m["kept"] == 20 and m["virtual_seconds"] > 0
    assert np.allclose(np.cumsum([m["virtual_seconds"] for m in result.history]), times)


def test_async_steps_report_the_same_per_update_metrics_as_rounds(ray_session, tmp_path):
    """An adversary and a norm bound in FedBuff: every step reports malicious, norm_bounded, rejected and bytes."""
    raw = _tiny(tmp_path)
    over = [*SYSTEM, *ASYNC["fedbuff"], "rounds=4", "executor.num_workers=1", "adversary.fraction=0.5",
            "aggregation.norm_bound=1e-6", "name=async-metrics"]
    result = raysim.run(raw, overrides=over)
    dense = dense_bytes(result.global_vector.size)  # an uncompressed update: its float32 words and a header
    for step in result.history:
        assert step["norm_bounded"] == step["kept"] > 0  # every update is longer than 1e-6, and is clipped to it
        assert step["rejected"] == 0 and step["bytes_up"] == dense * step["kept"]
        assert step["bytes_down"] == dense * step["clients"]
    malicious = sum(step["malicious"] for step in result.history)
    assert 0 < malicious < sum(step["clients"] for step in result.history)
    assert result.history[-1]["bytes_up_total"] == dense * sum(step["kept"] for step in result.history)


def test_compression_with_error_feedback_in_fedbuff_and_fedasync(ray_session, tiny_scenario):
    """Compression in async modes: the updates are compressed (bytes and ratio), error feedback carries each
    client's residual to its next update (the model differs from the same run without it), and 1 and 2
    workers give the same model."""
    import raysim

    system = ['system.speed={"kind": "lognormal", "mean": 100, "sigma": 0.5}']
    for mode, steps in (("fedbuff", 12), ("fedasync", 40)):  # 30 clients: each returns several times
        base = [*system, f'asynchronous.mode="{mode}"', 'compression.kind="topk"', "compression.fraction=0.1",
                f"rounds={steps}", "num_clients=30"]
        feedback = raysim.run(tiny_scenario, overrides=[*base, "compression.error_feedback=true", f"name={mode}-ef"])
        plain = raysim.run(tiny_scenario, overrides=[*base, "compression.error_feedback=false", f"name={mode}"])
        one = raysim.run(tiny_scenario, overrides=[*base, "compression.error_feedback=true", "executor.num_workers=1",
                                                   f"name={mode}-ef1"])
        steps = [m for m in feedback.history if m["kept"]]
        assert steps and all(m["compression_ratio"] > 5 for m in steps)  # 10% of the coordinates, with indices
        dense = 4 * feedback.global_vector.size
        assert all(m["bytes_up_per_client"] < dense / 5 for m in steps)
        assert not np.array_equal(feedback.global_vector, plain.global_vector)  # the residuals were used
        assert np.array_equal(feedback.global_vector, one.global_vector)


def test_fedbuff_robust_with_the_mean_rule_is_fedbuffs_pseudo_gradient():
    from raysim.strategies.fedbuff import fedbuff_pseudo_gradient, fedbuff_robust
    from raysim.strategies.staleness import StalenessFunction

    rng = np.random.default_rng(4)
    fn = StalenessFunction("polynomial", 0.5, 1.0)
    buffered = [(int(s), rng.normal(size=(n, 7)), rng.integers(1, 50, n).astype(float)) for s, n in ((0, 3), (4, 2), (9, 1))]
    folds = [(s, (rows * w[:, None]).sum(axis=0), w.sum()) for s, rows, w in buffered]
    mean, weight, _ = fedbuff_robust(buffered, fn, "mean")
    expected, expected_weight = fedbuff_pseudo_gradient(folds, fn)
    assert weight == expected_weight
    np.testing.assert_allclose(mean, expected, rtol=1e-6)
    median, _, _ = fedbuff_robust(buffered, fn, "median")
    shrunk = np.concatenate([float(fn(s)) * rows for s, rows, _ in buffered])
    np.testing.assert_allclose(median, np.median(shrunk, axis=0), rtol=1e-6)  # the rule sees each shrunk update


def test_fedbuff_under_a_robust_rule_resists_sign_flipping_attackers(ray_session, tiny_scenario):
    import raysim

    attack = ['system.speed={"kind": "lognormal", "mean": 100, "sigma": 0.5}', 'asynchronous.mode="fedbuff"',
              "asynchronous.buffer_size=10", "rounds=15", "adversary.fraction=0.2", 'adversary.attack="sign_flip"',
              "adversary.scale=10.0"]
    robust = [*attack, 'aggregation.rule="median"']
    mean = raysim.run(tiny_scenario, overrides=[*attack, "name=mean"])
    median = raysim.run(tiny_scenario, overrides=[*robust, "name=median"])
    one = raysim.run(tiny_scenario, overrides=[*robust, "executor.num_workers=1", "name=median1"])
    assert median.final_accuracy > mean.final_accuracy + 0.2  # the mean is dragged off by the flipped updates
    assert np.array_equal(median.global_vector, one.global_vector)
    assert sum(m["malicious"] for m in median.history) > 0  # attackers were in the buffers


FEDBUFF_DP = ['system.speed={"kind": "lognormal", "mean": 100, "sigma": 0.5}', 'asynchronous.mode="fedbuff"',
              "asynchronous.buffer_size=5", "asynchronous.concurrency=10"]


def test_dp_fedbuff_adds_noise_once_a_step_and_accounts_each_step(ray_session, tiny_scenario):
    """DP-FedBuff: with the same clipped updates, the noised step differs from the noise-free one by
    N(0, (z·S/qW)²) per coordinate (qW = K with unit weights); ε is Opacus's for (z, q = K/N) stepped once a
    server step; the privacy block says what the async accounting assumes; 1 and 2 workers agree."""
    import raysim
    from raysim.privacy.dp.accountant import PrivacyAccountant

    z, clip, k, steps = 2.0, 0.5, 5, 4
    dp = [*FEDBUFF_DP, 'privacy.mechanism="central"', f"privacy.clip_norm={clip}", f"rounds={steps}"]
    noised = raysim.run(tiny_scenario, overrides=[*dp, f"privacy.noise_multiplier={z}", "rounds=1", "name=z"])
    clean = raysim.run(tiny_scenario, overrides=[*dp, "privacy.noise_multiplier=0.0", "rounds=1", "name=z0"])
    noise = noised.global_vector.astype(np.float64) - clean.global_vector
    assert abs(noise.std() / (z * clip / k) - 1) < 0.1  # ~700 coordinates: the standard error is under 3%
    assert abs(noise.mean()) < 0.1 * z * clip / k

    run = raysim.run(tiny_scenario, overrides=[*dp, f"privacy.noise_multiplier={z}", "name=dp"])
    one = raysim.run(tiny_scenario, overrides=[*dp, f"privacy.noise_multiplier={z}", "executor.num_workers=1",
                                               "name=dp1"])
    assert np.array_equal(run.global_vector, one.global_vector)
    reference = PrivacyAccountant("rdp", 1e-5)
    reference.step(z, k / tiny_scenario["num_clients"], steps)
    privacy = run.summary["privacy"]
    assert privacy["epsilon"] == pytest.approx(reference.epsilon(), rel=1e-9)
    assert privacy["sample_rate"] == k / tiny_scenario["num_clients"]
    assert "async buffer is not a Poisson sample" in privacy["sampling_assumption"]
    assert [m["epsilon"] for m in run.history][-1] == pytest.approx(reference.epsilon(), rel=1e-9)
    assert min(m["dp_unclipped_fraction"] for m in run.history) < 1  # clip 0.5 binds: updates were clipped


def test_local_dpsgd_in_fedbuff_keeps_each_clients_accountant(ray_session, tiny_scenario):
    import raysim

    local = [*FEDBUFF_DP, 'privacy.mechanism="local"', "privacy.noise_multiplier=1.0", "privacy.clip_norm=1.0",
             "rounds=6", "num_clients=20"]
    run = raysim.run(tiny_scenario, overrides=[*local, "name=local"])
    vectorized = raysim.run(tiny_scenario, overrides=[*local, "training.vectorize=true", "executor.num_workers=1",
                                                      "name=local-vec1"])
    twice = raysim.run(tiny_scenario, overrides=[*local, "training.vectorize=true", "name=local-vec2"])
    assert run.history[-1]["epsilon_max"] > run.history[0]["epsilon_max"] > 0  # 20 clients: some return
    assert run.summary["privacy"] == vectorized.summary["privacy"]  # the same accounting, sequential or not
    assert np.array_equal(vectorized.global_vector, twice.global_vector)


def test_secure_fedbuff_equals_plain_fedbuff_within_quantization_and_survives_dropouts(ray_session, tiny_scenario):
    """One secure session per buffer: each client applies its staleness weight before encoding, so the
    released sum is FedBuff's own step within quantization error; dropouts in a phase drop only those
    clients; 1 and 2 workers give the same model."""
    import raysim

    fedbuff = ['system.speed={"kind": "lognormal", "mean": 100, "sigma": 0.5}', 'asynchronous.mode="fedbuff"',
               "asynchronous.buffer_size=8", "asynchronous.concurrency=16", "rounds=4",
               'asynchronous.staleness={"kind": "polynomial", "a": 0.5}']
    plain = raysim.run(tiny_scenario, overrides=[*fedbuff, "name=plain"])
    secure = raysim.run(tiny_scenario, overrides=[*fedbuff, "secure_aggregation={}", "name=secure"])
    a, b = plain.global_vector.astype(np.float64), secure.global_vector.astype(np.float64)
    assert 0 < np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-3  # quantized to the ring, not bit-equal
    assert any(m["staleness_max"] for m in secure.history)  # stale updates were weighted on the client
    assert all(m["secagg_survivors"] == m["kept"] for m in secure.history)
    lossy = raysim.run(tiny_scenario, overrides=[*fedbuff, 'secure_aggregation={"dropout": {"masked_input": 0.25}}',
                                                 "name=lossy"])
    lossy1 = raysim.run(tiny_scenario, overrides=[*fedbuff, 'secure_aggregation={"dropout": {"masked_input": 0.25}}',
                                                  "executor.num_workers=1", "name=lossy1"])
    assert sum(m["secagg_survivors"] for m in lossy.history) < sum(m["kept"] for m in lossy.history)
    assert np.array_equal(lossy.global_vector, lossy1.global_vector)


def test_distributed_and_central_dp_on_secure_fedbuff(ray_session, tiny_scenario):
    """DP on a secure FedBuff buffer, through the same server halves as a sync round: distributed DP (each
    client's discrete noise inside the masked sum, any t survivors carrying the target variance) and central
    DP (the server noises the released sum); ε is accounted once a step at q = K/N; 1 and 2 workers agree."""
    import raysim
    from raysim.privacy.dp.accountant import PrivacyAccountant

    k, steps = 8, 3
    fedbuff = ['system.speed={"kind": "lognormal", "mean": 100, "sigma": 0.5}', 'asynchronous.mode="fedbuff"',
               f"asynchronous.buffer_size={k}", "asynchronous.concurrency=16", f"rounds={steps}", "secure_aggregation={}",
               "privacy.noise_multiplier=1.0", "privacy.clip_norm=0.5"]
    reference = PrivacyAccountant("rdp", 1e-5)
    reference.step(1.0, k / tiny_scenario["num_clients"], steps)
    for mechanism in ("distributed", "central"):
        run = raysim.run(tiny_scenario, overrides=[*fedbuff, f'privacy.mechanism="{mechanism}"', f"name={mechanism}"])
        one = raysim.run(tiny_scenario, overrides=[*fedbuff, f'privacy.mechanism="{mechanism}"', "executor.num_workers=1",
                                                   f"name={mechanism}1"])
        assert np.array_equal(run.global_vector, one.global_vector)
        assert run.summary["privacy"]["epsilon"] == pytest.approx(reference.epsilon(), rel=1e-9)
        assert all(m["secagg_survivors"] > 0 for m in run.history)
        if mechanism == "distributed":
            assert all("dp_effective_noise_multiplier" in m for m in run.history)
        # One step, with and without noise: the difference is the noise over the fixed denominator qW = K.
        first = [*fedbuff, f'privacy.mechanism="{mechanism}"', "rounds=1"]
        noised = raysim.run(tiny_scenario, overrides=[*first, f"name={mechanism}-z"]).global_vector
        clean = raysim.run(tiny_scenario, overrides=[*first, "privacy.noise_multiplier=0.0",
                                                     f"name={mechanism}-z0"]).global_vector
        ratio = float(np.std(noised.astype(np.float64) - clean) / (1.0 * 0.5 / k))
        assert 0.85 < ratio < (1.15 if mechanism == "central" else 2.0), ratio  # distributed: Δ₂ ≥ S after rounding
