"""Secure aggregation as actors see it: the server actor drives the protocol, worker actors run the clients.

Every client's secrets and private input stay in the worker that trained it. The server actor only
relays the protocol's messages (batched: one Ray call per worker per phase) and unmasks the sum; the
protocol logic itself is ``raysim.privacy.secagg.drive_round``, the same code the in-process tests run.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from raysim.privacy.secagg import PhaseOutput
from raysim.privacy.secagg.round import drive_round
from raysim.privacy.secagg.setup import SecureRound, decode_sum, dropout_model


class RemoteParticipants:
    """The round's clients, spread over worker actors; each phase is one call per worker."""

    def __init__(self, workers: Sequence[ray.actor.ActorHandle], owner: Mapping[int, int], session_id: bytes) -> None:
        self.workers, self.owner, self.session_id = workers, owner, session_id

    def _call(self, name: str, inbound: Mapping[int, Any] | Collection[int]) -> PhaseOutput:
        grouped: dict[int, Any] = defaultdict(dict if isinstance(inbound, Mapping) else list)
        for u in sorted(inbound):
            if isinstance(inbound, Mapping):
                grouped[self.owner[u]][u] = inbound[u]
            else:
                grouped[self.owner[u]].append(u)
        outputs = ray.get([self.workers[w].secure_phase.remote(name, part, self.session_id)
                           for w, part in sorted(grouped.items())])
        merged = PhaseOutput()
        for out in outputs:
            merged.messages.update(out.messages)
            merged.seconds.update(out.seconds)
            merged.failures.update(out.failures)
        return merged

    def advertise_keys(self, client_ids: Collection[int]) -> PhaseOutput:
        return self._call("advertise_keys", client_ids)

    def share_keys(self, inbound: Mapping[int, Any]) -> PhaseOutput:
        return self._call("share_keys", inbound)

    def masked_input(self, inbound: Mapping[int, Any]) -> PhaseOutput:
        return self._call("masked_input", inbound)

    def consistency_check(self, inbound: Mapping[int, Any]) -> PhaseOutput:
        return self._call("consistency_check", inbound)

    def unmask(self, inbound: Mapping[int, Any]) -> PhaseOutput:
        return self._call("unmask", inbound)

    def upload(self, client_ids: Collection[int]) -> Iterator[PhaseOutput]:
        """The he backend's upload: each worker's encrypted updates, yielded as its reply arrives."""
        grouped: dict[int, list[int]] = defaultdict(list)
        for u in sorted(client_ids):
            grouped[self.owner[u]].append(u)
        pending = [self.workers[w].secure_phase.remote("masked_input", ids, self.session_id)
                   for w, ids in sorted(grouped.items())]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield from ray.get(done[0])

    def decrypt(self, inbound: Mapping[int, Any]) -> PhaseOutput:
        return self._call("unmasking", inbound)


@dataclass
class SecureSum:
    """A secure round's released sums (None when it aborted), the survivors, and its metrics."""

    weighted_sum: np.ndarray | None
    weight: float | None  # None under DP, whose ring vectors carry no weight word (the denominator is fixed)
    control_sum: np.ndarray | None
    survivors: tuple[int, ...]
    metrics: dict[str, float]
    encoded_sum: np.ndarray | None = None  # he: the decrypted sum before decoding (for he_decoding_error)


def secure_sum(
    workers: Sequence[ray.actor.ActorHandle], owner: Mapping[int, int], secure: SecureRound,
    dim: int, seed: int, round_index: int, he_public: Any = None,
) -> SecureSum:
    """Run the protocol over the clients in ``owner`` and decode Σ w·Δ, Σ w (and Σ Δc).

    The server actor that calls this receives the protocol's messages and the unmasked sum, nothing
    else: no plaintext update or partial sum, not even for a metric (see ``quantization_error``).
    With ``backend: he`` the protocol is upload, add, decrypt, and ``he_public`` is the server's public context.
    """
    draws = np.random.default_rng([seed, round_index, 11]).integers(2**63, size=2)
    if secure.he is not None:
        return _he_sum(workers, owner, secure, dim, int(draws[0]), he_public)
    result = drive_round(
        RemoteParticipants(workers, owner, secure.session_id), list(owner), secure.params, dropout_model(secure.config),
        int(draws[0]), session_id=secure.session_id, round_index=round_index, graph_seed=int(draws[1]),
    )
    ray.get([worker.end_secure_round.remote(secure.session_id) for worker in workers])
    metrics = result.metrics()
    if result.aggregate is None:
        return SecureSum(None, 0.0, None, (), metrics)
    weighted, weight, control = decode_sum(result.aggregate, len(result.survivors), dim, secure.weight_bound,
                                           secure.config, secure.params)
    return SecureSum(weighted, weight, control, result.survivors, metrics)


