"""The homomorphic-encryption backend: exact BFV sums, CKKS within its bound, the key model, dropouts, and the
engine, where BFV releases exactly masking's sum."""

import numpy as np
import pytest
import tenseal as ts

import raysim
from raysim.config import SecureAggregationConfig, apply_overrides
from raysim.engine.core import _public_context
from raysim.engine.handover import open_sealed, seal_for_workers
from raysim.engine.validation import parse_and_validate
from raysim.errors import ScenarioError
from raysim.privacy.he import (HEClientGroup, choose_params, ckks_error_bound, decrypt, drive_he_round, generate_keys,
                               load_context, run_he_round, security_of)
from raysim.privacy.he.encoding import ring_of_sum, signed_words
from raysim.privacy.he.keys import new_context
from raysim.privacy.he.params import MAX_COEFF_BITS, HEParams, _is_prime
from raysim.privacy.he.protocol import DecryptionRequest
from raysim.privacy.he.setup import run_params
from raysim.privacy.secagg.dropout import DropoutModel
from raysim.privacy.secagg.params import SecAggParams

HE = ["secure_aggregation.backend=he", "secure_aggregation.threshold=0.5"]


def _config(**he) -> SecureAggregationConfig:
    return SecureAggregationConfig(backend="he", he=he)


@pytest.fixture(scope="module")
def bfv():
    params = choose_params(_config(), 16, 3 * 8192)
    keys = generate_keys(params)
    return params, load_context(keys.secret), load_context(keys.public), keys


@pytest.fixture(scope="module")
def ckks():
    params = choose_params(_config(scheme="ckks"), 16, 5000)
    keys = generate_keys(params)
    return params, load_context(keys.secret), load_context(keys.public)


def test_the_bfv_sum_of_signed_ring_words_is_exact_across_ciphertexts(bfv):
    params, secret, public, _ = bfv
    ring = SecAggParams(num_clients=16, threshold=1, quant_bits=20)
    rng = np.random.default_rng(0)
    # Words with noise that wrapped below 0 in Z_(2^32), over 2 full ciphertexts and part of a third.
    words = {u: signed_words((rng.integers(0, 2**20, 2 * 8192 + 5) + rng.integers(-2**12, 2**12, 2 * 8192 + 5))
                             .astype(np.uint32), ring) for u in range(16)}
    assert min(w.min() for w in words.values()) < 0
    result = run_he_round(words, params, secret, public)
    assert result.ciphertexts_per_client == 3 and not result.aborted
    exact = np.sum(list(words.values()), axis=0)
    assert np.array_equal(result.aggregate, exact)
    # Reduced mod 2^b it is the ring sum masking would unmask.
    ring_sum = np.sum([(w % 2**32).astype(np.uint64) for w in words.values()], axis=0) % 2**32
    assert np.array_equal(ring_of_sum(result.aggregate, ring), ring_sum.astype(np.uint32))


def test_the_ckks_sum_is_approximate_and_within_the_stated_bound(ckks):
    params, secret, public = ckks
    rng = np.random.default_rng(1)
    values = {u: rng.uniform(-1, 1, 5000) for u in range(16)}
    result = run_he_round(values, params, secret, public)
    error = np.max(np.abs(result.aggregate - np.sum(list(values.values()), axis=0)))
    assert 0 < error <= ckks_error_bound(params, 16)


def test_dropouts_mid_round_release_the_exact_sum_of_the_survivors_with_no_recovery(bfv):
    params, secret, public, _ = bfv
    rng = np.random.default_rng(2)
    words = {u: rng.integers(-2**26, 2**26, 9000) for u in range(10)}  # sums stay below t/2
    dropout = DropoutModel(schedule={"masked_input": {2, 5}, "unmasking": {0, 1, 3, 4, 6, 7}}, late={9})
    result = run_he_round(words, params, secret, public, threshold=2, dropout=dropout, seed=3)
    assert result.survivors == (0, 1, 3, 4, 6, 7, 8)  # 2 and 5 sent nothing, 9's upload came late
    assert result.decryptor == 8  # every other survivor dropped before decrypting; the sum was not redone
    assert np.array_equal(result.aggregate, np.sum([words[u] for u in result.survivors], axis=0))
    metrics = result.metrics()
    assert (metrics["secagg_masked_input_dropouts"], metrics["secagg_unmasking_dropouts"]) == (2, 6)
    assert metrics["secagg_late_clients"] == 1 and metrics["secagg_survivors"] == 7
    assert metrics["secagg_client_bytes_received_max"] > 0 and metrics["he_decrypt_seconds"] > 0


