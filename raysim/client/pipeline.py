"""The client update pipeline: the ordered stages a client's update passes through, and their server halves.

A client's update is built by ``LocalTraining`` and then passed, in the order of ``STAGES``, through
small stages, each one idea: the injected fault or the attack, the finite check, the norm bound, DP
clipping, compression with error feedback, and the encoding (fold into the chunk's partial sum, keep a
row, or encode for secure aggregation). A stage may drop the update (it then reaches no later stage).
A stage that has a server half declares it beside its client half (``Stage.server``); the server runs
the halves backwards, from the encoding's (the plain sum, the robust rule or the secure sum) back to
DP's noise, the way pfl-research's postprocessors run ``postprocess_one_user`` forwards on the client
and ``postprocess_server`` backwards on the server. The strategy's server update comes last.

Nothing here imports Ray: the worker actor (``raysim.engine.worker``) holds the model and the data,
builds the pipeline once (``raysim.client.build``), and runs it over each chunk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from raysim.client.messages import ChunkResult, ClientBatch, RoundPlan

if TYPE_CHECKING:
    import torch


@dataclass
class ClientUpdate:
    """One client's update as it moves through the stages."""

    position: int  # the client's index in its batch
    client_id: int
    x: np.ndarray  # its training samples (poisoned for a malicious client)
    y: np.ndarray
    fault: str | None = None  # the injected fault drawn for it this round
    attacker: bool = False
    delta: torch.Tensor | None = None  # local model − global model, as the stages change it
    weight: float = 0.0
    loss: float = 0.0
    steps: int = 0
    state_delta: np.ndarray | None = None  # the strategy's per-client state change (SCAFFOLD's Δc_i)
    bytes_up: int | None = None  # the encoded update's size (a dense float32 vector unless compressed)
    start: torch.Tensor | None = None  # where training starts when not the global model (FedPer's own head)


@dataclass
class Chunk:
    """One call's clients: the round's inputs, the per-client state rows, and the tallies being built."""

    index: int
    round_index: int
    plan: RoundPlan
    batch: ClientBatch
    global_t: torch.Tensor
    control: torch.Tensor | None  # the strategy's server state (SCAFFOLD's c)
    dim: int
    start: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        import torch  # a worker's; the server process builds no chunk and imports no torch

        n, device = len(self.batch.client_ids), self.global_t.device
        self.delta_sum = torch.zeros(self.dim, dtype=torch.float64, device=device)
        self.weights, self.losses, self.steps = np.zeros(n), np.zeros(n), np.zeros(n, dtype=np.int64)
        self.bytes_up = np.zeros(n, dtype=np.int64)
        self.open(self.batch.states, self.batch.residuals, self.batch.personal)
        self.rows = np.zeros((n, self.dim), dtype=np.float32) if self.plan.per_client else None
        self.dp_states = None if self.batch.dp_states is None else list(self.batch.dp_states)
        self.epsilons = None if self.batch.dp_states is None else np.zeros(n)
        self.rejected: list[int] = []
        self.failed: list[int] = []
        self.error: str | None = None
        self.unclipped = self.tokens = self.bounded = self.malicious = 0
        self.sealed_states: np.ndarray | None = None
        self.state_sum: np.ndarray | None = None  # Σ Δc_i over the chunk when its c_i go back sealed outside a secure sum

    def open(self, states: np.ndarray | None, residuals: np.ndarray | None, personal: np.ndarray | None) -> None:
        """Hand the chunk its clients' own state rows (SCAFFOLD's c_i), residuals and personal rows, in the clear."""
        self.states = states  # the clients' own state rows
        self.state_deltas = None if states is None else np.zeros_like(states, dtype=np.float32)
        self.residuals = None if residuals is None else np.array(residuals, dtype=np.float32)
        self.personal = None if personal is None else np.array(personal, dtype=np.float32)
        self.personal_done = None if personal is None else np.zeros(len(self.batch.client_ids), dtype=bool)

    def keep(self, update: ClientUpdate) -> None:
        """Record a client whose update reached the encoding: its weight, loss, steps, bytes and state."""
        k = update.position
        self.weights[k], self.losses[k], self.steps[k] = update.weight, update.loss, update.steps
        self.bytes_up[k] = update.bytes_up
        if self.state_deltas is not None:
            self.state_deltas[k] = update.state_delta

    def result(self, rss_mb: float, seconds: float | None = None) -> ChunkResult:
        """The chunk's result; ``seconds`` its share of a call that trained it with others (else its own time)."""
        return ChunkResult(
            index=self.index, delta_sum=self.delta_sum.cpu().numpy(), weight_sum=float(self.weights.sum()),
            client_ids=self.batch.client_ids, weights=self.weights, losses=self.losses, steps=self.steps,
            rejected=self.rejected, seconds=time.perf_counter() - self.start if seconds is None else seconds, state_deltas=self.state_deltas,
            unclipped=self.unclipped, dp_states=self.dp_states, epsilons=self.epsilons, tokens=self.tokens,
            rss_mb=rss_mb, failed=self.failed, error=self.error, bounded=self.bounded, malicious=self.malicious,
            bytes_up=self.bytes_up, rows=self.rows, residuals=self.residuals, sealed_states=self.sealed_states,
            state_sum=self.state_sum, personal=self.personal, personal_done=self.personal_done,
        )


