"""Issue 14's DP defects, pinned without Ray: over-selection's q, empty rounds, distributed DP's encoding, ε's notes.

The server pieces run in process (a ``RoundServer`` with no workers, ``secure_sum`` stubbed where a
secure round aborts); every expected figure is computed here from Opacus or from the formulas.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from raysim.config import SecureAggregationConfig, apply_overrides, parse_scenario
from raysim.engine import server as server_module
from raysim.engine.clock import SyncClock
from raysim.engine.secure import SecureSum
from raysim.engine.server import RoundServer
from raysim.engine.system_model import client_system
from raysim.engine.worker import ChunkResult, ClientBatch, ClientWorker, RoundPlan
from raysim.privacy.secagg.params import SecAggParams
from raysim.privacy.secagg.quantize import quantize
from raysim.privacy.dp.sampling import sampling_assumption
from raysim.privacy.secagg.setup import SecureRound, decode_sum, encode_update, round_params
from raysim.tracking import RunFolder, Tracker

OVER_SELECTED = ["sampling.clients_per_round=10", "system.speed.kind=lognormal", "system.speed.mean=100",
                 "system.speed.sigma=1", "system.over_selection=1.3"]
CENTRAL = ["privacy.mechanism=central", "privacy.noise_multiplier=1.0"]
EMPTY_POISSON = ["sampling.kind=poisson", "sampling.rate=0.002"]  # seed 3: rounds 5 and 6 sample nobody
EMPTY_ROUND = 4
DISTRIBUTED = ["privacy.mechanism=distributed", "privacy.noise_multiplier=0.5", "privacy.clip_norm=0.5",
               "secure_aggregation.threshold=0.5", "secure_aggregation.quant_bits=8"]


def _epsilon(z: float, q: float, steps: int, delta: float = 1e-5) -> float:
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=z, sample_rate=q)
    return accountant.get_epsilon(delta)


@pytest.fixture
def make_server(tiny_scenario):
    """A RoundServer of the tiny scenario with ``overrides``, without workers (nothing here calls Ray, and the
    rounds run evaluate nothing: the workers evaluate)."""

    def make(overrides: list[str]) -> RoundServer:
        scenario = parse_scenario(apply_overrides(tiny_scenario, ["rounds=10", "evaluation.every=10", *overrides]))
        rng = np.random.default_rng(0)
        x_test, y_test = rng.normal(size=(20, 16)).astype(np.float32), rng.integers(0, 5, 20)
        system = client_system(scenario, np.full(scenario.num_clients, 48))
        return RoundServer(scenario, [], (x_test, y_test), (16,), 5, system=system,
                           dp_total_weight=float(scenario.num_clients))

    return make


# --- 1. over-selection ----------------------------------------------------------------------------


def test_over_selection_accounts_the_worst_case_participation_rate(make_server):
    server = make_server([*OVER_SELECTED, *CENTRAL])
    dp, scenario = server.core.central_dp, server.scenario
    assert scenario.sample_rate == 13 / 200 and dp.sample_rate == 13 / 200  # ⌈10·1.3⌉/200, not 10/200
    assert dp.denominator_rate == 10 / 200 and dp.expected_weight == 10 / 200 * 200  # qW keeps the kept fraction
    for _ in range(50):
        dp.aggregate(np.zeros(3), unclipped=0, rng=np.random.default_rng(0), server_noise=True)
    assert dp.accountant.epsilon() == pytest.approx(_epsilon(1.0, 0.065, 50), rel=1e-9)
    assert dp.accountant.epsilon() == pytest.approx(3.986205, abs=1e-6)  # K/N = 0.05 reported 3.176403
    report = server.privacy_report()
    assert "over_selection" in report["sampling_assumption"] and "13/200" in report["sampling_assumption"]

    # Why the worst case: the fastest client is kept in every round that draws it.
    clock = SyncClock(client_system(scenario, np.full(200, 48)), scenario, model_bytes=4 * server.core.global_vec.size)
    durations = clock.system.model.duration(np.arange(200), np.full(200, 48), np.ones(200, dtype=np.int64), clock.model_bytes)
    fastest = int(np.argmin(durations))
    drawn = kept = 0
    for r in range(300):
        sampled = clock.sample(r)
        chosen, _, _ = clock.select(sampled, np.ones(len(sampled), dtype=np.int64), r)
        assert len(sampled) == 13 and len(chosen) == 10
        drawn, kept = drawn + int(fastest in sampled), kept + int(fastest in chosen)
    assert kept == drawn > 0


# --- 2. empty rounds -------------------------------------------------------------------------------


def test_an_empty_poisson_round_still_releases_the_central_noise_and_steps_the_accountant(make_server):
    server = make_server([*EMPTY_POISSON, *CENTRAL])
    before = server.core.global_vec.copy()
    metrics = server.run_round(EMPTY_ROUND)
    assert metrics["clients"] == 0 and metrics["dp_empty_round"] == 1
    sigma = 1.0 * 1.0 / (0.002 * 200.0)  # σ = z·S/(qW)
    noise = np.random.default_rng([3, EMPTY_ROUND, 13]).standard_normal(before.size) * sigma
    assert np.array_equal(server.core.global_vec, (before + noise.astype(np.float32)).astype(np.float32))
    assert server.core.central_dp.accountant.steps == 1
    assert metrics["epsilon"] == pytest.approx(_epsilon(1.0, 0.002, 1), rel=1e-9)
    assert server.privacy_report()["empty_rounds"] == 1


def test_an_empty_round_moves_the_adaptive_clip_with_a_zero_count(make_server):
    server = make_server([*EMPTY_POISSON, *CENTRAL, "privacy.adaptive.count_stddev=5"])
    server.run_round(EMPTY_ROUND)
    rng = np.random.default_rng([3, EMPTY_ROUND, 13])
    rng.standard_normal(server.core.global_vec.size)  # the update's noise comes first
    fraction = (0 + rng.normal(0.0, 5.0)) / (0.002 * 200)  # b̄ = (Σ b_i + N(0, σ_b²)) / m with Σ b_i = 0
    assert server.core.central_dp.clip_norm == pytest.approx(1.0 * math.exp(-0.2 * (fraction - 0.5)), rel=1e-12)


def test_an_empty_round_without_dp_leaves_the_model_bit_identical(make_server):
    server = make_server(EMPTY_POISSON)
    before = server.core.global_vec.copy()
    metrics = server.run_round(EMPTY_ROUND)
    assert metrics["clients"] == 0 and "dp_empty_round" not in metrics
    assert np.array_equal(server.core.global_vec, before)


def _chunk(weights: list[float], dim: int) -> ChunkResult:
    n = len(weights)
    return ChunkResult(index=0, delta_sum=np.zeros(dim), weight_sum=float(sum(weights)), client_ids=np.arange(n),
                       weights=np.array(weights), losses=np.zeros(n), steps=np.ones(n, dtype=np.int64),
                       bytes_up=np.zeros(n, dtype=np.int64))


def _reduce(server: RoundServer, chunks: list[ChunkResult], round_index: int, plan) -> dict:
    """The server's reduction and step of ``chunks`` (one chunk, on worker 0), after its secure sum if any."""
    secure = None if plan.secure is None else server._secure_sum(chunks, plan, {0: 0}, round_index)
    return server._reduce_and_step(chunks, round_index, plan, secure)


