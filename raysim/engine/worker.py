"""The worker actor: one execution slot that keeps a model resident and trains batches of clients.

A worker is created once per run with the training arrays (zero-copy views of the object store) and
the partition's CSR layout. Each call carries the round's global vector and a chunk of client ids; the
worker trains those clients one after another and folds their weighted deltas into one partial sum,
in client-id order, so the server receives one vector per chunk rather than one per client.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from raysim.adversary.clients import MaliciousClients
from raysim.client.hooks import ClientHooks, scaffold_control_delta
from raysim.client.samples import split_holdout
from raysim.client.train import client_rng, evaluate, make_optimizer, train_client
from raysim.compression import CompressionSpec, compress_with_feedback, dense_bytes, shared_mask_indices
from raysim.config import Scenario
from raysim.engine.faults import InjectedClientError, WorkerChaos, client_fault, corrupt_update
from raysim.errors import ScenarioError
from raysim.models.flat import FlatParams
from raysim.models.task import task_for
from raysim.privacy.dp.clipping import clip_to_norm
from raysim.privacy.secagg import ClientGroup, PhaseOutput
from raysim.privacy.secagg.sealed_state import RowSealer
from raysim.privacy.secagg.setup import SecureRound, encode_update
from raysim.models.zoo import build_model


@dataclass(frozen=True)
class ClientBatch:
    """One call's worth of clients: their ids (sorted), local epochs, and per-client state rows."""

    client_ids: np.ndarray
    epochs: np.ndarray
    states: np.ndarray | None = None  # SCAFFOLD's c_i, one row per client
    residuals: np.ndarray | None = None  # error feedback: each client's residual, one row per client
    dp_states: list | None = None  # local DP-SGD: each client's accountant state (None before its first round)


@dataclass(frozen=True)
class RoundPlan:
    """Round-wide instructions to every client besides the model: secure aggregation, and DP clipping."""

    secure: SecureRound | None = None
    clip_norm: float | None = None  # central/distributed DP: clip each delta to this L2 norm
    weight_cap: float | None = None  # DP-FedAvg user weight w = min(n / cap, 1); None weighs users equally
    noise_variance: float = 0.0  # distributed DP: each client's discrete noise variance, in ring units
    noise_kind: str = "discrete_gaussian"
    per_client: bool = False  # robust aggregation: return each client's update instead of folding them
    mask_seed: int | None = None  # compression.kind random_mask: the round's shared mask, public to all

    def weight(self, num_samples: int, client_weighting: str) -> float:
        if self.clip_norm is not None:
            return min(num_samples / self.weight_cap, 1.0) if self.weight_cap else 1.0
        return 1.0 if client_weighting == "uniform" else float(num_samples)


@dataclass
class ChunkResult:
    """The folded updates of one chunk of clients."""

    index: int
    delta_sum: np.ndarray  # float64: Σ w_k Δ_k over the chunk's kept clients, summed in client-id order
    weight_sum: float
    client_ids: np.ndarray
    weights: np.ndarray  # per client; 0 for a rejected or empty client
    losses: np.ndarray
    steps: np.ndarray
    rejected: list[int] = field(default_factory=list)
    seconds: float = 0.0
    state_deltas: np.ndarray | None = None  # SCAFFOLD's Δc_i per client (zero rows where weight is 0)
    unclipped: int = 0  # DP clipping: clients whose delta was already within the clip norm
    dp_states: list | None = None  # local DP-SGD: updated accountant states
    epsilons: np.ndarray | None = None  # local DP-SGD: each client's ε after this round
    tokens: int = 0  # text tasks: non-padding tokens trained on (samples × epochs)
    rss_mb: float = 0.0  # the worker process's peak resident memory so far
    failed: list[int] = field(default_factory=list)  # clients whose training raised
    error: str | None = None  # the first such exception, as one line
    bounded: int = 0  # updates clipped or rejected by aggregation.norm_bound
    malicious: int = 0  # malicious clients among the chunk's
    bytes_up: np.ndarray | None = None  # per client: the encoded update's bytes (0 where not sent)
    rows: np.ndarray | None = None  # plan.per_client: each client's update (zero rows where weight is 0)
    residuals: np.ndarray | None = None  # error feedback: each client's new residual (sealed under secure aggregation)
    sealed_states: np.ndarray | None = None  # SCAFFOLD under secure aggregation: each client's new c_i, sealed


