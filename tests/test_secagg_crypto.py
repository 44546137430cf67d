"""Known-answer tests for the primitives under secure aggregation (reference/test_vectors.md)."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from raysim.privacy.secagg import crypto, shamir
from raysim.privacy.secagg.errors import SecAggError
from raysim.privacy.secagg.sealed_state import RowSealer, sealed_width

ALICE_SECRET = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
ALICE_PUBLIC = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
BOB_SECRET = "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"
BOB_PUBLIC = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
SHARED = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
CONTEXT = crypto.session_context(b"session", 7)


def test_x25519_matches_rfc7748_section_6_1():
    alice = crypto.agreement_key_from_bytes(bytes.fromhex(ALICE_SECRET))
    bob = crypto.agreement_key_from_bytes(bytes.fromhex(BOB_SECRET))
    assert crypto.public_bytes(alice).hex() == ALICE_PUBLIC
    assert crypto.public_bytes(bob).hex() == BOB_PUBLIC
    assert alice.exchange(bob.public_key()).hex() == SHARED


def test_channel_key_and_mask_seed_are_symmetric_and_independent():
    alice = crypto.agreement_key_from_bytes(bytes.fromhex(ALICE_SECRET))
    bob = crypto.agreement_key_from_bytes(bytes.fromhex(BOB_SECRET))
    channel = crypto.channel_key(alice, bytes.fromhex(BOB_PUBLIC), CONTEXT)
    assert channel == crypto.channel_key(bob, bytes.fromhex(ALICE_PUBLIC), CONTEXT)
    seed = crypto.mask_seed(alice, bytes.fromhex(BOB_PUBLIC), CONTEXT)
    assert seed == crypto.mask_seed(bob, bytes.fromhex(ALICE_PUBLIC), CONTEXT)
    assert len({channel, seed, bytes.fromhex(SHARED)}) == 3
    assert seed != crypto.mask_seed(alice, bytes.fromhex(BOB_PUBLIC), crypto.session_context(b"session", 8))


def test_aes256_ctr_matches_nist_sp800_38a_f55():
    key = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
    counter = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    plaintext = bytes.fromhex("6bc1bee22e409f96e93d7e117393172a")
    assert crypto.keystream_block(key, counter, plaintext).hex() == "601ec313775789a5b7a7f504bbf3d228"


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_prg_is_the_zero_iv_aes256_ctr_keystream_read_as_little_endian_words(dtype):
    expander = crypto.MaskExpander(1001, dtype)
    words = expander.expand(bytes(32))
    assert words.tobytes()[:16].hex() == "dc95c078a2408989ad48a21492842087"
    seed = os.urandom(32)
    expected = crypto.keystream_block(seed, bytes(16), bytes(words.nbytes))
    assert expander.expand(seed).tobytes() == expected


def test_prg_add_and_subtract_wrap_mod_2_to_the_word_size():
    expander = crypto.MaskExpander(64, np.uint32)
    seed = os.urandom(32)
    accumulator = np.arange(64, dtype=np.uint32)
    expander.add(accumulator, seed)
    expected = (np.arange(64, dtype=np.uint64) + expander.expand(seed).astype(np.uint64)) % 2**32
    assert np.array_equal(accumulator, expected.astype(np.uint32))
    expander.subtract(accumulator, seed)
    assert np.array_equal(accumulator, np.arange(64, dtype=np.uint32))


def test_sealed_share_is_bound_to_session_round_sender_and_receiver():
    key = os.urandom(32)
    sealed = crypto.seal(key, b"share", context=CONTEXT, sender=3, receiver=5)
    assert crypto.unseal(key, sealed, context=CONTEXT, sender=3, receiver=5) == b"share"
    for context, sender, receiver in [
        (crypto.session_context(b"other", 7), 3, 5),
        (crypto.session_context(b"session", 8), 3, 5),
        (CONTEXT, 5, 3),
        (CONTEXT, 3, 6),
    ]:
        with pytest.raises(SecAggError):
            crypto.unseal(key, sealed, context=context, sender=sender, receiver=receiver)


def test_survivor_signature_verifies_only_for_the_signed_set():
    key = crypto.new_signing_key()
    signature = crypto.sign_survivors(key, (1, 2, 3), CONTEXT)
    public = crypto.public_bytes(key)
    assert crypto.verify_survivors(public, signature, (1, 2, 3), CONTEXT)
    assert not crypto.verify_survivors(public, signature, (1, 2), CONTEXT)


TEXTBOOK_SHARES = [(1, 1494), (2, 329), (3, 965), (4, 176), (5, 1188), (6, 775)]


def test_shamir_textbook_polynomial_gives_the_published_shares():
    values = shamir.evaluate(np.array([[1234], [166], [94]]), np.arange(1, 7), prime=1613)
    assert [(x, int(y)) for x, y in zip(range(1, 7), values[:, 0])] == TEXTBOOK_SHARES


def test_shamir_any_three_textbook_shares_reconstruct_1234():
    for subset in itertools.combinations(TEXTBOOK_SHARES, 3):
        xs, ys = zip(*subset)
        assert int(shamir.interpolate_at_zero(np.array(xs), np.array(ys)[:, None], prime=1613)[0]) == 1234


def test_shamir_two_textbook_shares_leave_every_secret_equally_possible():
    for (x1, y1), (x2, y2) in itertools.combinations(TEXTBOOK_SHARES, 2):
        # For each candidate secret s there is exactly one quadratic through (0, s), (x1, y1), (x2, y2):
        # its value at a third point is a bijection of s, so the two shares rule nothing out.
        third = next(x for x in range(1, 8) if x not in (x1, x2))
        weights = [
            int(w) for w in shamir.lagrange_at_zero(np.array([third, x1, x2]), prime=1613)
        ]  # f(0) = w0 f(third) + w1 y1 + w2 y2, with w0 invertible
        secrets_reached = {(weights[0] * f3 + weights[1] * y1 + weights[2] * y2) % 1613 for f3 in range(1613)}
        assert len(secrets_reached) == 1613


def test_shamir_32_byte_secrets_round_trip_through_any_t_of_n_shares():
    secrets_ = [os.urandom(32), os.urandom(32)]
    holders = np.array([3, 9, 10, 17, 40, 41, 42]) + 1
    shares = shamir.split(secrets_, holders, threshold=4)
    chunks = shamir.chunks_per_secret(32)
    rng = np.random.default_rng(0)
    for _ in range(5):
        rows = np.sort(rng.choice(len(holders), size=4, replace=False))
        rebuilt = shamir.interpolate_at_zero(holders[rows], shares[rows])
        assert shamir.decode_secret(rebuilt[:chunks], 32) == secrets_[0]
        assert shamir.decode_secret(rebuilt[chunks:], 32) == secrets_[1]
    fewer = shamir.interpolate_at_zero(holders[:3], shares[:3])
    assert not np.array_equal(fewer[:chunks], shamir.encode_secret(secrets_[0]))


def test_shamir_float_matrix_product_is_exact_for_large_thresholds():
    threshold, holders = 300, np.arange(1, 401, dtype=np.uint64) * 1_000_003 % shamir.PRIME
    coefficients = np.frombuffer(os.urandom(8 * threshold * 3), dtype=np.uint64).reshape(threshold, 3) % shamir.PRIME
    values = shamir.evaluate(coefficients, holders)
    for row in (0, 199, 399):
        x = int(holders[row])
        for column in range(3):
            horner = 0
            for a in reversed(coefficients[:, column].tolist()):
                horner = (horner * x + a) % shamir.PRIME
            assert int(values[row, column]) == horner


def test_sealed_client_state_opens_exactly_and_is_aes_ctr_under_a_fresh_counter_per_client_and_round():
    key = bytes(range(32))
    rows = np.random.default_rng(0).normal(size=(3, 257)).astype(np.float32)
    ids = np.array([5, 9, 2**40])
    sealer = RowSealer(key)
    sealed = sealer.seal(ids, 7, rows)
    assert sealed.shape == (3, sealed_width(257))
    assert np.array_equal(sealer.open(ids, sealed).view(np.uint32), rows.view(np.uint32))  # bit for bit
    # The payload is AES-256-CTR of the row's bytes from counter block (client id, round + 1, 0).
    expected = crypto.keystream_block(key, (9).to_bytes(8, "big") + (8).to_bytes(4, "big") + bytes(4), rows[1].tobytes())
    assert sealed[1, 2:].tobytes() == expected
    assert sealed[1, :2].view("<i8")[0] == 8
    again = sealer.seal(ids, 8, rows)  # the same state written in another round: another keystream
    assert (again[:, 2:].view(np.uint32) == sealed[:, 2:].view(np.uint32)).mean() < 0.01
    assert not np.array_equal(RowSealer(bytes(32)).open(ids, sealed), rows)  # another key reads garbage
    assert np.array_equal(sealer.open(ids, np.zeros((3, sealed_width(257)), np.float32)), np.zeros((3, 257)))