def _abort_secure_rounds(monkeypatch) -> None:
    monkeypatch.setattr(server_module, "secure_sum", lambda *args: SecureSum(None, 0.0, None, (), {"secagg_aborted": 1}))


@pytest.mark.parametrize("secure", [False, True])
def test_a_central_round_that_aggregates_nothing_releases_noise(make_server, monkeypatch, secure):
    """Zero total weight in the clear, or an aborted secure round: both release 0/(qW) + N(0, σ²)."""
    server = make_server([*CENTRAL, *(["secure_aggregation.threshold=0.5"] if secure else [])])
    _abort_secure_rounds(monkeypatch)
    before, dim = server.core.global_vec.copy(), server.core.global_vec.size
    weights = [1.0, 1.0, 1.0] if secure else [0.0, 0.0, 0.0]  # secure: three clients joined, then the round aborted
    out = _reduce(server, [_chunk(weights, dim)], 2, server._round_plan(3, 2))
    assert out["dp_empty_round"] == 1
    noise = np.random.default_rng([3, 2, 13]).standard_normal(dim) * (1.0 / (0.1 * 200.0))
    assert np.array_equal(server.core.global_vec, (before + noise.astype(np.float32)).astype(np.float32))
    assert server.core.central_dp.accountant.steps == 1 and server.core.central_dp.empty_rounds == 1