def _he_sum(workers: Sequence[ray.actor.ActorHandle], owner: Mapping[int, int], secure: SecureRound, dim: int,
            seed: int, public: Any) -> SecureSum:
    """The he backend's round (``raysim.privacy.he.protocol``) and the decoding of its decrypted sum."""
    from raysim.privacy.he.encoding import decode_floats, ring_of_sum
    from raysim.privacy.he.protocol import drive_he_round

    participants = RemoteParticipants(workers, owner, secure.session_id)
    result = drive_he_round(participants, list(owner), secure.he, public, secure.params.threshold,
                            dropout_model(secure.config), seed)
    ray.get([worker.end_secure_round.remote(secure.session_id) for worker in workers])
    metrics = result.metrics()
    if result.aggregate is None:
        return SecureSum(None, 0.0, None, (), metrics)
    if secure.he.scheme == "ckks":
        weighted, weight, control = decode_floats(result.aggregate, dim, secure.weight_bound, secure.config)
    else:
        weighted, weight, control = decode_sum(ring_of_sum(result.aggregate, secure.params), len(result.survivors),
                                               dim, secure.weight_bound, secure.config, secure.params)
    return SecureSum(weighted, weight, control, result.survivors, metrics, encoded_sum=result.aggregate)


@dataclass(frozen=True)
class SecureRelease:
    """What a secure round released (Σ w·Δ over the survivors) and which worker trained each survivor:
    all that ``quantization_error`` needs, and nothing the server actor did not already hold."""

    weighted_sum: np.ndarray
    survivors_by_worker: dict[int, list[int]]
    encoded_sum: np.ndarray | None = None  # he: the decrypted sum before decoding


def release_of(result: SecureSum, owner: Mapping[int, int]) -> SecureRelease | None:
    """The diagnostic view of a finished secure round; None when it aborted."""
    if result.weighted_sum is None:
        return None
    by_worker: dict[int, list[int]] = defaultdict(list)
    for u in result.survivors:
        by_worker[owner[u]].append(u)
    return SecureRelease(result.weighted_sum, dict(by_worker), result.encoded_sum)


def decoding_error(workers: Sequence[ray.actor.ActorHandle], release: SecureRelease) -> float | None:
    """he_decoding_error: max |decrypted − Σ encoded| over the words, in the encoded units (0 for BFV, whose
    sum is exact; CKKS's approximation error), computed by the driver like ``quantization_error``, from the
    workers' encoded inputs, which the server actor never sees. Ask before ``quantization_error``."""
    parts = ray.get([workers[w].secure_encoded_sum.remote(ids) for w, ids in sorted(release.survivors_by_worker.items())])
    if release.encoded_sum is None or not parts or any(part is None for part in parts):
        return None
    exact = sum(parts[1:], parts[0])
    if exact.dtype == object:  # BFV: exact integers against the decrypted ones
        return float(max(abs(int(a) - int(b)) for a, b in zip(release.encoded_sum.tolist(), exact.tolist())))
    return float(np.max(np.abs(release.encoded_sum - exact)))


def quantization_error(workers: Sequence[ray.actor.ActorHandle], release: SecureRelease) -> float | None:
    """‖secure − plain‖/‖plain‖ for one round, computed by the driver (``secure_aggregation.diagnostics``).

    The workers send their plaintext partial sums Σ w·Δ to the caller, the driver process, which the
    protocol does not cover: the server actor never sees them. None when a worker lost its clients'
    plain updates (it was restarted) after the round.
    """
    dim = release.weighted_sum.size
    parts = ray.get([workers[w].secure_plain_sum.remote(ids, dim) for w, ids in sorted(release.survivors_by_worker.items())])
    if any(part is None for part in parts):
        return None
    plain = np.sum(parts, axis=0, dtype=np.float64) if parts else np.zeros(dim)
    norm = float(np.linalg.norm(plain))
    return float(np.linalg.norm(release.weighted_sum - plain) / norm) if norm > 0 else 0.0
