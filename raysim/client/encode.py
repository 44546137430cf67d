"""The last stage: how a client's update leaves it, and the server half that turns the updates into one sum.

Three encodings, chosen by the round's plan:
  * fold (the default): the worker adds w_k·Δ_k into the chunk's float64 partial sum, in client-id
    order, so the server receives one vector per chunk; its server half is the plain sum.
  * row (``plan.per_client``, for a robust rule): each client's Δ_k is kept as a row; the server half is
    the robust rule (``raysim.strategies.robust``: Krum, trimmed mean, median, ...).
  * secure (``plan.secure``): each client's update is quantized into its private ring vector and joins
    this worker's ``ClientGroup`` for the masking protocol (Bonawitz et al. 2017; ``raysim.privacy.secagg``),
    or, with ``backend: he``, its ``HEClientGroup``, which encrypts the same words (BFV) or the clipped floats
    (CKKS) under the run's public key (``raysim.privacy.he``); the server half reads the secure sum's release.
    Under secure aggregation the clients' state rows
    (SCAFFOLD's c_i, error-feedback residuals) are kept by the server sealed (``sealed_state``): they are
    opened here before the clients train, and sealed again after.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raysim.client.pipeline import Chunk, ClientUpdate, Released, Stage
from raysim.client.rng import client_rng
from raysim.compression import dense_bytes, shared_mask_indices
from raysim.config import Scenario
from raysim.privacy.secagg import ClientGroup, PhaseOutput
from raysim.privacy.secagg.sealed_state import RowSealer
from raysim.privacy.secagg.setup import encode_update
from raysim.strategies.robust import robust_aggregate

PERSONAL_STREAM = 1  # personal rows are sealed in their own keystreams (``RowSealer.for_stream``)


class Encoding(Stage):
    def __init__(self, scenario: Scenario, sealer: RowSealer | None = None, he_secret: bytes | None = None) -> None:
        self.scenario, self.sealer = scenario, sealer
        self.personal_sealer = None if sealer is None else sealer.for_stream(PERSONAL_STREAM)
        self.he_context = None
        if he_secret is not None:  # backend: he; TenSEAL loads only in runs that use it
            from raysim.privacy.he.keys import load_context
            self.he_context = load_context(he_secret)
        self.groups: dict[bytes, Any] = {}  # this worker's clients of each open secure session
        self.plain: dict[int, tuple[np.ndarray, float, np.ndarray]] = {}  # diagnostics only: Δ, w, the encoded vector

    def begin(self, chunk: Chunk) -> None:
        batch = chunk.batch
        if batch.states is None and batch.residuals is None and batch.personal is None:
            return
        if self.sealer is None:
            if chunk.plan.secure is not None:
                raise RuntimeError("a secure round with per-client state needs the clients' storage key (client_key)")
            return  # the server keeps these rows in the clear (``Scenario.seals_client_state``)
        ids = batch.client_ids
        opened = [None if rows is None else sealer.open(ids, rows) for rows, sealer in
                  ((batch.states, self.sealer), (batch.residuals, self.sealer),
                   (batch.personal, self.personal_sealer))]
        chunk.open(*opened)

    def client(self, update: ClientUpdate, chunk: Chunk) -> bool:
        if update.bytes_up is None:
            update.bytes_up = dense_bytes(chunk.dim)
        chunk.keep(update)
        if chunk.plan.secure is not None:
            self._join_secure_round(update, chunk)
        elif chunk.rows is not None:
            chunk.rows[update.position] = update.delta.cpu().numpy()
        else:
            chunk.delta_sum.add_(update.delta.to(chunk.delta_sum.dtype), alpha=float(update.weight))
        return True

    def finish(self, chunk: Chunk) -> None:
        """Where the server keeps client state sealed the new c_i = c_i + Δc_i and the residuals go back sealed;
        Δc_i only reaches the server inside the secure sum, or (DP without secure aggregation) summed over
        the chunk for DP's noise."""
        if self.sealer is None:
            return
        ids, round_index = chunk.batch.client_ids, chunk.round_index
        if chunk.state_deltas is not None:
            if chunk.plan.secure is None:
                chunk.state_sum = np.sum(chunk.state_deltas, axis=0, dtype=np.float64)
            chunk.sealed_states = self.sealer.seal(ids, round_index, chunk.states + chunk.state_deltas)
            chunk.state_deltas = None
        if chunk.residuals is not None:
            chunk.residuals = self.sealer.seal(ids, round_index, chunk.residuals)
        if chunk.personal is not None:
            chunk.personal = self.personal_sealer.seal(ids, round_index, chunk.personal)

    def _join_secure_round(self, update: ClientUpdate, chunk: Chunk) -> None:
        plan, cid = chunk.plan, update.client_id
        secure = plan.secure
        round_index = chunk.round_index if secure.round_index is None else secure.round_index
        if secure.session_id not in self.groups:  # a worker may hold clients of several open FedBuff buffers
            self.groups[secure.session_id] = self._group(secure, round_index)
            self.plain = {}
        delta = update.delta.cpu().numpy() * np.float32(plan.update_scale)
        if plan.mask_seed is not None:  # the shared random mask: only its k coordinates enter the protocol
            delta = delta[shared_mask_indices(delta.size, self.scenario.compression.fraction, plan.mask_seed)]
        if secure.he is None:
            encode = encode_update
        else:  # TenSEAL loads only in runs that use it
            from raysim.privacy.he.encoding import he_input as encode
        vector = encode(delta, update.weight, secure.weight_bound, update.state_delta, secure.config, secure.params,
                        client_rng(self.scenario.seed, round_index, cid, stream=9), dp_clip_norm=plan.clip_norm,
                        noise_variance=plan.noise_variance, noise_kind=plan.noise_kind)
        self.groups[secure.session_id].add(cid, vector)
        if secure.config.diagnostics:  # kept for the driver's quantization-error metric only
            self.plain[cid] = (delta, update.weight, vector)

    def _group(self, secure: Any, round_index: int) -> Any:
        """The worker's group of clients for a new session: masking's ``ClientGroup`` or an ``HEClientGroup``."""
        if secure.he is None:
            return ClientGroup([], secure.params, secure.session_id, round_index)
        if self.he_context is None:
            raise RuntimeError("an he session needs the run's secret context (WorkerSetup.sealed_he_key)")
        from raysim.privacy.he.protocol import HEClientGroup
        return HEClientGroup(self.he_context, secure.he, secure.params.threshold)

    def secure_phase(self, name: str, inbound: object, session_id: bytes) -> PhaseOutput | list[PhaseOutput]:
        """One secure-aggregation phase for this worker's clients of session ``session_id``."""
        assert session_id in self.groups, "secure_phase before any client joined the session"
        return self.groups[session_id].phase(name, inbound)

    def end_secure_round(self, session_id: bytes) -> None:
        """Forget the clients' protocol state once their session is over (their secrets die with it)."""
        self.groups.pop(session_id, None)

    def plain_sum(self, client_ids: list[int], dim: int) -> np.ndarray | None:
        """Σ w·Δ in float64 over ``client_ids`` held here (diagnostics only; see ``ClientWorker``)."""
        if not set(client_ids) <= self.plain.keys():
            return None
        total = np.zeros(dim, dtype=np.float64)
        for cid in sorted(client_ids):
            delta, weight, _ = self.plain[cid]
            total += weight * delta.astype(np.float64)
        self.plain = {}
        return total

    def encoded_sum(self, client_ids: list[int]) -> np.ndarray | None:
        """The exact sum of what ``client_ids`` encoded (ring words as Python integers, CKKS's floats in float64),
        for the driver's he_decoding_error (asked before ``plain_sum``, which forgets them)."""
        if not set(client_ids) <= self.plain.keys():
            return None
        parts = [self.plain[cid][2] for cid in sorted(client_ids)]
        if not parts:
            return None
        floats = np.issubdtype(parts[0].dtype, np.floating)
        return np.sum(parts, axis=0, dtype=np.float64) if floats else np.sum([p.astype(object) for p in parts], axis=0)

    def open_personal(self, client_ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Clients' personal rows as the store holds them, in the clear (opened when sealed)."""
        if not self.scenario.seals_client_state:
            return rows
        return self.personal_sealer.open(client_ids, rows)

    def server(self, released: Released, context: Any) -> Released:
        """The round's sum: the secure sum's release, the robust rule over the rows, or the plain sum."""
        reduction = context.reduction
        if context.secure_sum is not None:
            result = context.secure_sum
            released.metrics.update(result.metrics)
            released.total, released.weight, released.control_sum = result.weighted_sum, result.weight, result.control_sum
            released.included = np.isin(reduction.client_ids, np.asarray(result.survivors, dtype=np.int64))
            if reduction.sealed_states is not None:
                released.control_rows, released.sealed = reduction.sealed_states[released.included], True
            return released
        released.total, released.weight, released.included = reduction.total, reduction.weight, reduction.kept_mask
        if reduction.state_deltas is not None:
            rows = reduction.state_deltas[released.included]
            released.control_rows, released.control_sum = rows, np.sum(rows, axis=0, dtype=np.float64)
        elif reduction.sealed_states is not None:  # DP's sealed c_i: only the chunks' sums of Δc_i arrive
            released.control_rows, released.sealed = reduction.sealed_states[released.included], True
            released.control_sum = reduction.state_sum
        if context.plan.per_client and reduction.kept:
            self._robust(released, reduction)
        return released

    def _robust(self, released: Released, reduction: Any) -> None:
        aggregation, kept = self.scenario.aggregation, reduction.kept_mask
        robust, details = robust_aggregate(
            reduction.rows[kept], reduction.weights[kept], aggregation.rule, trim_fraction=aggregation.trim_fraction,
            byzantine=aggregation.byzantine, multikrum=aggregation.multikrum or max(reduction.kept - aggregation.byzantine, 1))
        released.metrics.update({k: v for k, v in details.items() if not isinstance(v, list)})
        released.mean, released.mean_weight = robust.astype(np.float32), released.weight
