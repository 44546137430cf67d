"""Evaluating the global model: centrally on the test set, and federated on clients' held-out samples.

The workers evaluate, on their devices, with the model they keep resident, so the server process needs no
torch. The test set is cut into fixed slices (a classifier's are its evaluation batches), spread over the
workers, and their sums are added in slice order: the result does not depend on the number of workers, and
a classifier's is bit for bit what one process evaluating batch after batch gets. Under an adversary with a
backdoor, the share of triggered test samples classified as the attacker's target is reported too.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import ray

from raysim.adversary.clients import MaliciousClients
from raysim.client.personal import personal_metrics
from raysim.config import Scenario
from raysim.engine.pool import ChunkCalls, WorkerFailures, map_chunks, shared_argument
from raysim.engine.sampling import uniform_subset
from raysim.models.task import task_for


def chunked(client_ids: np.ndarray, size: int) -> list[np.ndarray]:
    """Consecutive chunks of ``size`` ids; the chunking depends only on the ids, never on the workers."""
    return [client_ids[i : i + size] for i in range(0, len(client_ids), size)]


class Evaluator:
    """``test``: the test set's features and labels, as arrays or as references to them in the object store."""

    def __init__(self, scenario: Scenario, test: Sequence[Any], num_classes: int) -> None:
        self.scenario, self.test, self.num_classes = scenario, list(test), num_classes
        self.task = task_for(scenario.model)
        self.sets: dict[str, tuple[list[ray.ObjectRef], int]] | None = None

    def _sets(self) -> dict[str, tuple[list[ray.ObjectRef], int]]:
        """The sets evaluated centrally, each as (references, samples): the test set (put once, when given as
        arrays) and, under a backdoor attack, its triggered copy."""
        if self.sets is None:
            refs = [a if isinstance(a, ray.ObjectRef) else ray.put(np.asarray(a)) for a in self.test]
            x, y = ray.get(refs)  # zero-copy
            self.sets = {"test": (refs, len(y))}
            if self.scenario.adversary is not None:
                scenario = self.scenario
                adversary = MaliciousClients(scenario.adversary, scenario.seed, scenario.num_clients, self.num_classes)
                triggered = adversary.backdoor_test(np.asarray(x), np.asarray(y))
                if triggered is not None:
                    self.sets["backdoor"] = ([ray.put(a) for a in triggered], len(triggered[1]))
        return self.sets

    def central(self, global_vec: np.ndarray, workers: list, failures: WorkerFailures) -> dict[str, float]:
        """Accuracy and mean loss on the central test set (per-token loss, perplexity and next-token
        accuracy for a causal LM)."""
        return self.start_central(global_vec, workers, failures)()

    def start_central(self, global_vec: np.ndarray, workers: list,
                      failures: WorkerFailures) -> Callable[[], dict[str, float]]:
        """``central`` in two halves: its calls go out now, every span queued at once, and the returned function
        collects them into the metrics, so the caller can queue other work on the workers behind them."""
        sets = self._sets()
        calls = {name: self._calls(global_vec, data, workers, failures) for name, data in sets.items()}

        def metrics() -> dict[str, float]:
            out = self.task.metrics(*_sums(calls["test"].results()))
            if "backdoor" in calls:
                _, correct, samples = _sums(calls["backdoor"].results())
                out["backdoor_accuracy"] = correct / samples if samples else None
            return out

        return metrics

    def _calls(self, global_vec: np.ndarray, data: tuple[list[ray.ObjectRef], int], workers: list,
               failures: WorkerFailures) -> ChunkCalls:
        """The workers' calls evaluating the model ``global_vec`` on the set ``data`` (its references and size)."""
        refs, n = data
        # A classifier's spans are its evaluation batches, so the sums are those one process adds, batch by batch.
        size = 4 * self.task.eval_batch_size if self.task.text else self.task.eval_batch_size
        spans = [(start, min(start + size, n)) for start in range(0, n, size)]
        return ChunkCalls(workers, "evaluate_test", spans, (shared_argument(global_vec), *refs),
                          -(-len(spans) // max(len(workers), 1)), failures=failures)

    def federated(self, global_vec: np.ndarray, round_index: int, workers: list,
                  failures: WorkerFailures) -> dict[str, float]:
        """The global model on the held-out samples of a seeded sample of clients."""
        scenario = self.scenario
        rng = np.random.default_rng([scenario.seed, round_index, 3])
        ids = uniform_subset(rng, scenario.num_clients, scenario.evaluation.federated_clients)
        results = map_chunks(workers, "evaluate", chunked(ids, scenario.executor.clients_per_call), (ray.put(global_vec),),
                             1, failures=failures)
        samples = sum(r.samples for r in results)
        if samples == 0:
            return {}
        return {"fed_accuracy": sum(r.correct for r in results) / samples,
                "fed_loss": sum(r.loss_sum for r in results) / samples}

    def personalized(self, global_vec: np.ndarray, round_index: int, workers: list, failures: WorkerFailures,
                     store) -> dict[str, object]:
        """Per-client accuracy on the held-out samples of the same clients ``federated`` evaluates, with the
        global model and with each client's personalized one (its row from ``store``; ``personal_metrics``)."""
        scenario = self.scenario
        rng = np.random.default_rng([scenario.seed, round_index, 3])
        ids = uniform_subset(rng, scenario.num_clients, scenario.evaluation.federated_clients)
        parts = [(part, None if store is None else store.get(part))
                 for part in chunked(ids, scenario.executor.clients_per_call)]
        results = map_chunks(workers, "evaluate_personal", parts, (ray.put(global_vec), round_index), 1,
                             failures=failures)
        columns = [np.concatenate([r[k] for r in results]) for k in range(3)]
        return personal_metrics(*columns)


def _sums(results: Sequence[Any]) -> tuple[float, int, int]:
    """(summed loss, correct, count) over spans' results, added in span order."""
    return sum(r.loss_sum for r in results), sum(r.correct for r in results), sum(r.samples for r in results)