def test_a_sum_of_fewer_than_t_updates_is_never_decrypted(bfv):
    params, secret, public, _ = bfv
    words = {u: np.arange(100, dtype=np.int64) for u in range(6)}
    aborted = run_he_round(words, params, secret, public, threshold=5,
                           dropout=DropoutModel(schedule={"masked_input": {0, 1}}))
    assert aborted.aborted and aborted.aggregate is None and aborted.decryptor is None
    # A decryptor told of too few contributors refuses, whatever the server asks.
    group = HEClientGroup(secret, params, threshold=5)
    group.add(0, words[0])
    reply = group.decrypt({0: DecryptionRequest((), (0, 1))})
    assert 0 in reply.failures and not reply.messages


def test_the_server_side_holds_only_the_public_context_and_cannot_decrypt(bfv):
    params, secret, public, keys = bfv
    assert secret.is_private() and not public.is_private()
    upload = HEClientGroup(secret, params, 1)
    upload.add(7, np.arange(10, dtype=np.int64))
    message = upload.upload([7])[0].messages[7]
    assert all(isinstance(blob, bytes) for blob in message.ciphertexts)  # all the server receives: ciphertext bytes
    with pytest.raises(PermissionError):
        decrypt(public, message.ciphertexts, params, 10)
    with pytest.raises(ValueError):  # TenSEAL itself refuses without the secret key
        ts.bfv_vector_from(public, message.ciphertexts[0]).decrypt()
    assert np.array_equal(decrypt(secret, message.ciphertexts, params, 10), np.arange(10))
    with pytest.raises(ValueError, match="secret key"):  # the server actor refuses a context with the secret key
        _public_context(keys.secret)
    assert not _public_context(keys.public).is_private()
    with pytest.raises(ValueError, match="public context"):
        drive_he_round(upload, [7], params, secret, 1)
    # The secret context reaches the workers sealed under the pool's secret, which the server lacks.
    pool_secret = bytes(range(32))
    sealed = seal_for_workers(pool_secret, keys.secret)
    assert keys.secret[100:164] not in sealed and open_sealed(pool_secret, sealed) == keys.secret


def test_parameters_follow_the_he_standard_as_seal_enforces_it():
    bfv = choose_params(_config(), 50, 20000)
    assert bfv.poly_modulus_degree == 8192 and bfv.ciphertexts(20000) == 3
    assert _is_prime(bfv.plain_modulus) and bfv.plain_modulus % (2 * 8192) == 1 and bfv.plain_modulus > 2**32
    assert sum(bfv.coeff_mod_bit_sizes) <= MAX_COEFF_BITS[128][8192]
    assert security_of(8192, sum(bfv.coeff_mod_bit_sizes)) == 256
    assert choose_params(_config(scheme="ckks"), 50, 20000).slots == 4096
    # A modulus a 256-bit level cannot hold at 8192 moves to 16384.
    big = choose_params(_config(scheme="ckks", security_bits=256, scale_bits=58), 10**6, 100)
    assert big.poly_modulus_degree == 16384
    # SEAL draws the same line: 218 bits at N = 8192 build a context, 219 do not.
    assert new_context(HEParams("ckks", 8192, (60, 60, 60, 38), 128, scale_bits=40)).is_private()
    with pytest.raises(ValueError):
        new_context(HEParams("ckks", 8192, (60, 60, 60, 39), 128, scale_bits=40))
    assert security_of(8192, 219) == 0


@pytest.mark.parametrize(("overrides", "field"), [
    (["secure_aggregation.he.scheme=paillier"], "secure_aggregation.he.scheme"),
    (["secure_aggregation.he.security_bits=80"], "secure_aggregation.he.security_bits"),
    (["secure_aggregation.he.security_bits=160"], "secure_aggregation.he.security_bits"),
    (["secure_aggregation.modulus_bits=62"], "secure_aggregation.modulus_bits"),
    (["secure_aggregation.neighbours=5"], "secure_aggregation.neighbours"),
    (["secure_aggregation.dropout.share_keys=0.1"], "secure_aggregation.dropout"),
    (["secure_aggregation.he.scheme=ckks", "privacy.mechanism=distributed"], "secure_aggregation.he.scheme"),
])
def test_bad_he_settings_get_one_line_naming_their_field(tiny_scenario, overrides, field):
    with pytest.raises(ScenarioError, match=field.replace(".", r"\.")) as caught:
        parse_and_validate(apply_overrides(tiny_scenario, [*HE, *overrides]))
    assert "\n" not in str(caught.value)


