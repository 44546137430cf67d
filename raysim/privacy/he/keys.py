"""The key model of the homomorphic backend: one key authority, clients that hold the secret key, a server that cannot.

TenSEAL (SEAL underneath) has no threshold decryption, so the backend uses the usual FL arrangement:
a key authority (the driver process, which no client or server runs in) generates one key pair per run
and hands the secret context to the clients only: to the worker actors that run them, sealed under the
pool's secret on its way, like the clients' storage key. The server actor gets the public context, which
can encrypt and add but not decrypt. Unlike masking's t-of-n secret sharing, a server that colludes with
any single client decrypts every update it received.
"""

from __future__ import annotations

from dataclasses import dataclass

import tenseal as ts

from raysim.privacy.he.params import HEParams


@dataclass(frozen=True)
class HEKeys:
    """The run's contexts, serialized: ``secret`` (with the secret key) for the clients, ``public`` for the server."""

    secret: bytes
    public: bytes


def generate_keys(params: HEParams) -> HEKeys:
    """A fresh key pair for ``params`` (SEAL's key generation draws from the OS's randomness)."""
    context = new_context(params)
    public = context.copy()
    public.make_context_public()
    return HEKeys(secret=_serialize(context, secret=True), public=_serialize(public, secret=False))


def new_context(params: HEParams) -> ts.Context:
    """A TenSEAL context with a fresh key pair; SEAL refuses parameters below 128-bit security itself."""
    if params.scheme == "bfv":
        context = ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=params.poly_modulus_degree,
                             plain_modulus=params.plain_modulus, coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
                             n_threads=1)
    else:
        context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=params.poly_modulus_degree,
                             coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes), n_threads=1)
        context.global_scale = 2.0 ** params.scale_bits
    return context


def _serialize(context: ts.Context, *, secret: bool) -> bytes:
    # Only additions run, so no relinearization or Galois keys travel.
    return context.serialize(save_public_key=True, save_secret_key=secret, save_galois_keys=False, save_relin_keys=False)


def load_context(blob: bytes) -> ts.Context:
    """A context from ``HEKeys.secret`` or ``HEKeys.public``; ``is_private()`` tells them apart."""
    return ts.context_from(blob, n_threads=1)
