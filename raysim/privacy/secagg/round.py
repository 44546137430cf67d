"""One secure-aggregation round run entirely in this process: the reference driver.

``run_round`` steps a :class:`SecAggServer` and a :class:`ClientGroup` holding every client
through AdvertiseKeys, ShareKeys, MaskedInputCollection, the optional ConsistencyCheck and
Unmasking (Bonawitz et al. 2017, Fig. 4), applying the dropout model between deliveries. It is
what the tests check and what the engine does with Ray calls in place of direct ones. It counts
every message's bytes per client and times every phase for the clients and for the server.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np

from raysim.privacy.secagg.client import ClientGroup, PhaseOutput
from raysim.privacy.secagg.dropout import (
    ADVERTISE_KEYS,
    CONSISTENCY_CHECK,
    MASKED_INPUT,
    PHASES,
    SHARE_KEYS,
    UNMASKING,
    DropoutModel,
)
from raysim.privacy.secagg.errors import SecAggAborted
from raysim.privacy.secagg.messages import Message
from raysim.privacy.secagg.params import SecAggParams
from raysim.privacy.secagg.server import SecAggServer, TranscriptEntry

T = TypeVar("T")


@dataclass
class SecAggResult:
    """The outcome and the costs of one round. ``aggregate`` is None exactly when it aborted."""

    aggregate: np.ndarray | None
    survivors: tuple[int, ...]
    aborted: bool = False
    abort_reason: str | None = None
    dropouts: dict[str, tuple[int, ...]] = field(default_factory=dict)
    late: tuple[int, ...] = ()
    failures: dict[int, str] = field(default_factory=dict)
    bytes_sent: dict[int, int] = field(default_factory=dict)
    bytes_received: dict[int, int] = field(default_factory=dict)
    client_seconds: dict[str, dict[int, float]] = field(default_factory=dict)
    server_seconds: dict[str, float] = field(default_factory=dict)
    transcript: list[TranscriptEntry] | None = None

    @property
    def server_bytes_received(self) -> int:
        return sum(self.bytes_sent.values())

    @property
    def server_bytes_sent(self) -> int:
        return sum(self.bytes_received.values())

    def metrics(self) -> dict[str, float]:
        """Flat per-round metrics: bytes per client (mean, max), server totals, seconds and dropouts per phase."""
        out = outcome_metrics(self.aborted, self.survivors, self.bytes_sent, self.bytes_received)
        for phase in PHASES:
            seconds = list(self.client_seconds.get(phase, {}).values()) or [0.0]
            out[f"secagg_{phase}_client_seconds_mean"] = float(np.mean(seconds))
            out[f"secagg_{phase}_client_seconds_max"] = float(max(seconds))
            out[f"secagg_{phase}_server_seconds"] = self.server_seconds.get(phase, 0.0)
            out[f"secagg_{phase}_dropouts"] = float(len(self.dropouts.get(phase, ())))
        out["secagg_late_clients"] = float(len(self.late))
        return out


def outcome_metrics(aborted: bool, survivors: Collection[int], bytes_sent: Mapping[int, int],
                    bytes_received: Mapping[int, int]) -> dict[str, float]:
    """What every secure-sum backend reports with the same meaning: whether the round aborted, its survivors,
    the bytes each client sent and received (mean and max over the round's clients) and the server's totals."""
    out: dict[str, float] = {"secagg_aborted": float(aborted), "secagg_survivors": float(len(survivors))}
    for name, table in (("sent", bytes_sent), ("received", bytes_received)):
        values = list(table.values()) or [0]
        out[f"secagg_client_bytes_{name}_mean"] = float(np.mean(values))
        out[f"secagg_client_bytes_{name}_max"] = float(max(values))
    out["secagg_server_bytes_received"] = float(sum(bytes_sent.values()))
    out["secagg_server_bytes_sent"] = float(sum(bytes_received.values()))
    return out


class _Round:
    """Bookkeeping shared by the phases of one run: who is alive, bytes, seconds, dropouts."""

    def __init__(self, result: SecAggResult, dropout: DropoutModel, rng: np.random.Generator, alive: set[int]) -> None:
        self.result, self.dropout, self.rng, self.alive = result, dropout, rng, alive

    def drop(self, phase: str) -> None:
        """Clients that go silent in ``phase`` leave for good."""
        dropped = self.dropout.drops(phase, self.alive, self.rng)
        self.result.dropouts[phase] = tuple(sorted(dropped))
        self.alive -= dropped

    def deliver(self, phase: str, outbound: Mapping[int, Message]) -> dict[int, Message]:
        """Hand the server's messages to their clients, then drop this phase's dropouts."""
        for u, message in outbound.items():
            self.result.bytes_received[u] += message.nbytes()
        self.alive &= set(outbound)
        self.drop(phase)
        return {u: outbound[u] for u in sorted(self.alive)}

    def collect(self, phase: str, output: PhaseOutput) -> list[Message]:
        """Account for the clients' replies; a client that failed stops like a dropout."""
        self.result.client_seconds[phase] = output.seconds
        self.result.failures.update(output.failures)
        self.alive -= set(output.failures)
        for u, message in output.messages.items():
            self.result.bytes_sent[u] += message.nbytes()
        return [output.messages[u] for u in sorted(output.messages)]

    def serve(self, phase: str, step: Callable[[list[Message]], T], messages: list[Message]) -> T:
        """Run one server step and add its wall time to ``phase``."""
        start = time.perf_counter()
        try:
            return step(messages)
        finally:
            self.result.server_seconds[phase] = self.result.server_seconds.get(phase, 0.0) + time.perf_counter() - start


class Participants(Protocol):
    """The clients of a round, wherever they run: in this process (ClientGroup) or in worker actors."""

    def advertise_keys(self, client_ids: Collection[int]) -> PhaseOutput: ...
    def share_keys(self, inbound: Mapping[int, Message]) -> PhaseOutput: ...
    def masked_input(self, inbound: Mapping[int, Message]) -> PhaseOutput: ...
    def consistency_check(self, inbound: Mapping[int, Message]) -> PhaseOutput: ...
    def unmask(self, inbound: Mapping[int, Message]) -> PhaseOutput: ...


def run_round(
    inputs: Mapping[int, np.ndarray],
    params: SecAggParams,
    dropout: DropoutModel | None = None,
    seed: int = 0,
    *,
    round_index: int = 0,
    graph_seed: int | None = None,
    record_transcript: bool = False,
) -> SecAggResult:
    """Securely sum ``inputs`` (client id → ring vector of dtype ``params.dtype``, values < 2^b) in this process.

    ``seed`` drives the dropout draws and, unless ``graph_seed`` is given, the SecAgg+ graph;
    keys, self-mask seeds and Shamir coefficients always come from the OS CSPRNG. Returns
    Σ_{U3} x_u mod 2^b, or an aborted result with no aggregate when fewer than t clients remain
    after some phase (or a secret cannot be rebuilt).
    """
    params = params.validate()
    if len(inputs) != params.num_clients:
        raise ValueError(f"run_round got {len(inputs)} inputs for num_clients={params.num_clients}")
    session_id = secrets.token_bytes(16)
    group = ClientGroup(list(inputs), params, session_id, round_index, inputs)
    return drive_round(group, list(inputs), params, dropout, seed, session_id=session_id, round_index=round_index,
                       graph_seed=graph_seed, record_transcript=record_transcript)


def drive_round(
    participants: Participants,
    client_ids: Collection[int],
    params: SecAggParams,
    dropout: DropoutModel | None = None,
    seed: int = 0,
    *,
    session_id: bytes,
    round_index: int = 0,
    graph_seed: int | None = None,
    record_transcript: bool = False,
) -> SecAggResult:
    """Step a server and ``participants`` through every phase, applying the dropout model between deliveries."""
    dropout = dropout or DropoutModel()
    rng = np.random.default_rng(seed)
    if graph_seed is None:
        graph_seed = int(rng.integers(2**63))
    server = SecAggServer(
        params, session_id=session_id, round_index=round_index, graph_seed=graph_seed, record_transcript=record_transcript
    )
    ids = sorted(client_ids)
    result = SecAggResult(aggregate=None, survivors=(), bytes_sent=dict.fromkeys(ids, 0), bytes_received=dict.fromkeys(ids, 0))
    state = _Round(result, dropout, rng, set(ids))
    try:
        state.drop(ADVERTISE_KEYS)
        keys = state.collect(ADVERTISE_KEYS, participants.advertise_keys(state.alive))
        directories = state.deliver(SHARE_KEYS, state.serve(ADVERTISE_KEYS, server.advertise_keys, keys))
        shares = state.collect(SHARE_KEYS, participants.share_keys(directories))
        relayed = state.deliver(MASKED_INPUT, state.serve(SHARE_KEYS, server.share_keys, shares))
        masked = state.collect(MASKED_INPUT, participants.masked_input(relayed))
        result.late = tuple(sorted(dropout.late & {m.client_id for m in masked}))
        on_time = [m for m in masked if m.client_id not in dropout.late]
        requests = state.serve(MASKED_INPUT, server.masked_input, on_time)
        state.serve(MASKED_INPUT, server.late_masked_input, [m for m in masked if m.client_id in dropout.late])
        if params.consistency_check:
            to_sign = state.deliver(CONSISTENCY_CHECK, requests)
            signatures = state.collect(CONSISTENCY_CHECK, participants.consistency_check(to_sign))
            requests = state.serve(CONSISTENCY_CHECK, server.consistency_check, signatures)
        to_unmask = state.deliver(UNMASKING, requests)
        responses = state.collect(UNMASKING, participants.unmask(to_unmask))
        result.aggregate = state.serve(UNMASKING, server.unmask, responses)
    except SecAggAborted as exc:
        result.aborted, result.abort_reason = True, str(exc)
    result.survivors = tuple(sorted(server.u3))
    result.transcript = server.transcript
    return result
