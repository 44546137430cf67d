"""One round of homomorphic-encryption aggregation: upload, add, decrypt (no setup or recovery phase).

1. Upload (``masked_input``, the phase masking's dropouts name): each client encrypts its vector with the
   run's public key, in the worker that trained it, and sends the ciphertexts. A client that drops sends
   nothing; a late one is ignored. Nobody has to recover anything for it.
2. The server adds the ciphertexts as they arrive (``CiphertextSum``; ciphertext addition is exact, so
   the sum's bits do not depend on the order).
3. Decryption (``unmasking``): the server sends the sum and the list of its contributors to a decryptor,
   a surviving client drawn with the round's seed; if it drops, the next in that order takes over. The
   decryptor refuses a sum of fewer than t contributions (``threshold``): the analogue of masking's t, but
   enforced by a client that trusts the server's count, not by cryptography.

The server only ever holds the public context, ciphertexts and the decrypted sum, which is the release.
:func:`run_he_round` drives it in one process; the engine runs the same :func:`drive_he_round` over Ray.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import tenseal as ts

from raysim.privacy.he.cipher import CiphertextSum, decrypt, encrypt
from raysim.privacy.he.params import HEParams
from raysim.privacy.secagg.client import PhaseOutput
from raysim.privacy.secagg.dropout import MASKED_INPUT, UNMASKING, DropoutModel
from raysim.privacy.secagg.errors import SecAggAborted, SecAggError
from raysim.privacy.secagg.messages import ID_BYTES
from raysim.privacy.secagg.round import outcome_metrics

GAUSSIAN_SIGMA = 3.2  # SEAL's error distribution
HE_PHASES = (MASKED_INPUT, UNMASKING)


@dataclass(frozen=True)
class EncryptedUpdate:
    """u → server: u's vector, encrypted under the run's public key."""

    client_id: int
    ciphertexts: tuple[bytes, ...]

    def nbytes(self) -> int:
        return ID_BYTES + sum(len(c) for c in self.ciphertexts)


@dataclass(frozen=True)
class DecryptionRequest:
    """server → decryptor: the encrypted sum and who contributed to it."""

    ciphertexts: tuple[bytes, ...]
    contributors: tuple[int, ...]

    def nbytes(self) -> int:
        return sum(len(c) for c in self.ciphertexts) + ID_BYTES * len(self.contributors)


@dataclass(frozen=True)
class DecryptedSum:
    """decryptor → server: the sum in the clear (the release), as 8-byte words."""

    client_id: int
    values: np.ndarray

    def nbytes(self) -> int:
        return ID_BYTES + 8 * int(self.values.size)


class HEClientGroup:
    """The clients one process runs, holding the run's secret context: they encrypt, and one may decrypt."""

    def __init__(self, context: ts.Context, he: HEParams, threshold: int) -> None:
        if not context.is_private():
            raise ValueError("clients need the secret context (HEKeys.secret)")
        self.context, self.he, self.threshold = context, he, threshold
        self.inputs: dict[int, np.ndarray] = {}

    def add(self, client_id: int, values: np.ndarray) -> None:
        """Admit one client, whose vector is ``values`` (int64 words for BFV, floats for CKKS)."""
        self.inputs[client_id] = values

    def upload(self, client_ids: Collection[int]) -> list[PhaseOutput]:
        output = PhaseOutput()
        for u in sorted(client_ids):
            start = time.perf_counter()
            output.messages[u] = EncryptedUpdate(u, encrypt(self.context, self.inputs[u], self.he))
            output.seconds[u] = time.perf_counter() - start
        return [output]

    def decrypt(self, inbound: Mapping[int, DecryptionRequest]) -> PhaseOutput:
        output = PhaseOutput()
        words = len(next(iter(self.inputs.values()))) if self.inputs else 0
        for u, request in sorted(inbound.items()):
            start = time.perf_counter()
            if len(set(request.contributors)) < self.threshold:
                output.failures[u] = str(SecAggAborted(UNMASKING, f"decryptor {u} refuses a sum of "
                                                       f"{len(set(request.contributors))} < t={self.threshold} updates"))
            else:
                output.messages[u] = DecryptedSum(u, decrypt(self.context, request.ciphertexts, self.he, words))
            output.seconds[u] = time.perf_counter() - start
        return output

    def phase(self, name: str, inbound: Mapping[int, DecryptionRequest] | Collection[int]) -> list[PhaseOutput] | PhaseOutput:
        """``masked_input`` (encrypt and upload) or ``unmasking`` (decrypt): the entry point of a remote call."""
        if name == MASKED_INPUT:
            return self.upload(inbound)
        if name == UNMASKING:
            return self.decrypt(inbound)
        raise SecAggError(f"the he backend has no phase {name!r}")


class HEParticipants(Protocol):
    """The clients of an HE round, wherever they run; ``upload`` yields replies as they arrive."""

    def upload(self, client_ids: Collection[int]) -> Iterable[PhaseOutput]: ...
    def decrypt(self, inbound: Mapping[int, DecryptionRequest]) -> PhaseOutput: ...


