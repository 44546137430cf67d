"""Secure aggregation as a specification: exact sums under dropouts, aborts, refusals, privacy of inputs."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
from scipy.stats import chisquare

from raysim.errors import ScenarioError
from raysim.privacy.secagg import (
    PHASES,
    ClientGroup,
    DoubleShareRefused,
    DropoutModel,
    SecAggAborted,
    SecAggParams,
    SecAggServer,
    dequantize,
    derive_degree_and_threshold,
    modulus_bits_of,
    neighbours,
    quantize,
    run_round,
)
from raysim.privacy.secagg.dropout import CONSISTENCY_CHECK, MASKED_INPUT, UNMASKING
from raysim.config import apply_overrides
from raysim.engine.validation import parse_and_validate as parse_scenario  # the schema and the engine's checks
from raysim.privacy.secagg import crypto, masking, shamir
from raysim.privacy.secagg.messages import MaskedInput, SurvivorList, UnmaskRequest, UnmaskResponse
from raysim.privacy.secagg.setup import round_params

N, M = 24, 1000
GRAPHS = {"full": None, "sparse": 8}
# With the consistency check (a malicious server) t must exceed n/2, and so the sparse graph needs k ≥ t − 1.
CC_THRESHOLD = N // 2 + 1
CC_GRAPHS = {"full": None, "sparse": 20}


def ring_inputs(params: SecAggParams, n: int = N, m: int = M, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    top = 1 << params.quant_bits
    return {u: rng.integers(0, top, size=m, dtype=np.uint64).astype(params.dtype) for u in range(100, 100 + n)}


def plain_sum(inputs: dict[int, np.ndarray], clients, params: SecAggParams) -> np.ndarray:
    total = sum(int(0) + inputs[u].astype(object) for u in clients)
    return (np.asarray(total, dtype=object) % (1 << params.modulus_bits)).astype(params.dtype)


def assert_exact(result, inputs, params):
    assert not result.aborted, result.abort_reason
    assert np.array_equal(result.aggregate, plain_sum(inputs, result.survivors, params))


@pytest.mark.parametrize("graph", GRAPHS)
def test_unmasked_sum_equals_the_plain_sum_without_dropouts(graph):
    params = SecAggParams(num_clients=N, threshold=6, neighbours=GRAPHS[graph])
    inputs = ring_inputs(params)
    result = run_round(inputs, params)
    assert result.survivors == tuple(sorted(inputs))
    assert_exact(result, inputs, params)


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("phase", PHASES)
def test_unmasked_sum_is_exact_with_drops_in_each_phase(graph, phase):
    checked = phase == CONSISTENCY_CHECK
    params = SecAggParams(num_clients=N, threshold=CC_THRESHOLD if checked else 5,
                          neighbours=(CC_GRAPHS if checked else GRAPHS)[graph], consistency_check=checked)
    inputs = ring_inputs(params, seed=1)
    dropout = DropoutModel(schedule={phase: [101, 107, 113]})
    result = run_round(inputs, params, dropout, seed=2)
    assert result.dropouts[phase] == (101, 107, 113)
    expected = set(inputs) - ({101, 107, 113} if phase in PHASES[:3] else set())
    assert set(result.survivors) == expected
    assert_exact(result, inputs, params)


@pytest.mark.parametrize("graph", GRAPHS)
def test_unmasked_sum_is_exact_with_mixed_and_random_drops_and_a_late_client(graph):
    params = SecAggParams(num_clients=N, threshold=CC_THRESHOLD, neighbours=CC_GRAPHS[graph], consistency_check=True)
    inputs = ring_inputs(params, seed=3)
    dropout = DropoutModel(
        probabilities={MASKED_INPUT: 0.1, UNMASKING: 0.1},
        schedule={"advertise_keys": [100], "share_keys": [105], MASKED_INPUT: [110], CONSISTENCY_CHECK: [111]},
        late=frozenset({120}),
    )
    result = run_round(inputs, params, dropout, seed=4)
    assert result.late == (120,) and 120 not in result.survivors
    assert {100, 105, 110, 120}.isdisjoint(result.survivors)
    assert_exact(result, inputs, params)


@pytest.mark.parametrize("bits", [20, 64])
def test_sums_are_exact_mod_2_to_the_b_for_narrow_and_64_bit_moduli(bits):
    params = SecAggParams(num_clients=N, threshold=5, neighbours=6, modulus_bits=bits, quant_bits=12)
    inputs = ring_inputs(params, seed=5)
    result = run_round(inputs, params, DropoutModel(schedule={MASKED_INPUT: [102, 103]}))
    assert result.aggregate.dtype == params.dtype
    assert_exact(result, inputs, params)


@pytest.mark.parametrize("phase", [MASKED_INPUT, UNMASKING])
def test_round_aborts_below_threshold_and_releases_no_aggregate(phase):
    params = SecAggParams(num_clients=N, threshold=20)
    dropout = DropoutModel(schedule={phase: list(range(100, 105))})
    result = run_round(ring_inputs(params), params, dropout)
    assert result.aborted and result.aggregate is None
    assert phase in result.abort_reason and "< t = 20" in result.abort_reason
    assert result.metrics()["secagg_aborted"] == 1.0


def test_sparse_round_aborts_when_a_dropped_clients_neighbourhood_cannot_rebuild_its_key():
    params = SecAggParams(num_clients=N, threshold=4, neighbours=4)
    members = list(range(100, 100 + N))
    graph = neighbours(members, 4, seed=0)
    victim = 110
    # The victim and all but two of its neighbours drop: 2 < t survivors hold shares of its mask key.
    gone = [victim, *sorted(graph[victim])[:2]]
    result = run_round(ring_inputs(params), params, DropoutModel(schedule={MASKED_INPUT: gone}), graph_seed=0)
    assert result.aborted and result.aggregate is None
    assert "shares of the mask key" in result.abort_reason and "need t=4" in result.abort_reason


def _round_until_unmask(params: SecAggParams, inputs: dict[int, np.ndarray], dropped: set[int]):
    server = SecAggServer(params, session_id=b"s", round_index=0, graph_seed=0, record_transcript=True)
    group = ClientGroup(list(inputs), params, b"s", 0, inputs)
    directories = server.advertise_keys(list(group.advertise_keys(list(inputs)).messages.values()))
    relayed = server.share_keys(list(group.share_keys(directories).messages.values()))
    alive = {u: m for u, m in relayed.items() if u not in dropped}
    requests = server.masked_input(list(group.masked_input(alive).messages.values()))
    return server, group, requests


def test_client_refuses_to_reveal_both_shares_of_the_same_peer():
    params = SecAggParams(num_clients=8, threshold=3)
    inputs = ring_inputs(params, n=8)
    _, group, requests = _round_until_unmask(params, inputs, dropped={103})
    client = group.clients[100]
    honest = requests[100]
    assert 103 in honest.dropped and 101 in honest.survivors
    with pytest.raises(DoubleShareRefused) as refused:
        client.unmask(UnmaskRequest(survivors=honest.survivors + (103,), dropped=honest.dropped))
    assert refused.value.peers == [103]
    client.unmask(honest)
    # A second request that flips a peer from dropped to survivor is refused too.
    with pytest.raises(DoubleShareRefused):
        client.unmask(UnmaskRequest(survivors=tuple(sorted(honest.survivors + (103,))), dropped=()))
    with pytest.raises(DoubleShareRefused):
        client.unmask(UnmaskRequest(survivors=tuple(v for v in honest.survivors if v != 101), dropped=(101,)))


def test_late_clients_mask_key_is_rebuilt_but_its_self_mask_seed_never_revealed():
    params = SecAggParams(num_clients=10, threshold=4)
    inputs = ring_inputs(params, n=10)
    result = run_round(inputs, params, DropoutModel(late=frozenset({104})), record_transcript=True)
    assert_exact(result, inputs, params)
    responses = [e.message for e in result.transcript if isinstance(e.message, UnmaskResponse)]
    assert all(104 in dict(r.mask_key_shares) for r in responses)
    assert all(104 not in dict(r.self_seed_shares) for r in responses)
    late = [e for e in result.transcript if e.phase == MASKED_INPUT + "_late"]
    assert [e.client_id for e in late] == [104]


def test_a_single_masked_input_is_uniform_mod_2_to_the_b():
    params = SecAggParams(num_clients=4, threshold=3)
    m = 1 << 16
    inputs = {u: np.full(m, 7, dtype=np.uint32) for u in range(4)}
    result = run_round(inputs, params, record_transcript=True)
    masked = next(e.message.masked for e in result.transcript if isinstance(e.message, MaskedInput))
    # χ² on the top 8 bits of each word, 256 bins of 256 expected counts each.
    observed = np.bincount(masked >> 24, minlength=256)
    assert chisquare(observed).pvalue > 1e-6
    assert chisquare(np.bincount(inputs[0] >> 24, minlength=256)).pvalue < 1e-6


def _payloads(value) -> list[bytes]:
    if isinstance(value, np.ndarray):
        return [value.tobytes()]
    if isinstance(value, bytes):
        return [value]
    if isinstance(value, (tuple, list)):
        return [chunk for item in value for chunk in _payloads(item)]
    if dataclasses.is_dataclass(value):
        return [chunk for f in dataclasses.fields(value) for chunk in _payloads(getattr(value, f.name))]
    return []


WINDOW = 16  # bytes: four words, eight of them random (inputs are 16-bit values in 32-bit words)


def _windows(blob: bytes) -> set[bytes]:
    """Every WINDOW-byte run of ``blob``, at every offset."""
    return {blob[i : i + WINDOW] for i in range(len(blob) - WINDOW + 1)}


def _leaked_runs(x: np.ndarray, seen: set[bytes]) -> int:
    """How many of the word-aligned WINDOW-byte runs of the whole input ``x`` occur in ``seen``."""
    raw = x.tobytes()
    return sum(raw[i : i + WINDOW] in seen for i in range(0, len(raw) - WINDOW + 1, x.itemsize))


@pytest.mark.parametrize("graph", GRAPHS)
def test_server_transcript_never_contains_any_part_of_an_unmasked_input(graph):
    params = SecAggParams(num_clients=N, threshold=CC_THRESHOLD, neighbours=CC_GRAPHS[graph], consistency_check=True)
    inputs = ring_inputs(params, seed=6)
    dropout = DropoutModel(schedule={MASKED_INPUT: [101], UNMASKING: [102]}, late=frozenset({103}))
    result = run_round(inputs, params, dropout, record_transcript=True)
    assert_exact(result, inputs, params)
    seen: set[bytes] = set()
    for entry in result.transcript:
        for blob in _payloads(entry.message):
            seen |= _windows(blob)
    assert {entry.direction for entry in result.transcript} == {"recv", "send"}
    assert [_leaked_runs(x, seen) for x in inputs.values()] == [0] * N
    # The check itself finds a leak: one input sent in the clear, or only its last quarter.
    x = inputs[104]
    assert _leaked_runs(x, _windows(x.tobytes())) == len(x) - WINDOW // x.itemsize + 1
    assert _leaked_runs(x, seen | _windows(x[-len(x) // 4 :].tobytes())) > 0


def test_messages_pickle_and_report_their_wire_size():
    params = SecAggParams(num_clients=6, threshold=3, modulus_bits=20, quant_bits=8)
    result = run_round(ring_inputs(params, n=6), params, record_transcript=True)
    for entry in result.transcript:
        copy = pickle.loads(pickle.dumps(entry.message))
        assert copy.nbytes() == entry.message.nbytes() > 0
    masked = next(e.message for e in result.transcript if isinstance(e.message, MaskedInput))
    assert masked.nbytes() == 4 + M * 20 // 8
    assert result.server_bytes_received == sum(e.message.nbytes() for e in result.transcript if e.direction == "recv")
    assert result.server_bytes_sent == sum(e.message.nbytes() for e in result.transcript if e.direction == "send")


def test_quantized_weighted_sum_and_total_weight_decode_from_the_secure_sum():
    params = SecAggParams(num_clients=12, threshold=4, neighbours=4, quant_bits=16, clip_range=2.0)
    rng = np.random.default_rng(7)
    weights = rng.uniform(0.1, 1.0, 12)
    vectors = [w * rng.uniform(-1, 1, 500) for w in weights]
    inputs = {u: quantize(v, w, params, rng) for u, (v, w) in enumerate(zip(vectors, weights))}
    result = run_round(inputs, params)
    weighted, total_weight = dequantize(result.aggregate, len(result.survivors), params)
    step = 2 * params.clip_range / ((1 << params.quant_bits) - 1)
    assert np.max(np.abs(weighted - np.sum(vectors, axis=0))) < 12 * step
    assert abs(total_weight - weights.sum()) < 12 * step


def test_stochastic_rounding_is_unbiased_and_clips_to_the_range():
    params = SecAggParams(num_clients=1, threshold=1, quant_bits=4, clip_range=1.0)
    rng = np.random.default_rng(8)
    values = np.array([0.05, -3.0, 3.0])
    decoded = np.mean([dequantize(quantize(values, 0.0, params, rng), 1, params)[0] for _ in range(4000)], axis=0)
    assert np.allclose(decoded, [0.05, -1.0, 1.0], atol=0.01)


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"num_clients": 10, "threshold": 11}, "secure_aggregation.threshold"),
        ({"num_clients": 10, "threshold": 3, "neighbours": 10}, "secure_aggregation.neighbours"),
        ({"num_clients": 10, "threshold": 6, "neighbours": 4}, "secure_aggregation.threshold"),
        ({"num_clients": 1000, "threshold": 3, "modulus_bits": 24, "quant_bits": 16}, "secure_aggregation.modulus_bits"),
        ({"num_clients": 10, "threshold": 3, "modulus_bits": 65}, "secure_aggregation.modulus_bits"),
        ({"num_clients": 10, "threshold": 3, "clip_range": 0.0}, "secure_aggregation.clip_range"),
    ],
)
def test_bad_parameters_raise_a_scenario_error_naming_the_field(settings, field):
    with pytest.raises(ScenarioError, match=field):
        SecAggParams(**settings).validate()


def test_overflow_guard_says_the_minimum_modulus_bits():
    with pytest.raises(ScenarioError, match="modulus_bits ≥ 26"):
        SecAggParams(num_clients=1000, threshold=3, modulus_bits=25, quant_bits=16).validate()
    SecAggParams(num_clients=1000, threshold=3, modulus_bits=26, quant_bits=16).validate()


def test_modulus_must_be_a_power_of_two():
    assert modulus_bits_of(2**32) == 32
    with pytest.raises(ScenarioError, match="secure_aggregation.modulus"):
        modulus_bits_of(10**9)


def test_harary_graph_is_regular_symmetric_and_seeded():
    members = list(range(50, 80))
    for degree in (4, 5, 8):
        graph = neighbours(members, degree, seed=3)
        assert all(u not in graph[u] and all(u in graph[v] for v in graph[u]) for u in members)
        assert sorted(len(graph[u]) for u in members) == [degree] * 30
        assert graph == neighbours(members, degree, seed=3) != neighbours(members, degree, seed=4)
    odd = neighbours(list(range(7)), 3, seed=0)
    assert sorted(len(v) for v in odd.values()) == [3] * 6 + [4]
    assert neighbours(members, None, seed=0)[50] == frozenset(members) - {50}


def test_derived_degree_and_threshold_are_close_to_googles_production_values():
    k4, t4 = derive_degree_and_threshold(10**4, dropout=0.33, corrupt=0.05)
    k6, t6 = derive_degree_and_threshold(10**6, dropout=0.33, corrupt=0.05)
    assert (k4, t4, k6, t6) == (84, 29, 98, 33)  # Google: (86, 29) and (102, 34)
    params = SecAggParams.derive(30, expected_dropout=0.1)
    assert params.neighbours is None or params.neighbours <= 29
    assert params.threshold <= 27


def test_client_aborts_unmasking_without_t_valid_signatures_on_the_survivor_set():
    params = SecAggParams(num_clients=8, threshold=5, consistency_check=True)
    server, group, to_sign = _round_until_unmask(params, ring_inputs(params, n=8), dropped={106})
    signatures = group.consistency_check(to_sign).messages
    requests = server.consistency_check(list(signatures.values()))
    honest = requests[100]
    forged = tuple((signer, bytes(64)) for signer, _ in honest.signatures)
    for bad in (honest.signatures[:3], forged):
        with pytest.raises(SecAggAborted, match="signatures"):
            group.clients[100].unmask(UnmaskRequest(honest.survivors, honest.dropped, bad))
    assert 106 in dict(group.clients[100].unmask(honest).mask_key_shares)


def _split_view_attack(params: SecAggParams, inputs: dict[int, np.ndarray], victim: int, told_dropped: list[int]):
    """A malicious server that runs the protocol honestly up to MaskedInputCollection, then shows
    ``told_dropped`` a survivor set without ``victim`` and every other client one with it. If both halves
    accept, the first reveals the victim's mask-key shares and the second its self-mask shares: the server
    rebuilds s_v^SK and b_v and strips the victim's masked input down to its private input. Returns that
    input, or None when the clients' checks leave the server short of t shares of either secret."""
    honest = dataclasses.replace(params, threshold=max(params.threshold, len(inputs) // 2 + 1))
    server = SecAggServer(honest, session_id=b"s", round_index=0, graph_seed=0)
    server.params = params  # a malicious server runs whatever parameters it likes
    group = ClientGroup(list(inputs), params, b"s", 0, inputs)
    directories = server.advertise_keys(list(group.advertise_keys(list(inputs)).messages.values()))
    relayed = server.share_keys(list(group.share_keys(directories).messages.values()))
    masked = group.masked_input(relayed).messages
    everyone = tuple(sorted(inputs))
    without = tuple(u for u in everyone if u != victim)
    views = {u: without if u in told_dropped else everyone for u in everyone}
    signed = group.consistency_check({u: SurvivorList(views[u]) for u in everyone}).messages
    requests = {}
    for u, view in views.items():
        signatures = tuple((v, m.signature) for v, m in sorted(signed.items()) if views[v] == view)
        requests[u] = UnmaskRequest(survivors=view, dropped=() if victim in view else (victim,), signatures=signatures)
    responses = group.unmask(requests).messages
    key_shares = {u: dict(r.mask_key_shares)[victim] for u, r in responses.items() if victim in dict(r.mask_key_shares)}
    seed_shares = {u: dict(r.self_seed_shares)[victim] for u, r in responses.items() if victim in dict(r.self_seed_shares)}
    if min(len(key_shares), len(seed_shares)) < params.threshold:
        return None

    def rebuild(shares: dict[int, bytes]) -> bytes:
        holders = sorted(shares)[: params.threshold]
        ys = np.stack([shamir.share_from_bytes(shares[h]) for h in holders])
        return shamir.decode_secret(shamir.interpolate_at_zero(np.asarray(holders, dtype=np.uint64) + 1, ys), crypto.KEY_BYTES)

    mask_key = crypto.agreement_key_from_bytes(rebuild(key_shares))
    self_seed = rebuild(seed_shares)[: crypto.KEY_BYTES]
    context = crypto.session_context(b"s", 0)
    pairs = [(victim, u, crypto.mask_seed(mask_key, server.keys[u].mask_public, context)) for u in without]
    return masking.strip_masks(masked[victim].masked.copy(), [self_seed], pairs, modulus_bits=params.modulus_bits,
                               expander=crypto.MaskExpander(M, params.dtype))


def test_split_views_unmask_a_client_unless_the_threshold_exceeds_half_the_clients():
    n, victim = 9, 100
    weak = SecAggParams(num_clients=n, threshold=4, consistency_check=True)  # t ≤ n/2: refused by validation
    with pytest.raises(ScenarioError, match=r"secure_aggregation\.threshold: with consistency_check .* use threshold ≥ 5"):
        weak.validate()
    inputs = ring_inputs(weak, n=n, seed=11)
    others = [u for u in sorted(inputs) if u != victim]
    recovered = _split_view_attack(weak, inputs, victim, told_dropped=others[:4])
    assert recovered is not None and np.array_equal(recovered, inputs[victim])  # the attack is real
    strong = SecAggParams(num_clients=n, threshold=5, consistency_check=True).validate()
    for split in range(1, len(others)):  # no split gathers t signatures on both views
        assert _split_view_attack(strong, inputs, victim, told_dropped=others[:split]) is None


def test_consistency_check_scenarios_need_a_threshold_above_half_the_cohort(tiny_scenario):
    checked = ["secure_aggregation.consistency_check=true", "secure_aggregation.corrupt_fraction=0"]
    with pytest.raises(ScenarioError, match=r"secure_aggregation\.threshold: .*use threshold ≥ 11"):
        parse_scenario(apply_overrides(tiny_scenario, [*checked, "secure_aggregation.threshold=10"]))
    parse_scenario(apply_overrides(tiny_scenario, [*checked, "secure_aggregation.threshold=11"]))
    derived = round_params(parse_scenario(apply_overrides(tiny_scenario, [*checked, "secure_aggregation.threshold=null"]))
                           .secure_aggregation, 20)
    assert derived.threshold >= 11


def test_round_outcome_is_deterministic_for_a_seed_although_keys_are_fresh():
    params = SecAggParams(num_clients=N, threshold=5, neighbours=6)
    inputs = ring_inputs(params, seed=9)
    dropout = DropoutModel(probabilities={MASKED_INPUT: 0.2, UNMASKING: 0.1})
    first, second = (run_round(inputs, params, dropout, seed=10) for _ in range(2))
    assert first.survivors == second.survivors and first.dropouts == second.dropouts
    assert np.array_equal(first.aggregate, second.aggregate)


def test_dropout_model_rejects_unknown_phases_and_bad_probabilities():
    with pytest.raises(ScenarioError, match="secure_aggregation.dropout"):
        DropoutModel(schedule={"training": [1]})
    with pytest.raises(ScenarioError, match="secure_aggregation.dropout.unmasking"):
        DropoutModel(probabilities={UNMASKING: 1.5})
