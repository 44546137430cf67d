"""The server: the driver actor that owns the global model and runs one synchronous round per call.

Each round it samples clients, puts the global vector in the object store once, hands the workers
chunks of client ids, reduces the chunks' partial sums in chunk order (client-id order), and lets the
strategy turn the aggregate into the next global vector. It evaluates centrally every N rounds.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from raysim.adversary.clients import MaliciousClients
from raysim.client.state import make_state_store
from raysim.client.train import evaluate
from raysim.compression import dense_bytes, shared_mask_indices
from raysim.config import Scenario
from raysim.engine import checkpoint
from raysim.engine.clock import SyncClock
from raysim.engine.pool import WORKER_LOST, WorkerFailures, lost_position, map_chunks
from raysim.engine.secure import SecureRelease, release_of, secure_sum
from raysim.engine.worker import ClientBatch, RoundPlan, throughput_metrics
from raysim.engine.sampling import sample_clients, uniform_subset
from raysim.engine.system_model import ClientSystem
from raysim.errors import ScenarioError
from raysim.models.flat import FlatParams
from raysim.models.task import task_for
from raysim.models.zoo import build_model
from raysim.privacy.secagg.sealed_state import sealed_width
from raysim.privacy.dp.distributed import per_client_variance, quantized_sensitivity, target_variance
from raysim.privacy.secagg.setup import SecureRound, quantization_scale, round_params
from raysim.strategies import Aggregate, make_strategy
from raysim.strategies.robust import robust_aggregate


def initial_model(scenario: Scenario, feature_shape: tuple[int, ...], num_classes: int) -> tuple[torch.nn.Module, FlatParams]:
    """The seeded initial model and its flat parameter view."""
    torch.manual_seed(scenario.seed)
    model = build_model(scenario.model, feature_shape, num_classes)
    return model, FlatParams(model)


def initial_global(scenario: Scenario, feature_shape: tuple[int, ...], num_classes: int) -> np.ndarray:
    """The seeded initial model as a flat float32 vector."""
    return initial_model(scenario, feature_shape, num_classes)[1].numpy()


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


def chunked(client_ids: np.ndarray, size: int) -> list[np.ndarray]:
    """Consecutive chunks of ``size`` ids; the chunking depends only on the ids, never on the workers."""
    return [client_ids[i : i + size] for i in range(0, len(client_ids), size)]


class RoundServer:
    """The body of the server actor."""

    def __init__(self, scenario: Scenario, workers: list, x_test: np.ndarray, y_test: np.ndarray,
                 feature_shape: tuple[int, ...], num_classes: int, state_dir: str | None = None,
                 max_client_weight: float = 1.0, system: ClientSystem | None = None, dp_total_weight: float = 1.0) -> None:
        torch.set_num_threads(1)
        self.scenario = scenario
        self.workers = workers
        self.weight_bound = max_client_weight if scenario.strategy.client_weighting == "samples" else 1.0
        self.model, self.flat = initial_model(scenario, feature_shape, num_classes)  # built once, kept for evaluation
        self.global_vec = self.flat.numpy()
        # Under secure aggregation clients' state rows are kept sealed, two header words wider.
        state_width = self.global_vec.size if scenario.secure_aggregation is None else sealed_width(self.global_vec.size)
        self.strategy = make_strategy(scenario.strategy, num_clients=scenario.num_clients,
                                      dim=self.global_vec.size, state_width=state_width, state_dir=state_dir)
        self.x_test, self.y_test = torch.from_numpy(np.array(x_test)), torch.from_numpy(np.array(y_test))
        self.clock = None if system is None else SyncClock(system, scenario, model_bytes=4 * self.global_vec.size)
        privacy = scenario.privacy
        self.central_dp = self.local_dp = None
        if privacy is not None:  # Opacus's accountants load only in runs that use them
            from raysim.privacy.dp.sampling import denominator_rate
            from raysim.privacy.dp.server import CentralDP, LocalDPLedger

            # The accountant gets the worst-case participation rate, qW the expected kept fraction.
            kept_rate = denominator_rate(scenario)
            self.central_dp = None if privacy.mechanism == "local" else CentralDP(
                privacy, sample_rate=scenario.sample_rate, rounds=scenario.rounds, total_weight=dp_total_weight,
                expected_cohort=kept_rate * scenario.num_clients, denominator_rate=kept_rate)
            self.local_dp = LocalDPLedger(privacy) if privacy.mechanism == "local" else None
        if self.central_dp is not None:
            self.weight_bound = 1.0  # DP-FedAvg weights are min(n/cap, 1) ≤ 1
        self.run_dir = None if state_dir is None else Path(state_dir).parent
        self.release: SecureRelease | None = None  # secure_aggregation.diagnostics only
        self.failures = WorkerFailures(scenario.executor.max_worker_failures)
        compression = scenario.compression
        self.residuals = None
        if compression is not None and compression.error_feedback:
            backend = scenario.strategy.state_store
            self.residuals = make_state_store(backend, state_width,
                                              None if backend == "memory" else Path(state_dir) / "residuals")
        self.totals = {"bytes_up_total": 0, "bytes_down_total": 0, "worker_failures_total": 0,
                       "client_errors_total": 0, "rejected_total": 0}
        self.backdoor = None
        if scenario.adversary is not None:
            adversary = MaliciousClients(scenario.adversary, scenario.seed, scenario.num_clients, num_classes)
            test = adversary.backdoor_test(np.asarray(x_test), np.asarray(y_test))
            self.backdoor = None if test is None else (torch.from_numpy(test[0]), torch.from_numpy(test[1]))

    def _stores(self) -> list:
        return [store for store in (getattr(self.strategy, "store", None), self.residuals) if store is not None]

    def close(self) -> None:
        """Flush what outlives the run: the disk-backed client state stores' indexes."""
        for store in self._stores():
            store.close()

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything the next rounds depend on (the stores' rows travel as files; see ``checkpoint``)."""
        for store in self._stores():
            getattr(store, "flush", lambda: None)()
        return {"global_vec": self.global_vec, "strategy": self.strategy, "central_dp": self.central_dp,
                "local_dp": self.local_dp, "clock": self.clock, "residuals": self.residuals,
                "totals": self.totals, "failures": self.failures.count}

    def restore_state(self, state: dict[str, Any]) -> None:
        self.global_vec, self.strategy, self.central_dp = state["global_vec"], state["strategy"], state["central_dp"]
        self.local_dp, self.clock, self.residuals = state["local_dp"], state["clock"], state["residuals"]
        self.totals, self.failures.count = state["totals"], state["failures"]

    def save_checkpoint(self, rounds_done: int) -> str:
        """Write the checkpoint after ``rounds_done`` rounds into the run folder; returns its path."""
        saved = checkpoint.save(self.run_dir, rounds_done, self.checkpoint_state(),
                                store_dir=self.run_dir / checkpoint.STORE_DIR, keep=self.scenario.checkpoint.keep)
        return str(saved.path)

    def restore_checkpoint(self, path: str, rounds_done: int) -> None:
        """Continue from the checkpoint at ``path``: its client state files, then its state."""
        saved = checkpoint.Checkpoint(rounds_done, Path(path))
        for store in self._stores():
            store.close()
        checkpoint.restore_store_files(saved, self.run_dir / checkpoint.STORE_DIR)
        self.restore_state(saved.load_state())

    def num_parameters(self) -> int:
        return int(self.global_vec.size)

    def global_vector(self) -> np.ndarray:
        return self.global_vec

    def run_round(self, round_index: int) -> dict[str, Any]:
        """Train one round; returns the round's metrics."""
        scenario, start = self.scenario, time.perf_counter()
        if self.clock is None:
            sampled = sample_clients(scenario.sampling, scenario.num_clients, scenario.seed, round_index)
        else:
            sampled = self.clock.sample(round_index)  # ⌈K·over_selection⌉ clients
        metrics: dict[str, Any] = {"round": round_index + 1, "clients": int(len(sampled))}
        budget = self.central_dp.budget_check() if self.central_dp is not None else None
        if budget is not None and not budget.allowed:
            if self.scenario.privacy.on_budget == "stop":
                return {**metrics, "clients": 0, "stopped": budget.message}
            metrics["dp_budget_exceeded"] = budget.message
        epochs = local_epochs(scenario, sampled, round_index)
        stragglers = epochs < scenario.training.epochs
        if scenario.training.straggler_fraction > 0:
            metrics["stragglers"] = int(stragglers.sum())
        if scenario.training.drop_stragglers:
            sampled, epochs = sampled[~stragglers], epochs[~stragglers]
        if self.clock is not None:  # the first K finishers in virtual time, within the deadline
            sampled, epochs, timing = self.clock.select(sampled, epochs, round_index)
            metrics.update(timing)
        failures_before = self.failures.count
        if len(sampled):
            metrics.update(self._train_round(sampled, epochs, round_index))
        elif self.central_dp is not None:  # an empty cohort still runs the DP mechanism
            metrics.update(self._dp_step(None, 0, 0, round_index))
        metrics["worker_failures"] = self.failures.count - failures_before
        self.totals["worker_failures_total"] = self.failures.count
        metrics.update(self.totals)
        if self.central_dp is not None:
            metrics.update(self.central_dp.metrics())
        if self.local_dp is not None:
            metrics.update(self.local_dp.metrics())
        if (round_index + 1) % scenario.evaluation.every == 0 or round_index + 1 == scenario.rounds:
            metrics.update(self.evaluate_central())
            if scenario.evaluation.federated:
                metrics.update(self.evaluate_federated(round_index))
        seconds = time.perf_counter() - start
        metrics["seconds"] = seconds
        metrics["clients_per_second"] = metrics["clients"] / seconds if seconds > 0 else 0.0
        return metrics

    def _train_round(self, sampled: np.ndarray, epochs: np.ndarray, round_index: int) -> dict[str, Any]:
        """Train the sampled clients and step the model; a round whose secure aggregation lost a worker
        (and with it its clients' secrets) is run again from the start, with a fresh session."""
        global_ref = ray.put(self.global_vec)
        server_state = self.strategy.server_state()
        state_ref = None if server_state is None else ray.put(server_state)
        while True:
            plan, placement = self._round_plan(len(sampled), round_index), {}
            try:
                chunks = map_chunks(
                    self.workers, "train", self._batches(sampled, epochs),
                    (global_ref, state_ref, round_index, plan), self.scenario.executor.calls_in_flight, placement,
                    self.failures, rerun=plan.secure is None,
                )
                return self._reduce_and_step(chunks, round_index, plan, placement)
            except WORKER_LOST as err:  # a secure round lost a worker, in training or in the protocol's phases
                self.failures.lost(lost_position(err, self.workers), err)
                self.failures.wait_up(self.workers)  # start the next attempt with the restarted workers

    def _batches(self, sampled: np.ndarray, epochs: np.ndarray) -> list[ClientBatch]:
        size = self.scenario.executor.clients_per_call
        return [
            ClientBatch(client_ids=ids, epochs=epochs[i : i + size], states=self.strategy.client_states(ids),
                        dp_states=None if self.local_dp is None else self.local_dp.states_for(ids),
                        residuals=None if self.residuals is None else self.residuals.get(ids))
            for i, ids in zip(range(0, len(sampled), size), chunked(sampled, size))
        ]

    def _round_plan(self, cohort: int, round_index: int) -> RoundPlan:
        """Secure aggregation's session and parameters, DP clipping and client noise, robust aggregation's
        need for individual updates and the shared random mask, for one round."""
        config, privacy, dp, scenario = self.scenario.secure_aggregation, self.scenario.privacy, self.central_dp, self.scenario
        secure = None
        if config is not None:
            secure = SecureRound(config, round_params(config, cohort), secrets.token_bytes(16), self.weight_bound)
        mask_seed = None
        if scenario.compression is not None and scenario.compression.kind == "random_mask":
            mask_seed = int(np.random.default_rng([scenario.seed, round_index, 31]).integers(2**63))
        common = {"per_client": scenario.aggregation.rule != "mean", "mask_seed": mask_seed}
        if dp is None:
            return RoundPlan(secure=secure, **common)
        noise_variance = 0.0
        if privacy.mechanism == "distributed":
            # Any t survivors must carry variance (z·Δ₂)² in ring units, Δ₂ the conditional rounding's bound.
            noise_variance = per_client_variance(
                target_variance(dp.update_noise_multiplier, self._ring_sensitivity(secure)), secure.params.threshold)
        return RoundPlan(secure=secure, clip_norm=dp.clip_norm, weight_cap=privacy.weight_cap,
                         noise_variance=noise_variance, noise_kind=privacy.noise, **common)

    def secure_release(self) -> SecureRelease | None:
        """The last secure round's released sum and survivors, for the driver's diagnostics (then forgotten)."""
        release, self.release = self.release, None
        return release

    def _ring_sensitivity(self, secure: SecureRound) -> float:
        """Δ₂ in ring units: the bound that each DP client's conditionally rounded vector keeps."""
        return quantized_sensitivity(self.central_dp.clip_norm, quantization_scale(secure.params), self.global_vec.size)

    def privacy_report(self) -> dict[str, Any] | None:
        """The ``privacy`` block of summary.json."""
        from raysim.privacy.dp.sampling import sampling_assumption

        if self.central_dp is not None:
            return self.central_dp.report(self.scenario.privacy.mechanism, self.scenario.rounds,
                                          self.scenario.sampling.kind, sampling_assumption(self.scenario))
        if self.local_dp is not None:
            return self.local_dp.report(self.scenario.rounds, sampling_assumption(self.scenario))
        return None

    def _reduce_and_step(self, chunks: list, round_index: int, plan: RoundPlan, placement: dict[int, int]) -> dict[str, Any]:
        weights = np.concatenate([c.weights for c in chunks])
        losses = np.concatenate([c.losses for c in chunks])
        ids = np.concatenate([c.client_ids for c in chunks])
        rejected = sum(len(c.rejected) for c in chunks)
        failed = sum(len(c.failed) for c in chunks)
        kept_mask = weights > 0
        kept = int(kept_mask.sum())
        secure, mask, result = plan.secure, None, None
        if secure is not None:  # first, as it can lose a worker: nothing is changed until it is through
            owner = {int(u): placement[c.index] for c in chunks for u, w in zip(c.client_ids, c.weights) if w > 0}
            mask = None if plan.mask_seed is None else shared_mask_indices(
                self.global_vec.size, self.scenario.compression.fraction, plan.mask_seed)
            result = secure_sum(self.workers, owner, secure, self.global_vec.size if mask is None else mask.size,
                                self.scenario.seed, round_index)
            if secure.config.diagnostics:
                self.release = release_of(result, owner)
        out: dict[str, Any] = {"rejected": rejected, "kept": kept, "client_errors": failed,
                               "compute_seconds": float(sum(c.seconds for c in chunks)),
                               **throughput_metrics(chunks, self.global_vec.size)}
        self.totals["rejected_total"] += rejected
        self.totals["client_errors_total"] += failed
        if self.scenario.aggregation.norm_bound is not None:
            out["norm_bounded"] = sum(c.bounded for c in chunks)
        if self.scenario.adversary is not None:
            out["malicious"] = sum(c.malicious for c in chunks)
        out.update(self._traffic(chunks, kept_mask, len(ids)))
        if kept == 0 and (rejected or failed):
            error = next((c.error for c in chunks if c.error), None)
            if error is not None and not rejected:
                raise ScenarioError(f"training: every client of round {round_index + 1} failed, the first with {error}; "
                                    "fix the cause (or lower faults.client_error_fraction)")
            raise ScenarioError(
                f"training.lr: every client update in round {round_index + 1} was NaN/Inf; "
                "lower training.lr (or strategy.server_lr)"
            )
        if self.residuals is not None and kept:
            residuals = np.concatenate([c.residuals for c in chunks])
            self.residuals.put(ids[kept_mask], residuals[kept_mask])
        rows = np.concatenate([c.state_deltas for c in chunks]) if chunks[0].state_deltas is not None else None
        sealed = np.concatenate([c.sealed_states for c in chunks]) if chunks[0].sealed_states is not None else None
        robust = None
        if secure is None:
            total, weight = np.zeros(self.global_vec.size, dtype=np.float64), 0.0
            for chunk in chunks:
                total += chunk.delta_sum
                weight += chunk.weight_sum
            included = kept_mask
            control_sum = None if rows is None else np.sum(rows[included], axis=0, dtype=np.float64)
            if plan.per_client and kept:
                aggregation = self.scenario.aggregation
                updates = np.concatenate([c.rows for c in chunks])[kept_mask]
                robust, details = robust_aggregate(
                    updates, weights[kept_mask], aggregation.rule, trim_fraction=aggregation.trim_fraction,
                    byzantine=aggregation.byzantine,
                    multikrum=aggregation.multikrum or max(kept - aggregation.byzantine, 1))
                out.update({k: v for k, v in details.items() if not isinstance(v, list)})
        else:
            out.update(result.metrics)
            total, weight, control_sum = result.weighted_sum, result.weight, result.control_sum
            if mask is not None and total is not None:  # the shared mask's k sums go back to their coordinates
                total = np.zeros(self.global_vec.size, dtype=np.float64)
                total[mask] = result.weighted_sum
            included = np.isin(ids, np.asarray(result.survivors, dtype=np.int64))
        if self.local_dp is not None:
            for chunk in chunks:
                self.local_dp.record(chunk.client_ids, chunk.dp_states, chunk.epsilons)
        if kept:
            out["loss"] = float((weights * losses).sum() / weights.sum())
        if self.central_dp is not None:  # the fixed denominator: the mechanism runs whatever reached the sum
            unclipped = sum(c.unclipped for c in chunks)
            out["dp_unclipped_fraction"] = unclipped / max(kept, 1)
            out.update(self._dp_step(total, unclipped, int(included.sum()), round_index, secure))
        elif total is not None and weight > 0:
            extras: dict[str, Any] = {}
            if rows is not None:
                extras = {"client_ids": ids[included], "state_deltas": rows[included], "state_delta_sum": control_sum}
            elif sealed is not None:
                extras = {"client_ids": ids[included], "sealed_states": sealed[included], "state_delta_sum": control_sum}
            mean_delta = (total / weight).astype(np.float32) if robust is None else robust.astype(np.float32)
            self._step_model(Aggregate(mean_delta=mean_delta, total_weight=weight,
                                       num_clients=int(included.sum()), extras=extras), round_index)
        return out

    def _step_model(self, aggregate: Aggregate, round_index: int) -> None:
        self.global_vec = self.strategy.apply(self.global_vec, aggregate)
        if not np.isfinite(self.global_vec).all():
            raise ScenarioError(
                f"training.lr: the global model became NaN/Inf in round {round_index + 1}; "
                "lower training.lr or strategy.server_lr"
            )

    def _dp_step(self, total: np.ndarray | None, unclipped: int, contributors: int, round_index: int,
                 secure: SecureRound | None = None) -> dict[str, Any]:
        """Run the round's DP mechanism on ``total``, the clipped weighted sum of ``contributors`` updates.

        ``total`` None (no client sampled, or secure aggregation aborted) or no contributor is an empty round
        (``raysim.privacy.dp.server``): the central server still releases noise on the zero sum and steps
        the model; under distributed DP, whose noise comes from the clients, a round that released nothing
        keeps the model and only steps the accountant.
        """
        dp, distributed = self.central_dp, self.scenario.privacy.mechanism == "distributed"
        empty = total is None or contributors == 0
        out: dict[str, Any] = {"dp_empty_round": int(empty)}
        if total is None and distributed:
            dp.account(empty=True)
            return out
        if distributed:
            from raysim.privacy.dp.server import effective_distributed_z

            out["dp_effective_noise_multiplier"] = effective_distributed_z(
                dp.update_noise_multiplier, contributors, secure.params.threshold)
            out["dp_l2_sensitivity"] = self._ring_sensitivity(secure)
        if total is None:
            total = np.zeros(self.global_vec.size, dtype=np.float64)
        mean_delta = dp.aggregate(total, unclipped=unclipped, empty=empty,
                                  rng=np.random.default_rng([self.scenario.seed, round_index, 13]),
                                  server_noise=not distributed)
        self._step_model(Aggregate(mean_delta=mean_delta, total_weight=dp.expected_weight, num_clients=contributors),
                         round_index)
        return out

    def _traffic(self, chunks: list, kept_mask: np.ndarray, trained: int) -> dict[str, Any]:
        """Bytes each way this round: every trained client downloads the model (and any server state) as
        float32; each kept client uploads its update as encoded (``raysim.compression``)."""
        dense = dense_bytes(self.global_vec.size)
        down = dense * (1 if self.strategy.server_state() is None else 2) * trained
        up = int(np.concatenate([c.bytes_up for c in chunks])[kept_mask].sum())
        kept = int(kept_mask.sum())
        self.totals["bytes_up_total"] += up
        self.totals["bytes_down_total"] += down
        if not kept:
            return {"bytes_down": down}
        return {"bytes_up": up, "bytes_down": down, "bytes_up_per_client": up / kept,
                "compression_ratio": dense * kept / up if up else None}

    def evaluate_central(self) -> dict[str, float]:
        """Accuracy and mean loss of the global model on the central test set (per-token loss, perplexity
        and next-token accuracy for a causal LM).

        Language models are evaluated by the workers, on their devices, over fixed slices of the test set
        whose sums are added in slice order, so the result does not depend on the number of workers.
        """
        task = task_for(self.scenario.model)
        if task.text:
            n, size = len(self.y_test), 4 * task.eval_batch_size
            refs = (ray.put(self.global_vec), ray.put(self.x_test.numpy()), ray.put(self.y_test.numpy()))
            spans = [(start, min(start + size, n)) for start in range(0, n, size)]
            results = map_chunks(self.workers, "evaluate_test", spans, refs, 1, failures=self.failures)
            return task.metrics(sum(r.loss_sum for r in results), sum(r.correct for r in results),
                                sum(r.samples for r in results))
        self.flat.load(self.global_vec)
        metrics = task.metrics(*evaluate(self.model, self.x_test, self.y_test, task=task))
        if self.backdoor is not None:  # the share of triggered test samples classified as the attacker's target
            _, correct, samples = evaluate(self.model, *self.backdoor, task=task)
            metrics["backdoor_accuracy"] = correct / samples if samples else None
        return metrics

    def evaluate_federated(self, round_index: int) -> dict[str, float]:
        """The global model on the held-out samples of a seeded sample of clients."""
        rng = np.random.default_rng([self.scenario.seed, round_index, 3])
        ids = uniform_subset(rng, self.scenario.num_clients, self.scenario.evaluation.federated_clients)
        global_ref = ray.put(self.global_vec)
        results = map_chunks(self.workers, "evaluate", chunked(ids, self.scenario.executor.clients_per_call), (global_ref,), 1,
                             failures=self.failures)
        samples = sum(r.samples for r in results)
        if samples == 0:
            return {}
        return {"fed_accuracy": sum(r.correct for r in results) / samples,
                "fed_loss": sum(r.loss_sum for r in results) / samples}