def throughput_metrics(chunks: list[ChunkResult], num_parameters: int) -> dict[str, float]:
    """Text tasks' round metrics: tokens, tokens per second per worker (tokens over the chunks' summed
    training seconds), the exchanged vector's size and bytes per client (float32), and the largest
    worker's peak memory."""
    tokens = sum(c.tokens for c in chunks)
    if not tokens:
        return {}
    seconds = sum(c.seconds for c in chunks)
    return {"tokens": tokens, "tokens_per_second_per_worker": tokens / seconds if seconds > 0 else 0.0,
            "trainable_parameters": num_parameters, "adapter_bytes": 4 * num_parameters,
            "worker_rss_mb": max(c.rss_mb for c in chunks)}


@dataclass
class EvalResult:
    index: int
    loss_sum: float
    correct: int
    samples: int


def pick_device(num_gpus: float) -> torch.device:
    """``cuda`` when this worker was given a GPU (or a fraction of one), else the CPU.

    The CUDA allocator is capped to the worker's fraction so four 0.25-GPU workers share one card.
    """
    if num_gpus > 0 and torch.cuda.is_available():
        device = torch.device("cuda", 0)
        if num_gpus < 1:
            torch.cuda.set_per_process_memory_fraction(num_gpus, device)
        return device
    return torch.device("cpu")


