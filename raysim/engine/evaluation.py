"""Evaluating the global model: centrally on the test set, and federated on clients' held-out samples.

Small models are evaluated in the server process on a model built once. Language models are
evaluated by the workers, on their devices, over fixed slices of the test set whose sums are added
in slice order, so the result does not depend on the number of workers. Under an adversary with a
backdoor, the share of triggered test samples classified as the attacker's target is reported too.
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from raysim.adversary.clients import MaliciousClients
from raysim.client.personal import personal_metrics
from raysim.client.train import evaluate
from raysim.config import Scenario
from raysim.engine.pool import WorkerFailures, map_chunks
from raysim.engine.sampling import uniform_subset
from raysim.models.flat import FlatParams
from raysim.models.task import task_for


def chunked(client_ids: np.ndarray, size: int) -> list[np.ndarray]:
    """Consecutive chunks of ``size`` ids; the chunking depends only on the ids, never on the workers."""
    return [client_ids[i : i + size] for i in range(0, len(client_ids), size)]


class Evaluator:
    def __init__(self, scenario: Scenario, model: torch.nn.Module, flat: FlatParams, x_test: np.ndarray,
                 y_test: np.ndarray, num_classes: int) -> None:
        self.scenario, self.model, self.flat = scenario, model, flat
        self.x_test, self.y_test = torch.from_numpy(np.array(x_test)), torch.from_numpy(np.array(y_test))
        self.backdoor = None
        if scenario.adversary is not None:
            adversary = MaliciousClients(scenario.adversary, scenario.seed, scenario.num_clients, num_classes)
            test = adversary.backdoor_test(np.asarray(x_test), np.asarray(y_test))
            self.backdoor = None if test is None else (torch.from_numpy(test[0]), torch.from_numpy(test[1]))

    def central(self, global_vec: np.ndarray, workers: list, failures: WorkerFailures) -> dict[str, float]:
        """Accuracy and mean loss on the central test set (per-token loss, perplexity and next-token
        accuracy for a causal LM)."""
        task = task_for(self.scenario.model)
        if task.text:
            n, size = len(self.y_test), 4 * task.eval_batch_size
            refs = (ray.put(global_vec), ray.put(self.x_test.numpy()), ray.put(self.y_test.numpy()))
            spans = [(start, min(start + size, n)) for start in range(0, n, size)]
            results = map_chunks(workers, "evaluate_test", spans, refs, 1, failures=failures)
            return task.metrics(sum(r.loss_sum for r in results), sum(r.correct for r in results),
                                sum(r.samples for r in results))
        self.flat.load(global_vec)
        metrics = task.metrics(*evaluate(self.model, self.x_test, self.y_test, task=task))
        if self.backdoor is not None:
            _, correct, samples = evaluate(self.model, *self.backdoor, task=task)
            metrics["backdoor_accuracy"] = correct / samples if samples else None
        return metrics

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
