"""Vectorized against sequential client training in one worker: client-steps per second, same clients, same code path.

Both sides are a prepared ``ClientWorker`` (no Ray) running one chunk of a round's clients through the
whole pipeline, as a worker actor does: the sequential side with ``train`` (one client after another,
``LocalTraining``), the vectorized side with ``train_pack`` (``training.vectorize: true``,
``VectorizedTraining``). Each model: the quickstart's (MLP 32-64-10 over the quickstart's 1,000
Dirichlet(0.5) clients, 2 epochs) and the MLP 64-128-10 at batch 32 (1 epoch, 1,000 Dirichlet(0.5)
clients of 60,000 samples), chunks of 10, 50 and 200 clients. Each (model, chunk) pair runs both
sides once to warm up (torch's first optimizer step, allocations), then ``--repeats`` times
interleaved, on a different round's cohort each time, and compares the medians of client-steps per
second. One torch thread (``executor.num_cpus: 1``), as a worker has.

    vectorize_speedup = vectorized client-steps/s / sequential client-steps/s, MLP 64-128-10, 50 clients a chunk

Target: >= 3 on CPU. Usage: python scripts/bench_vectorize.py [--repeats 7] [--chunks 10 50 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from raysim.client.messages import ClientBatch, RoundPlan
from raysim.config import parse_scenario
from raysim.data.load import load_data, partition_data
from raysim.models.initial import initial_global
from raysim.engine.sampling import sample_clients
from raysim.engine.server import local_epochs
from raysim.engine.worker import ClientWorker

MODELS = {
    "quickstart": {"data": {"source": "synthetic", "num_samples": 60000, "num_features": 32, "num_classes": 10},
                   "partition": {"kind": "dirichlet", "alpha": 0.5, "min_size": 10},
                   "model": {"kind": "mlp", "hidden": [64]},
                   "training": {"epochs": 2, "batch_size": 32, "lr": 0.1}},
    "mlp_64_128_10": {"data": {"source": "synthetic", "num_samples": 60000, "num_features": 64, "num_classes": 10},
                      "partition": {"kind": "dirichlet", "alpha": 0.5},
                      "model": {"kind": "mlp", "hidden": [128]},
                      "training": {"epochs": 1, "batch_size": 32, "lr": 0.05}},
}


def workers(raw: dict) -> tuple[ClientWorker, ClientWorker, object, np.ndarray]:
    """A sequential and a vectorized worker prepared on the same data, the scenario and the initial model."""
    made = []
    for vectorize in (False, True):
        config = parse_scenario({**raw, "training": {**raw["training"], "vectorize": vectorize}})
        data = load_data(config)
        part = partition_data(config, data)
        made.append(ClientWorker.local(config, data.x_train, data.y_train, part.indices, part.offsets,
                                       data.feature_shape, data.num_classes))
    return made[0], made[1], config, initial_global(config, data.feature_shape, data.num_classes)


def rate(call, batch: ClientBatch) -> float:
    """Client-steps per second of one call over ``batch``."""
    tick = time.perf_counter()
    results = call(batch)
    seconds = time.perf_counter() - tick
    return sum(int(r.steps.sum()) for r in results) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--chunks", type=int, nargs="+", default=[10, 50, 200])
    args = parser.parse_args()
    torch.set_num_threads(1)
    speedups = {}
    for name, spec in MODELS.items():
        raw = {"seed": 0, "num_clients": 1000, "rounds": 1, "executor": {"num_cpus": 1}, **spec}
        sequential, vectorized, config, global_vec = workers(raw)
        for size in args.chunks:
            raw["sampling"] = {"clients_per_round": size}
            sampling = parse_scenario(raw).sampling
            sides = {
                "sequential": lambda b, r: [sequential.train(global_vec, None, r, RoundPlan(), 0, b)],
                "vectorized": lambda b, r: vectorized.train_pack(global_vec, None, r, RoundPlan(), 0, [(0, b)]),
            }
            rates: dict[str, list[float]] = {side: [] for side in sides}
            for round_index in range(args.repeats + 1):
                ids = sample_clients(sampling, config.num_clients, config.seed, round_index)
                batch = ClientBatch(client_ids=ids, epochs=local_epochs(config, ids, round_index))
                for side, call in sides.items():
                    value = rate(lambda b: call(b, round_index), batch)
                    if round_index:  # the first pass warms both sides up
                        rates[side].append(value)
            seq, vec = (statistics.median(rates[side]) for side in sides)
            speedups[(name, size)] = vec / seq
            print(f"{name} chunk={size}: sequential {seq:,.0f} client-steps/s, vectorized {vec:,.0f} "
                  f"client-steps/s, speedup {vec / seq:.2f}")
    print(f"vectorize_speedup: {speedups[('mlp_64_128_10', 50)]:.2f}")


if __name__ == "__main__":
    main()