@dataclass
class Released:
    """What the server holds of a round's updates while the server halves turn it into the step's aggregate."""

    total: np.ndarray | None  # Σ w·Δ in float64 (None: nothing was released)
    weight: float | None  # Σ w (None under DP's fixed denominator)
    included: np.ndarray  # per client of the round, in reduction order: reached the aggregate
    control_sum: np.ndarray | None = None  # Σ Δc_i
    control_rows: np.ndarray | None = None  # the included clients' Δc_i, or their new c_i sealed
    sealed: bool = False  # control_rows are sealed
    mean: np.ndarray | None = None  # the step's mean delta when a half fixes it (robust rule, DP); else total / weight
    mean_weight: float | None = None  # the weight the strategy is told for ``mean`` (DP: the expected weight)
    keep_model: bool = False  # a half decided that this round does not step the model
    metrics: dict[str, Any] = field(default_factory=dict)


class Stage:
    """One step of a client's update. Every method is optional; the defaults do nothing."""

    def begin(self, chunk: Chunk) -> None:
        """Before the chunk's first client (e.g. open the clients' sealed state rows)."""

    def before_training(self, update: ClientUpdate, chunk: Chunk) -> None:
        """Before local training (e.g. a malicious client poisons its data)."""

    def client(self, update: ClientUpdate, chunk: Chunk) -> bool:
        """The client half: change ``update`` in place; False drops it."""
        return True

    def finish(self, chunk: Chunk) -> None:
        """After the chunk's last client (e.g. seal the clients' state rows again)."""

    def server(self, released: Released, context: Any) -> Released:
        """The server half, run backwards over the stages once the updates are reduced."""
        return released


class Pipeline:
    """The stages in order: ``run`` takes a chunk through their client halves, ``server`` through their
    server halves backwards."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = list(stages)

    def run(self, chunk: Chunk, load: Any) -> Chunk:
        """Each client of ``chunk`` in turn; ``load(client_id)`` gives its (x, y) as numpy arrays."""
        for stage in self.stages:
            stage.begin(chunk)
        for k, cid in enumerate(chunk.batch.client_ids.tolist()):
            x, y = load(cid)
            update = ClientUpdate(position=k, client_id=cid, x=x, y=y)
            for stage in self.stages:
                stage.before_training(update, chunk)
            if update.x.shape[0] == 0:
                continue  # a client without training samples sends nothing
            for stage in self.stages:
                if not stage.client(update, chunk):
                    break
        for stage in self.stages:
            stage.finish(chunk)
        return chunk

    def run_together(self, chunks: Sequence[Chunk], load: Any) -> Sequence[Chunk]:
        """``run`` over several chunks whose clients train together: the training stage (the first,
        ``VectorizedTraining``) takes every client of every chunk at once, then each client that it
        keeps goes through the later stages, chunk by chunk in client order, as ``run`` takes it."""
        train, later = self.stages[0], self.stages[1:]
        for chunk in chunks:
            for stage in self.stages:
                stage.begin(chunk)
        items = []
        for chunk in chunks:
            for k, cid in enumerate(chunk.batch.client_ids.tolist()):
                x, y = load(cid)
                update = ClientUpdate(position=k, client_id=cid, x=x, y=y)
                for stage in self.stages:
                    stage.before_training(update, chunk)
                if update.x.shape[0]:
                    items.append((update, chunk))  # a client without training samples sends nothing
        for (update, chunk), trained in zip(items, train.clients(items)):
            if trained:
                for stage in later:
                    if not stage.client(update, chunk):
                        break
        for chunk in chunks:
            for stage in self.stages:
                stage.finish(chunk)
        return chunks

    def server(self, released: Released, context: Any) -> Released:
        for stage in reversed(self.stages):
            released = stage.server(released, context)
        return released

    def find(self, kind: type) -> Stage | None:
        """The stage of type ``kind``, if the pipeline has one."""
        return next((stage for stage in self.stages if isinstance(stage, kind)), None)
