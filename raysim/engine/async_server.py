"""The async server actor: FedAsync and FedBuff steps driven by the virtual clock, never by Ray's timing.

``AsyncSchedule`` plans, in virtual time, which client starts from which model version and in
which server step its update is used. As soon as a version exists, every client that starts
from it and will be used is queued for training, in batches grouped by (start version, step of
use): all updates in one batch share a staleness, so the worker's folded Σ w_k·Δ_k is all a step
needs. The launcher sends the earliest-needed batches first, keeps a bounded number of calls
queued per worker, and packs whatever waits into one ``train_many`` call of up to
``clients_per_call`` clients (``ClientWorker.train_many``; vectorized, up to a worker's share of
``asynchronous.concurrency``, and the call's clients train together). Each step consumes its batches in
(start version, client id) order. Which worker ran a batch, in which call, and when, never
changes a result, so 1 and 2 workers give a bit-identical model.

Model versions live in the object store, in a ``VersionCache`` holding the current version and
any version whose clients are still in flight with an update that will be used.
One ``run_round`` call is one server step: a FedAsync mix of one update (Xie et al. 2019) or a
FedBuff step over K buffered updates (Nguyen et al. 2022). The step server is built on the same core
as the round server (``raysim.engine.core``) and reduces with the same pure ``reduce``, so it reports
the same per-update metrics; FedBuff's staleness-weighted sum is the strategy's (``strategies.fedbuff``).
"""

from __future__ import annotations

import dataclasses
import heapq
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import ray

from raysim.client.compress import shared_mask_seed
from raysim.client.dp_clip import DPClip, ring_sensitivity
from raysim.client.messages import ChunkResult, ClientBatch, RoundPlan
from raysim.client.pipeline import Released
from raysim.config import Scenario
from raysim.config.compat import vectorize_choice
from raysim.engine.async_schedule import AsyncSchedule, StepPlan
from raysim.engine.clock import VersionCache
from raysim.engine.core import CoreServer, ServerCore
from raysim.engine.evaluation import chunked
from raysim.engine.pool import WORKER_LOST, Prepared, WorkerFailures, lost_position
from raysim.engine.reduce import reduce
from raysim.engine.reduce import ServerRound
from raysim.engine.secure import SecureSum, secure_sum
from raysim.engine.system_model import ClientSystem
from raysim.errors import ScenarioError
from raysim.privacy.dp.distributed import per_client_variance, target_variance
from raysim.privacy.secagg.setup import SecureRound, round_params
from raysim.strategies import Aggregate
from raysim.strategies.fedasync import fedasync_update
from raysim.strategies.fedbuff import fedbuff_pseudo_gradient, fedbuff_robust
from raysim.strategies.staleness import StalenessFunction

if TYPE_CHECKING:
    from raysim.privacy.he.params import HEParams

_REJECTED_STEPS = 10  # steps in a row whose every update was NaN/Inf before the run is called diverged
STALENESS_BINS = (0, 1, 2, 4, 8, 16, 32)  # histogram bins [0], [1], [2, 3], [4, 7], ..., [32, ∞)

Key = tuple[int, int, int]  # (step of use, start version, piece)


@dataclass(frozen=True)
class Task:
    """One batch to train: clients that start from ``version`` (held in the object store as ``ref``)."""

    version: int
    ref: ray.ObjectRef
    batch: ClientBatch
    plan: RoundPlan