class ClientWorker:
    """The body of the worker actor; plain Python, so it is also usable without Ray."""

    def __init__(
        self,
        scenario: Scenario,
        x_train: np.ndarray,
        y_train: np.ndarray,
        part_indices: np.ndarray,
        part_offsets: np.ndarray,
        feature_shape: tuple[int, ...],
        num_classes: int,
        position: int = 0,
        client_key: bytes | None = None,
    ) -> None:
        self.scenario = scenario
        self.sealer = None if client_key is None else RowSealer(client_key)  # secure rounds' client state
        self.chaos = WorkerChaos(scenario.faults, position)
        self.adversary = None if scenario.adversary is None else MaliciousClients(
            scenario.adversary, scenario.seed, scenario.num_clients, num_classes)
        compression = scenario.compression
        self.compression = None if compression is None or compression.kind == "none" else CompressionSpec(
            kind=compression.kind, fraction=compression.fraction, bits=compression.bits, stochastic=compression.stochastic,
            unbiased=not compression.error_feedback)  # d/k scaling would make error feedback diverge
        torch.set_num_threads(max(1, int(scenario.executor.num_cpus)))
        self.device = pick_device(scenario.executor.num_gpus)
        self.task = task_for(scenario.model)
        self.model = build_model(scenario.model, feature_shape, num_classes, device=self.device).to(self.device)
        self.flat = FlatParams(self.model)
        self.optimizer = make_optimizer(scenario.training, self.flat.params)
        self.x, self.y = x_train, y_train
        self.indices, self.offsets = part_indices, part_offsets
        self.holdout = scenario.evaluation.holdout_fraction if scenario.evaluation.federated else 0.0
        self.secure_group: ClientGroup | None = None
        self.plain: dict[int, tuple[np.ndarray, float]] = {}

    def _client_arrays(self, client_id: int, held_out: bool, poison_round: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The client's training (or held-out) samples; a malicious client's poisoned in ``poison_round``."""
        own = self.indices[self.offsets[client_id] : self.offsets[client_id + 1]]
        train, holdout = split_holdout(own, self.holdout, self.scenario.seed, client_id)
        chosen = holdout if held_out else train
        x, y = self.x[chosen], self.y[chosen]
        if poison_round is not None:
            x, y = self.adversary.poison_data(x, y, poison_round, client_id)
        return torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)

    def train(
        self, global_vec: np.ndarray, server_state: np.ndarray | None, round_index: int,
        plan: RoundPlan, index: int, batch: ClientBatch,
    ) -> ChunkResult:
        """Train each client of the batch from ``global_vec``; return the chunk's folded update.

        Under secure aggregation nothing is folded: each client's update is encoded into its private
        ring vector and joins this worker's ClientGroup for the protocol's phases.
        """
        self.chaos.before_call()
        return self._train(global_vec, server_state, round_index, plan, index, batch)

    def _train(
        self, global_vec: np.ndarray, server_state: np.ndarray | None, round_index: int,
        plan: RoundPlan, index: int, batch: ClientBatch,
    ) -> ChunkResult:
        """``train`` without the injected worker faults; each client in turn:

        train (a malicious client on poisoned data) → the injected fault or the model attack on the
        update → reject NaN/Inf → norm bound → DP clipping → compression with error feedback →
        fold (or keep the row, or join the secure round).
        """
        start = time.perf_counter()
        training, strategy = self.scenario.training, self.scenario.strategy
        global_t = torch.from_numpy(np.array(global_vec, dtype=np.float32)).to(self.device)
        control = None if server_state is None else torch.from_numpy(np.array(server_state, dtype=np.float32)).to(self.device)
        delta_sum = torch.zeros(self.flat.size, dtype=torch.float64, device=self.device)
        n = len(batch.client_ids)
        weights, losses, steps = np.zeros(n), np.zeros(n), np.zeros(n, dtype=np.int64)
        # Under secure aggregation the server keeps each client's state rows sealed (sealed_state.py).
        sealer = self.sealer if plan.secure is not None else None
        if plan.secure is not None and sealer is None and (batch.states is not None or batch.residuals is not None):
            raise RuntimeError("a secure round with per-client state needs the clients' storage key (client_key)")
        states = batch.states if sealer is None or batch.states is None else sealer.open(batch.client_ids, batch.states)
        state_deltas = None if states is None else np.zeros_like(states, dtype=np.float32)
        rejected: list[int] = []
        unclipped = 0
        epsilons = None if batch.dp_states is None else np.zeros(n)
        dp_states = None if batch.dp_states is None else list(batch.dp_states)
        tokens = 0
        faults, aggregation, seed = self.scenario.faults, self.scenario.aggregation, self.scenario.seed
        failed: list[int] = []
        error: str | None = None
        bounded = malicious = 0
        bytes_up = np.zeros(n, dtype=np.int64)
        rows = np.zeros((n, self.flat.size), dtype=np.float32) if plan.per_client else None
        residuals = None if batch.residuals is None else (
            np.array(batch.residuals, dtype=np.float32) if sealer is None else sealer.open(batch.client_ids, batch.residuals))
        for k, cid in enumerate(batch.client_ids.tolist()):
            attacker = self.adversary is not None and self.adversary.contains(cid)
            malicious += int(attacker)
            x, y = self._client_arrays(cid, held_out=False, poison_round=round_index if attacker else None)
            if x.shape[0] == 0:
                continue
            fault = client_fault(faults, seed, round_index, cid)
            self.flat.load(global_t)
            client_control = None if states is None else torch.from_numpy(states[k]).to(self.device)
            hooks = ClientHooks(
                prox_mu=strategy.mu, anchor=global_t,
                correction=None if client_control is None else control - client_control,
            )
            rng = client_rng(self.scenario.seed, round_index, cid)
            torch.manual_seed(int(client_rng(self.scenario.seed, round_index, cid, stream=11).integers(2**63)))  # dropout
            tokens += self.task.tokens(x) * int(batch.epochs[k])
            try:
                if fault == "error":
                    raise InjectedClientError(f"client {cid} raised (faults.client_error_fraction)")
                if batch.dp_states is None:
                    result = train_client(self.model, self.flat, self.optimizer, x, y, epochs=int(batch.epochs[k]),
                                          batch_size=training.batch_size, rng=rng, hooks=hooks, task=self.task)
                else:
                    result = self._train_dp_sgd(x, y, int(batch.epochs[k]), batch.dp_states[k], rng)
                    dp_states[k], epsilons[k] = result.accountant_state, result.epsilon
            except ScenarioError:
                raise
            except Exception as err:  # a client that crashes is a dropout, not the end of the run
                failed.append(cid)
                error = error or f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
                continue
            delta = self.flat.vector - global_t
            if fault is not None:
                delta = corrupt_update(delta, fault, faults.huge_scale)
            if attacker:
                delta = torch.from_numpy(self.adversary.poison_update(delta.cpu().numpy(), round_index, cid)).to(self.device)
            if not bool(torch.isfinite(delta).all()):
                rejected.append(cid)
                continue
            if aggregation.norm_bound is not None:
                norm = float(torch.linalg.vector_norm(delta.to(torch.float64)))
                if norm > aggregation.norm_bound:
                    bounded += 1
                    if aggregation.norm_bound_action == "reject":
                        continue
                    delta = delta * (aggregation.norm_bound / norm)
            if plan.clip_norm is not None:
                clipped, _, within = clip_to_norm(delta.cpu().numpy(), plan.clip_norm)
                delta, unclipped = torch.from_numpy(clipped).to(self.device), unclipped + int(within)
            size = self.task.tokens(x) / x.shape[1] if strategy.client_weighting == "tokens" else x.shape[0]
            weights[k] = plan.weight(size, strategy.client_weighting)  # tokens in full sequences: <= samples
            losses[k] = result.mean_loss if np.isfinite(result.mean_loss) else 0.0
            steps[k] = result.steps
            if state_deltas is not None:
                state_deltas[k] = scaffold_control_delta(
                    client_control, control, global_t, self.flat.vector, result.steps, training.lr).cpu().numpy()
            if self.compression is None:
                bytes_up[k] = dense_bytes(self.flat.size)
            else:
                residual = None if residuals is None else residuals[k]
                rng = client_rng(seed, round_index, cid, stream=17)
                sent, residual, bytes_up[k] = compress_with_feedback(
                    delta.cpu().numpy(), residual, self.compression, rng, shared_seed=plan.mask_seed)
                if residuals is not None:
                    residuals[k] = residual
                delta = torch.from_numpy(sent).to(self.device)
            if plan.secure is not None:
                self._join_secure_round(plan, round_index, cid, delta.cpu().numpy(), weights[k],
                                        None if state_deltas is None else state_deltas[k])
            elif rows is not None:
                rows[k] = delta.cpu().numpy()
            else:
                delta_sum.add_(delta.to(torch.float64), alpha=float(weights[k]))
        sealed_states = None
        if sealer is not None:  # the new c_i = c_i + Δc_i and residuals go back sealed; Δc_i only in the secure sum
            if state_deltas is not None:
                sealed_states, state_deltas = sealer.seal(batch.client_ids, round_index, states + state_deltas), None
            if residuals is not None:
                residuals = sealer.seal(batch.client_ids, round_index, residuals)
        return ChunkResult(
            index=index, delta_sum=delta_sum.cpu().numpy(), weight_sum=float(weights.sum()),
            client_ids=batch.client_ids, weights=weights, losses=losses, steps=steps,
            rejected=rejected, seconds=time.perf_counter() - start, state_deltas=state_deltas,
            unclipped=unclipped, dp_states=dp_states, epsilons=epsilons, tokens=tokens,
            rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, failed=failed, error=error,
            bounded=bounded, malicious=malicious, bytes_up=bytes_up, rows=rows, residuals=residuals,
            sealed_states=sealed_states,
        )

    def _train_dp_sgd(self, x: torch.Tensor, y: torch.Tensor, epochs: int, state: dict | None,
                      rng: np.random.Generator):
        """Local DP-SGD through Opacus; the client's accountant continues from ``state``."""
        from raysim.privacy.dp.local_dpsgd import train_dp_sgd  # Opacus loads only in runs that use it

        privacy, training = self.scenario.privacy, self.scenario.training
        result = train_dp_sgd(
            self.model, x, y, epochs=epochs, batch_size=training.batch_size, lr=training.lr,
            noise_multiplier=privacy.noise_multiplier, max_grad_norm=privacy.clip_norm, accountant_state=state,
            delta=privacy.delta, seed=int(rng.integers(2**63)), device=str(self.device), accountant=privacy.accountant,
            loss_fn=self.task.loss,
        )
        self.flat.rebind_grads()  # Opacus leaves .grad unset; point it back into the flat buffer
        return result

    def _join_secure_round(self, plan: RoundPlan, round_index: int, cid: int, delta: np.ndarray,
                           weight: float, control_delta: np.ndarray | None) -> None:
        secure = plan.secure
        if self.secure_group is None or self.secure_group.session_id != secure.session_id:
            self.secure_group = ClientGroup([], secure.params, secure.session_id, round_index)
            self.plain = {}
        if plan.mask_seed is not None:  # the shared random mask: only its k coordinates enter the protocol
            delta = delta[shared_mask_indices(delta.size, self.scenario.compression.fraction, plan.mask_seed)]
        ring = encode_update(delta, weight, secure.weight_bound, control_delta, secure.config, secure.params,
                             client_rng(self.scenario.seed, round_index, cid, stream=9), dp_clip_norm=plan.clip_norm,
                             noise_variance=plan.noise_variance, noise_kind=plan.noise_kind)
        self.secure_group.add(cid, ring)
        if secure.config.diagnostics:  # kept for the driver's quantization-error metric only
            self.plain[cid] = (delta, weight)

    def secure_phase(self, name: str, inbound: object) -> PhaseOutput:
        """One secure-aggregation phase for this worker's clients of the current round."""
        assert self.secure_group is not None, "secure_phase before any client joined the round"
        return self.secure_group.phase(name, inbound)

    def end_secure_round(self, session_id: bytes) -> None:
        """Forget the clients' protocol state once their round is over (their secrets die with it)."""
        if self.secure_group is not None and self.secure_group.session_id == session_id:
            self.secure_group = None

    def secure_plain_sum(self, client_ids: list[int], dim: int) -> np.ndarray | None:
        """Σ w·Δ in float64 over ``client_ids`` held here, for ``secure_aggregation.diagnostics``: called by
        the driver, never by the server actor, and never part of the protocol; None when this worker no
        longer holds them (it was restarted). Forgets the plain updates."""
        if not set(client_ids) <= self.plain.keys():
            return None
        total = np.zeros(dim, dtype=np.float64)
        for cid in sorted(client_ids):
            delta, weight = self.plain[cid]
            total += weight * delta.astype(np.float64)
        self.plain = {}
        return total

    def evaluate(self, global_vec: np.ndarray, index: int, client_ids: np.ndarray) -> EvalResult:
        """Federated evaluation: the global model on each client's held-out samples."""
        self.flat.load(np.asarray(global_vec, dtype=np.float32))
        loss_sum, correct, samples = 0.0, 0, 0
        for cid in client_ids.tolist():
            x, y = self._client_arrays(cid, held_out=True)
            if x.shape[0]:
                l, c, s = evaluate(self.model, x, y, task=self.task)
                loss_sum, correct, samples = loss_sum + l, correct + c, samples + s
        return EvalResult(index=index, loss_sum=loss_sum, correct=correct, samples=samples)

    def evaluate_test(self, global_vec: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, index: int,
                      span: tuple[int, int]) -> EvalResult:
        """Central evaluation of a language model on this worker's device: test samples [start, stop)."""
        self.flat.load(np.asarray(global_vec, dtype=np.float32))
        start, stop = span
        x = torch.from_numpy(x_test[start:stop]).to(self.device)
        y = torch.from_numpy(y_test[start:stop]).to(self.device)
        loss_sum, correct, samples = evaluate(self.model, x, y, task=self.task)
        return EvalResult(index=index, loss_sum=loss_sum, correct=correct, samples=samples)

    def placement(self) -> dict[str, object]:
        """Where this worker runs: its node, process and device (for tests and reports)."""
        import ray

        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "pid": os.getpid(), "device": str(self.device),
                "gpu_ids": ray.get_gpu_ids()}
