"""The round server: the driver actor that runs one synchronous round per call, on the server core.

Each round it samples clients, puts the global vector in the object store once (a small one travels in
the calls), hands each worker one call of chunks of client ids (``raysim.engine.packing``), reduces the chunks' partial sums in chunk order (client-id order;
``raysim.engine.reduce``), runs the stages' server halves backwards (secure sum, robust rule,
decompression, DP noise) and lets the strategy turn the aggregate into the next global vector
(``raysim.engine.core``). It evaluates every N rounds.

Where nothing a round starts from is decided at its start (``RoundServer.sends_ahead``), the server sends round
r+1's training at the end of round r, behind round r's evaluation on every worker, and collects it when the
driver asks for round r+1: the workers go from evaluating to training without a round trip through the server
and the driver (``scripts/bench_vectorize_engine.py``: 30 rounds evaluated every round, 15–25 % shorter).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from raysim.adversary.lab import view_of_round
from raysim.client.compress import Compression, shared_mask_seed
from raysim.client.dp_clip import DPClip, ring_sensitivity
from raysim.client.messages import ChunkResult, ClientBatch, RoundPlan
from raysim.client.pipeline import Released
from raysim.config import Scenario
from raysim.engine.clock import SyncClock
from raysim.engine.core import CoreServer, ServerCore
from raysim.engine.evaluation import chunked
from raysim.engine.packing import PackPlanner
from raysim.engine.pool import WORKER_LOST, ChunkCalls, Prepared, lost_position, shared_argument
from raysim.engine.reduce import ServerRound, reduce
from raysim.engine.sampling import sample_clients
from raysim.engine.secure import SecureRelease, SecureSum, release_of, secure_sum
from raysim.engine.system_model import ClientSystem
from raysim.errors import ScenarioError
from raysim.privacy.dp.distributed import per_client_variance, target_variance
from raysim.privacy.secagg.setup import SecureRound, round_params

if TYPE_CHECKING:
    from raysim.privacy.he.params import HEParams


def local_epochs(scenario: Scenario, sampled: np.ndarray, round_index: int) -> np.ndarray:
    """Local epochs per sampled client: E, except for a seeded ``straggler_fraction`` of them, who run
    a uniform 1..E−1 (Li et al. 2020, Sec. 5.2: stragglers perform fewer local updates)."""
    training = scenario.training
    epochs = np.full(len(sampled), training.epochs, dtype=np.int64)
    count = int(round(training.straggler_fraction * len(sampled)))
    if count:
        rng = np.random.default_rng([scenario.seed, round_index, 2])
        chosen = rng.choice(len(sampled), size=count, replace=False)
        epochs[chosen] = rng.integers(1, training.epochs, size=count)
    return epochs


@dataclass
class RoundCalls:
    """A round's training calls in flight: its clients, the model arguments they took (``_model_arguments``), its
    plan, its packs and, as they come in, each pack's worker and seconds."""

    round_index: int
    client_ids: np.ndarray
    arguments: tuple[Any, Any]
    plan: RoundPlan
    packs: list
    calls: ChunkCalls
    where: dict[int, int]
    seconds: dict[int, float]

    def placement(self) -> dict[int, int]:
        """Chunk → the worker that trained it."""
        return {index: self.where[p] for p, pack in enumerate(self.packs) for index, _ in pack}