@dataclass
class HEResult:
    """An HE round's outcome and costs; ``aggregate`` is None exactly when it aborted."""

    aggregate: np.ndarray | None
    survivors: tuple[int, ...]
    ciphertexts_per_client: int = 0
    aborted: bool = False
    abort_reason: str | None = None
    dropouts: dict[str, tuple[int, ...]] = field(default_factory=dict)
    late: tuple[int, ...] = ()
    decryptor: int | None = None
    bytes_sent: dict[int, int] = field(default_factory=dict)
    bytes_received: dict[int, int] = field(default_factory=dict)
    encrypt_seconds: dict[int, float] = field(default_factory=dict)
    add_seconds: float = 0.0
    decrypt_seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        """Per-round metrics; the ``secagg_*`` ones mean what they mean for masking."""
        out = outcome_metrics(self.aborted, self.survivors, self.bytes_sent, self.bytes_received)
        for phase in HE_PHASES:
            out[f"secagg_{phase}_dropouts"] = float(len(self.dropouts.get(phase, ())))
        out["secagg_late_clients"] = float(len(self.late))
        seconds = list(self.encrypt_seconds.values()) or [0.0]
        out["he_encrypt_client_seconds_mean"] = float(np.mean(seconds))
        out["he_encrypt_client_seconds_max"] = float(max(seconds))
        out["he_add_server_seconds"] = self.add_seconds
        out["he_decrypt_seconds"] = self.decrypt_seconds
        out["he_ciphertexts_per_client"] = float(self.ciphertexts_per_client)
        return out


def drive_he_round(
    participants: HEParticipants, client_ids: Collection[int], he: HEParams, public: ts.Context, threshold: int,
    dropout: DropoutModel | None = None, seed: int = 0,
) -> HEResult:
    """Upload, add and decrypt over ``participants``, applying the dropout model to both phases."""
    dropout = dropout or DropoutModel()
    if public.is_private():
        raise ValueError("the server must hold the public context only")
    rng = np.random.default_rng(seed)
    ids = sorted(client_ids)
    result = HEResult(None, (), bytes_sent=dict.fromkeys(ids, 0), bytes_received=dict.fromkeys(ids, 0))
    dropped = dropout.drops(MASKED_INPUT, ids, rng)
    result.dropouts[MASKED_INPUT] = tuple(sorted(dropped))
    uploading = [u for u in ids if u not in dropped]
    total, contributors, late = CiphertextSum(public, he), [], []
    for output in participants.upload(uploading):
        result.encrypt_seconds.update(output.seconds)
        start = time.perf_counter()
        for u in sorted(output.messages):
            message = output.messages[u]
            result.bytes_sent[u] += message.nbytes()
            result.ciphertexts_per_client = len(message.ciphertexts)
            if u in dropout.late:
                late.append(u)
                continue
            total.add(message.ciphertexts)
            contributors.append(u)
        result.add_seconds += time.perf_counter() - start
    result.late, survivors = tuple(sorted(late)), tuple(sorted(contributors))
    result.survivors = survivors
    if len(survivors) < threshold:
        return _abort(result, f"{len(survivors)} updates arrived, fewer than t={threshold}")
    gone = dropout.drops(UNMASKING, survivors, rng)
    result.dropouts[UNMASKING] = tuple(sorted(gone))
    request = DecryptionRequest(total.serialize(), survivors)
    for candidate in rng.permutation(np.asarray(survivors, dtype=np.int64)).tolist():
        if candidate in gone:
            continue
        result.bytes_received[candidate] += request.nbytes()
        reply = participants.decrypt({candidate: request})
        result.decrypt_seconds += reply.seconds.get(candidate, 0.0)
        if candidate in reply.messages:
            result.decryptor, result.aggregate = candidate, reply.messages[candidate].values
            result.bytes_sent[candidate] += reply.messages[candidate].nbytes()
            return result
        return _abort(result, reply.failures.get(candidate, f"decryptor {candidate} failed"))
    return _abort(result, "every surviving client dropped before decrypting")


def _abort(result: HEResult, reason: str) -> HEResult:
    result.aborted, result.abort_reason, result.aggregate = True, reason, None
    return result


def run_he_round(inputs: Mapping[int, np.ndarray], he: HEParams, secret: ts.Context, public: ts.Context,
                 threshold: int = 1, dropout: DropoutModel | None = None, seed: int = 0) -> HEResult:
    """Sum ``inputs`` (client id → int64 words or floats) under HE in this process: the reference driver."""
    group = HEClientGroup(secret, he, threshold)
    for u, values in inputs.items():
        group.add(u, values)
    return drive_he_round(group, list(inputs), he, public, threshold, dropout, seed)


def ckks_error_bound(he: HEParams, contributions: int) -> float:
    """A high-probability bound on each slot's error in a CKKS sum of ``contributions`` fresh encryptions.

    Cheon, Kim, Kim, Song (2017), Lemma 1: a fresh encryption's noise has canonical-embedding norm at most
    B = 8√2·σN + 6σ√N + 16σ√(hN), h ≤ N the secret's Hamming weight, and encoding rounds by at most N/2;
    the errors of a sum add, and decoding divides by the scale Δ = 2^s.
    """
    n, sigma = he.poly_modulus_degree, GAUSSIAN_SIGMA
    fresh = 8 * math.sqrt(2) * sigma * n + 6 * sigma * math.sqrt(n) + 16 * sigma * n + n / 2
    return contributions * fresh / 2.0 ** he.scale_bits
