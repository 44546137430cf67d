"""Homomorphic-encryption aggregation: the second secure-sum backend, beside pairwise masking.

Clients encrypt their updates under one public key (TenSEAL: BFV on masking's quantized integers, or
CKKS on floats), the server adds ciphertexts without seeing any plaintext, and a surviving client holding
the secret key decrypts the sum. ``params`` chooses and checks the encryption parameters, ``keys`` is the
key model, ``cipher`` packs, adds and decrypts, ``encoding`` says what a client encrypts, and ``protocol``
runs a round. Nothing here imports Ray.
"""

from raysim.privacy.he.cipher import CiphertextSum, decrypt, encrypt
from raysim.privacy.he.keys import HEKeys, generate_keys, load_context
from raysim.privacy.he.params import HEParams, choose_params, security_of
from raysim.privacy.he.protocol import HEClientGroup, HEResult, ckks_error_bound, drive_he_round, run_he_round

__all__ = [
    "CiphertextSum", "HEClientGroup", "HEKeys", "HEParams", "HEResult", "choose_params", "ckks_error_bound", "decrypt",
    "drive_he_round", "encrypt", "generate_keys", "load_context", "run_he_round", "security_of",
]