def test_an_aborted_distributed_round_keeps_the_model_and_is_accounted(make_server, monkeypatch):
    server = make_server(DISTRIBUTED)
    _abort_secure_rounds(monkeypatch)
    before = server.core.global_vec.copy()
    out = _reduce(server, [_chunk([1.0] * 20, before.size)], 0, server._round_plan(20, 0))
    assert out["dp_empty_round"] == 1 and out["secagg_aborted"] == 1
    assert np.array_equal(server.core.global_vec, before)  # no client noise arrived, so nothing may be released
    assert server.core.central_dp.accountant.steps == 1  # conservatively accounted all the same
    report = server.privacy_report()
    assert report["empty_rounds"] == 1 and "conservative" in report["empty_round_accounting"]


# --- 3. distributed DP's encoding ------------------------------------------------------------------

PARAMS = SecAggParams(num_clients=4, threshold=2, quant_bits=8, clip_range=1.0)  # scale 127.5, zero at 127.5
CONFIG = SecureAggregationConfig(threshold=2)


def _kls_bound(c: float, d: int) -> float:
    """Δ₂ of Kairouz, Liu, Steinke with β = e^−0.5, so that √(2 ln 1/β) = 1."""
    return math.sqrt(min(c * c + d / 4 + (c + math.sqrt(d) / 2), (c + math.sqrt(d)) ** 2))


def test_every_conditionally_rounded_vector_keeps_the_norm_bound():
    # Every scaled coordinate is the integer 15, half-way between two levels of the lattice around 127.5:
    # each rounds up or down with probability 1/2, the worst case for the rounding's norm.
    delta = np.full(64, 15 / 127.5, dtype=np.float32)
    clip = float(np.linalg.norm(delta.astype(np.float64)))
    bound = _kls_bound(127.5 * clip, 64)
    plain = [np.linalg.norm(quantize(delta, None, PARAMS, np.random.default_rng(s)) - 127.5) for s in range(300)]
    assert max(plain) > bound  # unconditional rounding overshoots Δ₂ here
    for seed in range(300):
        ring = encode_update(delta, 1.0, 1.0, None, CONFIG, PARAMS, np.random.default_rng(seed), dp_clip_norm=clip)
        assert ring.size == 64  # d words: no weight word
        assert np.linalg.norm(ring.astype(np.float64) - 127.5) <= bound


def test_the_dp_ring_sum_decodes_without_a_weight_and_plain_secagg_is_unchanged():
    rng = np.random.default_rng(21)
    delta = (rng.standard_normal(50) * 0.1).astype(np.float32)
    control = rng.standard_normal(50).astype(np.float32)
    params = SecAggParams(num_clients=4, threshold=2, quant_bits=12, clip_range=1.0)
    plain = encode_update(delta, 0.7, 2.0, None, CONFIG, params, np.random.default_rng(5))
    scaffold = encode_update(delta, 0.7, 2.0, control, CONFIG, params, np.random.default_rng(6))
    # Digests of the encodings before issue 14's fix: plain secure aggregation keeps its words bit for bit.
    assert (plain.size, scaffold.size) == (51, 101)
    assert hashlib.sha256(plain.tobytes()).hexdigest().startswith("380ba85044eb0e65")
    assert hashlib.sha256(scaffold.tobytes()).hexdigest().startswith("83ff5388be75da3a")
    clip = float(np.linalg.norm(delta.astype(np.float64)))
    weights = [1.0, 0.5, 0.25, 1.0]
    rings = [encode_update(delta, w, 1.0, None, CONFIG, params, np.random.default_rng(s), dp_clip_norm=clip)
             for s, w in enumerate(weights)]
    total = np.sum([r.astype(np.uint64) for r in rings], axis=0) % 2**32
    weighted, weight, control_sum = decode_sum(total.astype(np.uint32), 4, 50, 1.0, CONFIG, params)
    assert weight is None and control_sum is None
    step = 2.0 / ((1 << 12) - 1)
    assert np.max(np.abs(weighted - sum(weights) * delta)) < 4 * step


