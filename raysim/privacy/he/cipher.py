"""Packing a vector into TenSEAL ciphertexts, adding ciphertexts, and decrypting their sum.

A vector of m values becomes ⌈m / slots⌉ ciphertexts of ``slots`` values each (BFV batching or CKKS
slots), serialized, which is what travels. Ciphertext addition is coefficient-wise modular addition,
so a sum is the same bits whatever the order it was added in.
"""

from __future__ import annotations

import numpy as np
import tenseal as ts

from raysim.privacy.he.params import HEParams


def encrypt(context: ts.Context, values: np.ndarray, params: HEParams) -> tuple[bytes, ...]:
    """``values`` (int64 for BFV, |v| < t/2; float64 for CKKS) as serialized ciphertexts of ``params.slots`` slots."""
    make = ts.bfv_vector if params.scheme == "bfv" else ts.ckks_vector
    return tuple(make(context, values[start : start + params.slots].tolist()).serialize()
                 for start in range(0, values.size, params.slots))


def _load(context: ts.Context, blob: bytes, scheme: str):
    return ts.bfv_vector_from(context, blob) if scheme == "bfv" else ts.ckks_vector_from(context, blob)


class CiphertextSum:
    """The running sum of encrypted vectors, held by whoever adds them (the server, with the public context)."""

    def __init__(self, context: ts.Context, params: HEParams) -> None:
        self.context, self.params = context, params
        self.parts: list | None = None
        self.count = 0

    def add(self, blobs: tuple[bytes, ...]) -> None:
        vectors = [_load(self.context, blob, self.params.scheme) for blob in blobs]
        if self.parts is None:
            self.parts = vectors
        else:
            if len(vectors) != len(self.parts):
                raise ValueError(f"an encrypted update of {len(vectors)} ciphertexts joined a sum of {len(self.parts)}")
            for total, vector in zip(self.parts, vectors):
                total += vector
        self.count += 1

    def serialize(self) -> tuple[bytes, ...]:
        return tuple(part.serialize() for part in self.parts or ())


def decrypt(context: ts.Context, blobs: tuple[bytes, ...], params: HEParams, words: int) -> np.ndarray:
    """The plaintext of serialized ciphertexts, ``words`` values: int64 (BFV, centred mod t) or float64 (CKKS)."""
    if not context.is_private():
        raise PermissionError("decrypting needs the secret key, which this context does not hold")
    dtype = np.int64 if params.scheme == "bfv" else np.float64
    parts = [np.asarray(_load(context, blob, params.scheme).decrypt(), dtype=dtype) for blob in blobs]
    out = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    return out[:words]