class RoundServer(CoreServer):
    """The body of the server actor in synchronous mode."""

    def __init__(self, scenario: Scenario, workers: list, test: Sequence[Any],
                 feature_shape: tuple[int, ...], num_classes: int, state_dir: str | None = None,
                 max_client_weight: float = 1.0, system: ClientSystem | None = None, dp_total_weight: float = 1.0,
                 prepared: Prepared | None = None, he: tuple[HEParams, bytes] | None = None,
                 train_sizes: np.ndarray | None = None, initial: np.ndarray | None = None) -> None:
        self.core = ServerCore(scenario, workers, test, feature_shape, num_classes, state_dir, dp_total_weight,
                               prepared, he, initial)
        self.scenario = scenario
        uncapped = scenario.strategy.client_weighting == "samples" and self.core.central_dp is None
        self.weight_bound = max_client_weight if uncapped else 1.0  # DP-FedAvg weights are min(n/cap, 1) ≤ 1
        self.clock = None if system is None else SyncClock(system, scenario, model_bytes=4 * self.core.dim)
        self.release: SecureRelease | None = None  # secure_aggregation.diagnostics only
        rows = scenario.executor.clients_per_call * 4 * self.core.dim if scenario.aggregation.rule != "mean" else 0
        self.planner = PackPlanner(len(workers), chunk_bytes=8 * self.core.dim + rows)
        # Each client's batches an epoch (``train_sizes``: its samples less the held-out share), to share out steps.
        self.steps_per_epoch = None if train_sizes is None else \
            -(-np.asarray(train_sizes, dtype=np.int64) // scenario.training.batch_size)
        # A round is sent ahead only where nothing it starts from is decided at its start: no secure session, no
        # virtual clock, no downlink state, no DP budget to check, and no worker faults (which count train calls).
        faults = scenario.faults
        self.sends_ahead = (scenario.secure_aggregation is None and self.clock is None and self.core.downlink is None
                            and self.core.central_dp is None and (faults is None or faults.kill_worker_every is None))
        self.ahead: RoundCalls | None = None

    def extra_state(self) -> dict[str, Any]:
        return {"clock": self.clock}

    def restore_extra(self, state: dict[str, Any]) -> None:
        self.clock = state["clock"]
        self.ahead = None

    def run_round(self, round_index: int) -> dict[str, Any]:
        """Train one round; returns the round's metrics."""
        scenario, core, start, cpu = self.scenario, self.core, time.perf_counter(), time.process_time()
        sampled = sample_clients(scenario.sampling, scenario.num_clients, scenario.seed, round_index) \
            if self.clock is None else self.clock.sample(round_index)  # ⌈K·over_selection⌉ clients
        metrics: dict[str, Any] = {"round": round_index + 1, "clients": int(len(sampled))}
        gate = core.budget_gate(metrics)
        if gate is not None:
            if "stopped" in gate:
                return gate
            metrics = gate
        sampled, epochs = self._cohort(sampled, round_index, metrics)
        failures_before = core.failures.count
        if len(sampled):
            metrics.update(self._train_round(sampled, epochs, round_index))
        elif core.central_dp is not None:  # an empty cohort still runs the DP mechanism
            context = ServerRound(round_index, None, None, None, core.central_dp, scenario.seed, core.dim)
            released = core.pipeline.find(DPClip).server(Released(None, None, np.zeros(0, dtype=bool)), context)
            core.step(released, np.zeros(0, dtype=np.int64), f"round {round_index + 1}")
            metrics.update(released.metrics)
        metrics["worker_failures"] = core.failures.count - failures_before
        core.totals["worker_failures_total"] = core.failures.count
        metrics.update(core.totals, **core.privacy_metrics())
        evaluation = None
        if (round_index + 1) % scenario.evaluation.every == 0 or round_index + 1 == scenario.rounds:
            evaluation = core.start_evaluation(round_index)
        self._send_ahead(round_index + 1)  # behind the evaluation's calls on every worker
        if evaluation is not None:
            metrics.update(evaluation())
        seconds = time.perf_counter() - start
        metrics["seconds"] = seconds
        metrics["server_cpu_seconds"] = time.process_time() - cpu  # the server actor's process, Ray's threads included
        metrics["clients_per_second"] = metrics["clients"] / seconds if seconds > 0 else 0.0
        return metrics

    def _cohort(self, sampled: np.ndarray, round_index: int, metrics: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """The clients who train this round and their local epochs: stragglers, and the virtual clock's
        first K finishers within the deadline."""
        scenario = self.scenario
        epochs = local_epochs(scenario, sampled, round_index)
        stragglers = epochs < scenario.training.epochs
        if scenario.training.straggler_fraction > 0:
            metrics["stragglers"] = int(stragglers.sum())
        if scenario.training.drop_stragglers:
            sampled, epochs = sampled[~stragglers], epochs[~stragglers]
        if self.clock is not None:
            sampled, epochs, timing = self.clock.select(sampled, epochs, round_index)
            metrics.update(timing)
        return sampled, epochs

    def _train_round(self, sampled: np.ndarray, epochs: np.ndarray, round_index: int) -> dict[str, Any]:
        """Train the sampled clients and step the model; a round whose secure aggregation lost a worker
        (and with it its clients' secrets) is run again from the start, with a fresh session."""
        core = self.core
        training, self.ahead = self.ahead, None
        if training is not None:  # sent at the end of the last round
            assert training.round_index == round_index and np.array_equal(training.client_ids, sampled)
            arguments = training.arguments
        else:
            arguments = self._model_arguments(sampled)
        while True:
            if training is None:
                training = self._send(sampled, epochs, round_index, arguments)
            try:
                chunks = self._collect(training)
                plan = training.plan
                secure = None if plan.secure is None else self._secure_sum(chunks, plan, training.placement(), round_index)
                return self._reduce_and_step(chunks, round_index, plan, secure)
            except WORKER_LOST as err:  # a secure round lost a worker, in training or in the protocol's phases
                core.failures.lost(lost_position(err, core.workers), err)
                core.failures.wait_up(core.workers)  # start the next attempt with the restarted workers
                training = None

    def _send_ahead(self, round_index: int) -> None:
        """Send round ``round_index``'s training now, when nothing it starts from can change before it is asked
        for (``sends_ahead``): the workers go on to it without waiting for this round's metrics to reach the
        driver and its call to come back, and the server collects it when that call comes. Training is a pure
        function of the model, the client and the round, so a round sent ahead but never asked for (a run
        stopped by a signal) changes nothing but the workers' time."""
        if not self.sends_ahead or round_index >= self.scenario.rounds:
            return
        sampled = sample_clients(self.scenario.sampling, self.scenario.num_clients, self.scenario.seed, round_index)
        sampled, epochs = self._cohort(sampled, round_index, {})
        if len(sampled):
            self.ahead = self._send(sampled, epochs, round_index, self._model_arguments(sampled))

    def _model_arguments(self, sampled: np.ndarray) -> tuple[Any, Any]:
        """What every training call of the round takes: the model ``sampled`` train from (broadcast once a round)
        and the strategy's server state, each in the calls or by reference (``shared_argument``)."""
        core = self.core
        global_ref = shared_argument(core.broadcast(sampled))
        server_state = core.strategy.server_state()
        return global_ref, None if server_state is None else shared_argument(server_state)

    def _send(self, sampled: np.ndarray, epochs: np.ndarray, round_index: int,
              arguments: tuple[Any, Any]) -> RoundCalls:
        """Send a round's training: every chunk in one call per worker, a pack of chunks sized to its speed
        (``raysim.engine.packing``; vectorized, a pack's clients train together)."""
        core, plan = self.core, self._round_plan(len(sampled), round_index)
        packs = self.planner.packs(self._batches(sampled, epochs), core.failures.up(core.workers), self.steps_per_epoch)
        where: dict[int, int] = {}
        seconds: dict[int, float] = {}
        calls = ChunkCalls(core.workers, "train_pack", packs, (*arguments, round_index, plan),
                           self.scenario.executor.calls_in_flight, where, core.failures, rerun=plan.secure is None,
                           seconds=seconds)
        return RoundCalls(round_index, sampled, arguments, plan, packs, calls, where, seconds)

    def _collect(self, training: RoundCalls) -> list[ChunkResult]:
        """A round's chunk results, in chunk order, once every pack is in."""
        results = training.calls.results()
        self.planner.observe(results, training.where, training.seconds)
        return [result for pack in results for result in pack]

    def _batches(self, sampled: np.ndarray, epochs: np.ndarray) -> list[ClientBatch]:
        size, core = self.scenario.executor.clients_per_call, self.core
        return [
            ClientBatch(client_ids=ids, epochs=epochs[i : i + size], states=core.strategy.client_states(ids),
                        dp_states=None if core.local_dp is None else core.local_dp.states_for(ids),
                        residuals=None if core.residuals is None else core.residuals.get(ids),
                        personal=None if core.personal is None else core.personal.get(ids))
            for i, ids in zip(range(0, len(sampled), size), chunked(sampled, size))
        ]

    def _round_plan(self, cohort: int, round_index: int) -> RoundPlan:
        """Secure aggregation's session and parameters, DP clipping and client noise, robust aggregation's
        need for individual updates and the shared random mask, for one round."""
        config, privacy, dp, scenario = self.scenario.secure_aggregation, self.scenario.privacy, self.core.central_dp, self.scenario
        secure = None
        if config is not None:
            secure = SecureRound(config, round_params(config, cohort), secrets.token_bytes(16), self.weight_bound,
                                 he=self.core.he_params)
        common = {"per_client": scenario.aggregation.rule != "mean", "mask_seed": shared_mask_seed(scenario, round_index)}
        if dp is None:
            return RoundPlan(secure=secure, **common)
        noise_variance = 0.0
        if privacy.mechanism == "distributed":
            # Any t survivors must carry variance (z·Δ₂)² in ring units, Δ₂ the conditional rounding's bound.
            sensitivity = ring_sensitivity(dp.clip_norm, secure, self._secure_dim(common["mask_seed"]))
            noise_variance = per_client_variance(target_variance(dp.update_noise_multiplier, sensitivity),
                                                 secure.params.threshold)
        return RoundPlan(secure=secure, clip_norm=dp.clip_norm, weight_cap=privacy.weight_cap,
                         noise_variance=noise_variance, noise_kind=privacy.noise, **common)

    def _secure_sum(self, chunks: list[ChunkResult], plan: RoundPlan, placement: dict[int, int],
                    round_index: int) -> SecureSum:
        """The protocol over the kept clients, first, as it can lose a worker: nothing is changed until it is through."""
        owner = {int(u): placement[c.index] for c in chunks for u, w in zip(c.client_ids, c.weights) if w > 0}
        result = secure_sum(self.core.workers, owner, plan.secure, self._secure_dim(plan.mask_seed), self.scenario.seed, round_index,
                            self.core.he_public)
        if plan.secure.config.diagnostics:
            self.release = release_of(result, owner)
        return result

    def _secure_dim(self, mask_seed: int | None) -> int:
        """Words of the update in the secure sum: the model's, or the shared random mask's k coordinates."""
        if mask_seed is None:
            return self.core.dim
        return self.core.pipeline.find(Compression).mask(self.core.dim, mask_seed).size

    def secure_release(self) -> SecureRelease | None:
        """The last secure round's released sum and survivors, for the driver's diagnostics (then forgotten)."""
        release, self.release = self.release, None
        return release

    def _reduce_and_step(self, chunks: list[ChunkResult], round_index: int, plan: RoundPlan,
                         secure: SecureSum | None) -> dict[str, Any]:
        core = self.core
        reduction = reduce(chunks)
        rejected = reduction.count("rejected")
        if reduction.kept == 0 and (rejected or reduction.count("failed")):
            error = next((c.error for c in chunks if c.error), None)
            if error is not None and not rejected:
                raise ScenarioError(f"training: every client of round {round_index + 1} failed, the first with {error}; "
                                    "fix the cause (or lower faults.client_error_fraction)")
            raise ScenarioError(f"training.lr: every client update in round {round_index + 1} was NaN/Inf; "
                                "lower training.lr (or strategy.server_lr)")
        out = core.record(reduction)
        context = ServerRound(round_index, plan, reduction, secure, core.central_dp, self.scenario.seed, core.dim)
        released = core.pipeline.server(Released(None, None, np.zeros(0, dtype=bool)), context)
        leakage = self.scenario.leakage
        if leakage is not None and round_index + 1 in leakage.rounds and core.run_dir is not None:
            view_of_round(round_index + 1, np.array(core.sent), reduction, secure, released).save(core.run_dir)
        core.step(released, reduction.client_ids, f"round {round_index + 1}")
        out.update(released.metrics)
        return out