def test_a_vector_that_does_not_fit_the_packing_is_refused(ray_session, tiny_scenario):
    scenario = parse_and_validate(apply_overrides(tiny_scenario, [*HE, "secure_aggregation.he.max_ciphertexts=4"]))
    assert run_params(scenario, 4 * 8192 - 1)[1] == 4 * 8192  # the weight word fills the last slot
    with pytest.raises(ScenarioError, match=r"secure_aggregation\.he\.max_ciphertexts: an update of 32769 words needs 5"):
        run_params(scenario, 4 * 8192)
    with pytest.raises(ScenarioError, match="he.max_ciphertexts"):  # through a run, before any actor trains
        raysim.run(apply_overrides(tiny_scenario, [*HE, "secure_aggregation.he.max_ciphertexts=1",
                                                   "model.hidden=[1024]"]))


def test_bfv_in_the_engine_releases_masking_s_sum_deterministically_and_close_to_plain(ray_session, tiny_scenario):
    rounds, dropout = ["rounds=4"], ["secure_aggregation.dropout.masked_input=0.1", "secure_aggregation.dropout.unmasking=0.2"]
    plain = raysim.run(tiny_scenario, overrides=[*rounds, "name=plain"])
    he = raysim.run(tiny_scenario, overrides=[*rounds, *HE, *dropout, "name=he", "secure_aggregation.diagnostics=true"])
    one = raysim.run(tiny_scenario, overrides=[*rounds, *HE, *dropout, "name=one", "executor.num_workers=1"])
    masking = raysim.run(tiny_scenario, overrides=[*rounds, *dropout, "secure_aggregation.threshold=0.5", "name=mask"])
    assert np.array_equal(he.global_vector, one.global_vector)  # 1 or 2 workers, whatever the arrival order
    assert np.array_equal(he.global_vector, masking.global_vector)  # the same survivors, the same exact sum
    full = raysim.run(tiny_scenario, overrides=[*rounds, *HE, "name=full"])  # no dropouts: only quantization differs
    assert abs(full.final_accuracy - plain.final_accuracy) <= 0.005
    assert sum(m["secagg_masked_input_dropouts"] for m in he.history) > 0
    assert all(m["he_decoding_error"] == 0 and m["secagg_aborted"] == 0 for m in he.history)
    assert all(m["secagg_survivors"] == 20 - m["secagg_masked_input_dropouts"] for m in he.history)
    last = he.history[-1]
    assert last["he_ciphertexts_per_client"] == 1 and last["secagg_client_bytes_sent_mean"] > 8192 * 8
    assert he.summary["he"]["poly_modulus_degree"] == 8192 and "secret" not in str(he.summary["he"]).replace(
        "secret_context_bytes", "")


def test_ckks_in_the_engine_stays_within_its_bound_and_half_a_point_of_plain(ray_session, tiny_scenario):
    plain = raysim.run(tiny_scenario, overrides=["name=plain"])
    ckks = raysim.run(tiny_scenario, overrides=[*HE, "secure_aggregation.he.scheme=ckks", "secure_aggregation.diagnostics=true"])
    params = choose_params(_config(scheme="ckks"), 20, 1)
    assert all(0 < m["he_decoding_error"] <= ckks_error_bound(params, 20) for m in ckks.history)
    assert abs(ckks.final_accuracy - plain.final_accuracy) <= 0.005


@pytest.mark.parametrize("feature", [
    ["strategy.name=scaffold"],
    ["strategy.name=fedprox", "strategy.mu=0.1"],
    ["strategy.name=fedadam", "strategy.server_lr=0.01"],
    ["privacy.mechanism=distributed", "privacy.clip_norm=0.5", "secure_aggregation.dropout.masked_input=0.1"],
    ["privacy.mechanism=central", "privacy.clip_norm=0.5"],
])
def test_bfv_composes_and_releases_masking_s_sum(ray_session, tiny_scenario, feature):
    he = raysim.run(tiny_scenario, overrides=[*HE, *feature, "rounds=2"])
    masking = raysim.run(tiny_scenario, overrides=[*feature, "secure_aggregation.threshold=0.5", "rounds=2"])
    assert np.array_equal(he.global_vector, masking.global_vector)
    assert all(m["secagg_aborted"] == 0 for m in he.history)


def test_secure_fedbuff_under_he_releases_masking_s_sum(ray_session, tiny_scenario):
    fedbuff = ["rounds=6", "system.speed.kind=lognormal", "system.speed.mean=100", "system.speed.sigma=1",
               "asynchronous.mode=fedbuff", "asynchronous.concurrency=10", "asynchronous.buffer_size=5"]
    he = raysim.run(tiny_scenario, overrides=[*fedbuff, *HE])
    masking = raysim.run(tiny_scenario, overrides=[*fedbuff, "secure_aggregation.threshold=0.5"])
    assert np.array_equal(he.global_vector, masking.global_vector)
    assert all(m["secagg_survivors"] == 5 for m in he.history)