def test_the_workers_dp_ring_vector_holds_exactly_d_words(tiny_scenario):
    scenario = parse_scenario(apply_overrides(tiny_scenario, DISTRIBUTED))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 16)).astype(np.float32), rng.integers(0, 5, 60)
    threads = torch.get_num_threads()
    worker = ClientWorker.local(scenario, x, y, np.arange(60), np.arange(0, 61, 10), (16,), 5)
    torch.set_num_threads(threads)
    secure = SecureRound(scenario.secure_aggregation, round_params(scenario.secure_aggregation, 6), b"s" * 16, 1.0)
    plan = RoundPlan(secure=secure, clip_norm=0.5, noise_variance=4.0)
    worker.train(worker.runtime.flat.numpy(), None, 0, plan, 0, ClientBatch(np.array([0, 1]), np.array([1, 1])))
    group = worker.encoding.groups[secure.session_id]
    assert {u: v.size for u, v in group.inputs.items()} == {0: worker.runtime.flat.size, 1: worker.runtime.flat.size}


def test_distributed_noise_is_sized_from_the_rounding_bound(make_server):
    server = make_server(DISTRIBUTED)
    plan = server._round_plan(20, 0)
    d, t = server.core.global_vec.size, plan.secure.params.threshold
    assert t == 10 and plan.secure.params.quant_bits == 8
    delta2 = _kls_bound(0.5 * 127.5, d)  # c = S·scale = 63.75
    assert plan.noise_variance == pytest.approx((0.5 * delta2) ** 2 / t, rel=1e-12)  # (z·Δ₂)²/t


# --- 4. what ε assumes -----------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "expected"), [
    (CENTRAL, "the accountant assumes Poisson sampling at q = K/N = 20/200 = 0.1"),
    ([*CENTRAL, *EMPTY_POISSON], "Poisson sampling of clients at rate q = 0.002"),
    ([*CENTRAL, *OVER_SELECTED], "worst-case participation rate q = ⌈K·over_selection⌉/N = 13/200 = 0.065"),
    (DISTRIBUTED, "the accountant assumes Poisson sampling at q = K/N = 20/200 = 0.1"),
    (["privacy.mechanism=local"], "sample-level DP-SGD: each client's accountant assumes Poisson batches"),
])
def test_every_mechanisms_privacy_block_states_its_sampling_assumption(make_server, overrides, expected):
    assert expected in make_server(overrides).privacy_report()["sampling_assumption"]


class _Bar:
    disable = False

    def __init__(self) -> None:
        self.postfix: dict = {}
        self.written: list[str] = []

    def set_postfix(self, shown: dict, refresh: bool) -> None:
        self.postfix = shown

    def update(self, n: int) -> None:
        pass

    def write(self, text: str, file: object) -> None:
        self.written.append(text)

    def close(self) -> None:
        pass


class _WandbRun:
    def __init__(self) -> None:
        self.summary: dict = {}

    def log(self, metrics: dict) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


@pytest.mark.parametrize(("overrides", "label", "noted"), [(CENTRAL, "ε*", True), ([*CENTRAL, *EMPTY_POISSON], "ε", False)])
def test_the_progress_bar_stars_epsilon_and_wandb_keeps_the_assumption(tiny_scenario, tmp_path, monkeypatch,
                                                                       overrides, label, noted):
    scenario = parse_scenario(apply_overrides(tiny_scenario, [*overrides, "tracking.wandb=offline"]))
    run = _WandbRun()
    monkeypatch.setattr("raysim.tracking._start_wandb", lambda folder, scenario, mode: run)
    folder = RunFolder(tmp_path)
    tracker = Tracker(folder, scenario)
    tracker.bar = _Bar()
    for r in (1, 2):
        tracker.log({"round": r, "loss": 1.0, "epsilon": 2.5 * r})
    assert tracker.bar.postfix == {"loss": "1.0000", label: "5.000"}
    assert len(tracker.bar.written) == int(noted)  # the note behind the star, once
    if noted:
        assert "20/200" in tracker.bar.written[0]
    assert run.summary["epsilon_assumption"] == sampling_assumption(scenario)