class Launcher:
    """Train tasks on the pool, collected by key: earliest-needed first, at most ``in_flight`` calls
    queued per worker, and whatever waits packed into one call of up to ``per_call`` clients. A call
    lost with its worker is counted in ``failures`` and its tasks go back in the queue."""

    def __init__(self, workers: list, in_flight: int, per_call: int, failures: WorkerFailures) -> None:
        self.workers, self.in_flight, self.per_call, self.failures = workers, in_flight, per_call, failures
        self.load = [0] * len(workers)
        self.waiting: list[tuple[Key, Task]] = []
        self.running: dict[ray.ObjectRef, tuple[list[tuple[Key, Task]], int]] = {}  # call → (its tasks, its worker)
        self.done: dict[Key, ray.ObjectRef] = {}  # finished, not yet fetched: key → its call
        self.call_tasks: dict[ray.ObjectRef, tuple[list[tuple[Key, Task]], int]] = {}
        self.results: dict[Key, ChunkResult] = {}
        self.where: dict[Key, int] = {}  # the worker that trained each fetched task (its clients' secrets live there)

    def submit(self, key: Key, task: Task) -> None:
        heapq.heappush(self.waiting, (key, task))
        self._fill()

    def get(self, key: Key) -> ChunkResult:
        """The result for ``key``, waiting for it (and keeping the pool busy meanwhile)."""
        while key not in self.results:
            if key not in self.done:
                if not self.running:
                    raise RuntimeError(f"no train call computes {key}")
                ready, _ = ray.wait(list(self.running), num_returns=1)
                packed, worker = self.running.pop(ready[0])
                self.load[worker] -= 1
                self.call_tasks[ready[0]] = (packed, worker)
                self.done.update((k, ready[0]) for k, _ in packed)
                self._fill()
                continue
            call = self.done[key]
            packed, worker = self.call_tasks.pop(call)
            for k, _ in packed:
                del self.done[k]
            try:
                self.results.update(zip([k for k, _ in packed], ray.get(call)))
                self.where.update((k, worker) for k, _ in packed)
                self.failures.alive(worker)
            except WORKER_LOST as err:
                self.failures.lost(worker, err)
                for item in packed:
                    heapq.heappush(self.waiting, item)
                self._fill()
        return self.results.pop(key)

    def _fill(self) -> None:
        while self.waiting:
            worker = min(self.failures.up(self.workers), key=self.load.__getitem__)
            if self.load[worker] >= self.in_flight:
                return
            packed: list[tuple[Key, Task]] = [heapq.heappop(self.waiting)]
            clients = len(packed[0][1].batch.client_ids)
            while self.waiting and clients + len(self.waiting[0][1].batch.client_ids) <= self.per_call:
                packed.append(heapq.heappop(self.waiting))
                clients += len(packed[-1][1].batch.client_ids)
            refs: dict[int, ray.ObjectRef] = {}
            for _, task in packed:
                refs.setdefault(task.version, task.ref)
            position = {version: k for k, version in enumerate(refs)}
            specs = [(position[task.version], task.version, i, task.batch, task.plan) for i, (_, task) in enumerate(packed)]
            call = self.workers[worker].train_many.remote(specs, *refs.values())
            self.running[call] = (packed, worker)
            self.load[worker] += 1


def staleness_stats(staleness: np.ndarray) -> dict[str, Any]:
    """Mean, max and a histogram over ``STALENESS_BINS`` of one step's staleness values."""
    if staleness.size == 0:
        return {"staleness_mean": None, "staleness_max": None, "staleness_hist": [0] * len(STALENESS_BINS)}
    bins = np.searchsorted(np.asarray(STALENESS_BINS), staleness, side="right") - 1
    return {"staleness_mean": float(staleness.mean()), "staleness_max": int(staleness.max()),
            "staleness_hist": np.bincount(bins, minlength=len(STALENESS_BINS)).tolist()}


class AsyncServer(CoreServer):
    """The body of the server actor in async mode; ``run_round(i)`` runs server step i + 1."""

    def __init__(self, scenario: Scenario, workers: list, test: Sequence[Any],
                 feature_shape: tuple[int, ...], num_classes: int, state_dir: str | None = None,
                 max_client_weight: float = 1.0, *, system: ClientSystem, dp_total_weight: float = 1.0,
                 prepared: Prepared | None = None, he: tuple[HEParams, bytes] | None = None,
                 initial: np.ndarray | None = None) -> None:
        self.core = ServerCore(scenario, workers, test, feature_shape, num_classes, state_dir, dp_total_weight,
                               prepared, he, initial)
        self.scenario = scenario
        run = scenario.asynchronous
        self.mode, self.alpha = run.mode, run.alpha
        self.staleness_fn = StalenessFunction(run.staleness.kind, run.staleness.a, run.staleness.b)
        self.schedule = AsyncSchedule(system, scenario, model_bytes=4 * self.core.dim)
        self.cache = VersionCache()
        executor = scenario.executor
        per_call = executor.clients_per_call
        if vectorize_choice(scenario)[0]:  # clients train together: a call may carry a worker's share of those training
            per_call = max(per_call, -(-run.concurrency // max(len(workers), 1)))
        self.launcher = Launcher(workers, executor.calls_in_flight, per_call, self.core.failures)
        self.needed: dict[int, list[Key]] = defaultdict(list)
        self.pending: dict[Key, Task] = {}  # launched, not yet used by a step
        self.core.totals.update(stale_dropped_total=0, dropouts_total=0)
        self.current: int | None = None  # the version published last
        self.sessions: dict[int, SecureRound] = {}  # secure FedBuff: each open step's session
        self.joined: dict[int, set[int]] = {}  # ... and the clients launched into it
        if scenario.secure_aggregation is not None:
            self.core.totals["secagg_duplicates_dropped_total"] = 0
        uncapped = scenario.strategy.client_weighting == "samples" and self.core.central_dp is None
        self.weight_bound = max_client_weight if uncapped else 1.0  # DP's user weights are min(n/cap, 1) ≤ 1
        self.rejected_streak = 0

    def extra_state(self) -> dict[str, Any]:
        """The schedule (with its RNG), the launched tasks not yet used and the model versions they start from."""
        return {"schedule": self.schedule, "current": self.current, "needed": dict(self.needed),
                "streak": self.rejected_streak,
                "versions": {v: ray.get(self.cache.get(v)) for v in self.cache.live_versions()},
                "tasks": [(key, task.version, task.batch, task.plan) for key, task in self.pending.items()],
                "sessions": self.sessions, "joined": self.joined}

    def restore_extra(self, state: dict[str, Any]) -> None:
        self.schedule, self.current, self.needed = state["schedule"], state["current"], defaultdict(list, state["needed"])
        self.rejected_streak = state["streak"]
        refs = {version: ray.put(vector) for version, vector in state["versions"].items()}
        if self.current is not None:
            self.cache.acquire(self.current, refs[self.current])
        self.sessions, self.joined = state["sessions"], state["joined"]
        for key, version, batch, plan in sorted(state["tasks"], key=lambda item: item[0]):
            self.cache.acquire(version, refs[version], count=len(batch.client_ids))
            self.pending[key] = Task(version, refs[version], batch, plan)
            self.launcher.submit(key, self.pending[key])

    def _publish(self, version: int, used: list[tuple[int, int]]) -> None:
        """Put ``version`` in the object store and launch the ``used`` (client, step) that start from it."""
        ref = ray.put(self.core.global_vec)
        self.cache.acquire(version, ref)  # the server's own hold while the version is current
        if version > 0:
            self.cache.release(version - 1)
        self.current = version
        by_step: dict[int, list[int]] = defaultdict(list)
        for client, step in used:
            by_step[step].append(client)
        epochs, size = self.scenario.training.epochs, self.scenario.executor.clients_per_call
        for step in sorted(by_step):
            ids = np.sort(np.asarray(by_step[step], dtype=np.int64))
            if self.scenario.secure_aggregation is not None:  # a client joins a step's session once
                joined = self.joined.setdefault(step, set())
                fresh = np.array([c not in joined for c in ids.tolist()], dtype=bool)
                self.core.totals["secagg_duplicates_dropped_total"] += int((~fresh).sum())
                ids = ids[fresh]
                joined.update(ids.tolist())
                if not len(ids):
                    continue
            self.cache.acquire(version, ref, count=len(ids))
            plan = self._plan(step, version)
            for piece, chunk in enumerate(chunked(ids, size)):
                core = self.core
                batch = ClientBatch(client_ids=chunk, epochs=np.full(len(chunk), epochs, dtype=np.int64),
                                    residuals=None if core.residuals is None else core.residuals.get(chunk),
                                    personal=None if core.personal is None else core.personal.get(chunk),
                                    dp_states=None if core.local_dp is None else core.local_dp.states_for(chunk))
                self.pending[(step, version, piece)] = Task(version, ref, batch, plan)
                self.launcher.submit((step, version, piece), self.pending[(step, version, piece)])
                self.needed[step].append((step, version, piece))

    def run_round(self, round_index: int) -> dict[str, Any]:
        """Run one server step; returns its metrics."""
        core, start, cpu = self.core, time.perf_counter(), time.process_time()
        if self.current is None:
            self._publish(0, self.schedule.resolve(0))
        failures_before = core.failures.count
        gate = core.budget_gate({"round": round_index + 1})
        if gate is not None and "stopped" in gate:
            return gate
        plan = self.schedule.next_step()
        used = self.schedule.resolve(plan.step)  # planning needs no training: do it while the workers train
        keys = sorted(self.needed.pop(plan.step, []), key=lambda k: (k[1], k[2]))
        results = [(key[1], self.launcher.get(key)) for key in keys]
        placed = [self.launcher.where.pop(key) for key in keys]
        for key in keys:
            del self.pending[key]
        metrics: dict[str, Any] = {**(gate or {}), "round": plan.step, "clients": len(plan.arrivals)}
        metrics.update(self._step(plan, results, placed))
        for version, result in results:
            for _ in result.client_ids:
                self.cache.release(version)
        self._publish(plan.step, used)
        totals = core.totals
        totals["stale_dropped_total"] += plan.stale_dropped
        totals["dropouts_total"] += plan.dropouts
        totals["worker_failures_total"] = core.failures.count
        metrics["worker_failures"] = core.failures.count - failures_before
        metrics.update(totals, **core.privacy_metrics(), stale_dropped=plan.stale_dropped, dropouts=plan.dropouts,
                       virtual_time=plan.time, versions_cached=len(self.cache), **staleness_stats(plan.staleness))
        if plan.step % self.scenario.evaluation.every == 0 or plan.step == self.scenario.rounds:
            metrics.update(core.evaluate(round_index))
        seconds = time.perf_counter() - start
        metrics["seconds"] = seconds
        metrics["server_cpu_seconds"] = time.process_time() - cpu  # the server actor's process, Ray's threads included
        metrics["clients_per_second"] = metrics["clients"] / seconds if seconds > 0 else 0.0
        return metrics

    def _step(self, plan: StepPlan, results: list[tuple[int, ChunkResult]], placed: list[int]) -> dict[str, Any]:
        """Apply the step's updates to the global model (FedAsync mix or FedBuff buffer); ``placed`` is the
        worker of each result."""
        if self.scenario.secure_aggregation is not None:
            return self._secure_step(plan, results, placed)
        if self.core.central_dp is not None:
            return self._private_step(plan, results)
        if not results:
            self.rejected_streak = 0
            return {"kept": 0, "rejected": 0, "client_errors": 0, "compute_seconds": 0.0}
        reduction = reduce([r for _, r in results])
        out = self.core.record(reduction)
        self.rejected_streak = self.rejected_streak + 1 if out["rejected"] and not out["kept"] else 0
        if self.rejected_streak >= _REJECTED_STEPS:
            raise ScenarioError(f"training.lr: every client update of {_REJECTED_STEPS} server steps in a row, up to "
                                f"step {plan.step}, was NaN/Inf; lower training.lr (or strategy.server_lr)")
        if reduction.weight <= 0:
            return out  # nothing usable arrived: the step leaves the model as it is
        where = f"server step {plan.step}"
        if self.mode == "fedasync":
            version, result = results[0]
            delta = result.delta_sum / result.weight_sum  # one client: exactly its Δ
            x_start = ray.get(self.cache.get(version))
            self.core.global_vec = fedasync_update(self.core.global_vec, x_start, delta, plan.step - 1 - version,
                                                   alpha=self.alpha, fn=self.staleness_fn)
            self.core.check(where)
        elif self.scenario.aggregation.rule != "mean":  # the buffer's updates one by one, under the robust rule
            aggregation = self.scenario.aggregation
            kept = [(plan.step - 1 - version, r.rows[r.weights > 0], r.weights[r.weights > 0]) for version, r in results]
            mean_delta, weight, details = fedbuff_robust(
                kept, self.staleness_fn, aggregation.rule, trim_fraction=aggregation.trim_fraction,
                byzantine=aggregation.byzantine, multikrum=aggregation.multikrum or max(out["kept"] - aggregation.byzantine, 1))
            out.update({k: v for k, v in details.items() if not isinstance(v, list)})
            self.core.apply(Aggregate(mean_delta=mean_delta, total_weight=weight, num_clients=out["kept"]), where)
        else:
            folds = [(plan.step - 1 - version, r.delta_sum, r.weight_sum) for version, r in results]
            mean_delta, weight = fedbuff_pseudo_gradient(folds, self.staleness_fn)
            self.core.apply(Aggregate(mean_delta=mean_delta, total_weight=weight, num_clients=out["kept"]), where)
        return out

    def _private_step(self, plan: StepPlan, results: list[tuple[int, ChunkResult]]) -> dict[str, Any]:
        """DP-FedBuff: each buffered update arrives clipped to S with its user weight w ≤ 1; the server sums
        s(staleness)·w·Δ (s ≤ 1, so one client moves the sum by at most S), counting a client at most once a
        step, adds N(0, (z·S)²) once, divides by the fixed denominator qW and steps the accountant once, as
        DP-FedAvg's round does (``CentralDP.aggregate``). A step whose updates were all rejected still runs it."""
        core = self.core
        reduction = reduce([r for _, r in results]) if results else None
        out = core.record(reduction) if reduction is not None else {"kept": 0, "rejected": 0, "client_errors": 0}
        total, seen, duplicates = np.zeros(core.dim, dtype=np.float64), set(), 0
        for version, result in results:
            shrink = float(self.staleness_fn(plan.step - 1 - version))
            for cid, row, weight in zip(result.client_ids.tolist(), result.rows, result.weights):
                if weight <= 0:
                    continue
                if cid in seen:  # a fast client's second update in one buffer: its sensitivity would double
                    duplicates += 1
                    continue
                seen.add(cid)
                total += shrink * float(weight) * row.astype(np.float64)
        out["dp_duplicates_dropped"] = duplicates
        # The mechanism itself is DP's server half, as in a sync round (noise, fixed denominator, accountant).
        context = ServerRound(plan.step, async_plan(self.scenario, plan.step - 1), reduction, None, core.central_dp,
                              self.scenario.seed, core.dim)
        released = core.pipeline.find(DPClip).server(Released(total, None, np.ones(len(seen), dtype=bool)), context)
        core.step(released, np.asarray(sorted(seen), dtype=np.int64), f"server step {plan.step}")
        out.update(released.metrics)
        return out

    def _plan(self, step: int, version: int) -> RoundPlan:
        """What the clients launched from ``version`` and used in ``step`` are told (``async_plan``); under
        secure aggregation also the step's session (and, under distributed DP, each client's noise share),
        and their staleness weight s ≤ 1 to apply before encoding: masked inputs cannot be weighted after."""
        plan = async_plan(self.scenario, version)
        config = self.scenario.secure_aggregation
        if config is None:
            return plan
        if step not in self.sessions:
            params = round_params(config, self.scenario.asynchronous.buffer_size)
            self.sessions[step] = SecureRound(config, params, secrets.token_bytes(16), self.weight_bound, round_index=step,
                                              he=self.core.he_params)
        secure = self.sessions[step]
        return dataclasses.replace(plan, secure=secure, noise_variance=self._noise_variance(secure),
                                   update_scale=float(self.staleness_fn(step - 1 - version)))

    def _noise_variance(self, secure: SecureRound) -> float:
        """Distributed DP: each client's discrete noise variance, so that any t survivors carry (z·Δ₂)²."""
        dp = self.core.central_dp
        if dp is None or self.scenario.privacy.mechanism != "distributed":
            return 0.0
        sensitivity = ring_sensitivity(dp.clip_norm, secure, self.core.dim)
        return per_client_variance(target_variance(dp.update_noise_multiplier, sensitivity), secure.params.threshold)

    def _secure_step(self, plan: StepPlan, results: list[tuple[int, ChunkResult]], placed: list[int]) -> dict[str, Any]:
        """Secure FedBuff: one protocol session per buffer, over the clients whose masked inputs wait on the
        workers that trained them. Each encoded s(staleness)·w·Δ (and w), so the released Σ s·w·Δ / Σ w is
        FedBuff's pseudo-gradient within quantization error. The release then goes through the pipeline's
        server halves as a sync round's does (the secure sum, DP's noise and accountant). A session that
        loses a worker is aborted (its clients' secrets died with it)."""
        core = self.core
        session = self.sessions.pop(plan.step)
        self.joined.pop(plan.step, None)
        step_plan = dataclasses.replace(async_plan(self.scenario, plan.step - 1), secure=session,
                                        noise_variance=self._noise_variance(session))
        reduction = reduce([r for _, r in results]) if results else None
        out = core.record(reduction) if reduction is not None else {"kept": 0, "rejected": 0, "client_errors": 0}
        owner = {int(cid): worker for (_, result), worker in zip(results, placed)
                 for cid, weight in zip(result.client_ids.tolist(), result.weights) if weight > 0}
        released_sum = SecureSum(None, 0.0, None, (), {})
        if owner:
            try:
                released_sum = secure_sum(core.workers, owner, session, core.dim, self.scenario.seed, plan.step,
                                          core.he_public)
            except WORKER_LOST as err:
                core.failures.lost(lost_position(err, core.workers), err)
                core.failures.wait_up(core.workers)
                out["secagg_aborted"] = 1
        context = ServerRound(plan.step, step_plan, reduction, released_sum, core.central_dp, self.scenario.seed, core.dim)
        empty = Released(None, None, np.zeros(0 if reduction is None else len(reduction.client_ids), dtype=bool))
        released = core.pipeline.server(empty, context)
        ids = np.zeros(0, dtype=np.int64) if reduction is None else reduction.client_ids
        core.step(released, ids, f"server step {plan.step}")
        out.update(released.metrics)
        return out

def async_plan(scenario: Scenario, version: int) -> RoundPlan:
    """What every client launched from model ``version`` is told: the version's shared random mask; under a
    robust rule or central DP (DP-FedBuff, which counts a client at most once a step) to return its update
    alone; under user-level DP the clip, the user weight's cap and the noise's kind."""
    privacy = scenario.privacy
    user_level = privacy is not None and privacy.mechanism in ("central", "distributed")
    central = user_level and privacy.mechanism == "central"
    return RoundPlan(mask_seed=shared_mask_seed(scenario, version), per_client=scenario.aggregation.rule != "mean" or central,
                     clip_norm=privacy.clip_norm if user_level else None,
                     weight_cap=privacy.weight_cap if user_level else None,
                     noise_kind=privacy.noise if user_level else "discrete_gaussian")
