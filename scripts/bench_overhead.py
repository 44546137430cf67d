"""Engine overhead: raysim's steady-state seconds per round against a single-process loop.

The loop runs exactly the same local training (the same ClientWorker code, the same clients, seeds and
model) in this process with no Ray. The headline figure is

    overhead_ratio = raysim seconds per round / (loop seconds per round / number of workers)

Target: <= 1.2 with 2 workers. Usage: python scripts/bench_overhead.py [--workers 2] [--rounds 30]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "disabled")

import ray  # noqa: E402
from raysim.engine.cluster import start_local  # noqa: E402

import raysim  # noqa: E402
from raysim.config import parse_scenario  # noqa: E402
from raysim.data.load import load_data, partition_data  # noqa: E402
from raysim.engine.sampling import sample_clients  # noqa: E402
from raysim.models.initial import initial_global  # noqa: E402
from raysim.engine.server import local_epochs  # noqa: E402
from raysim.engine.worker import ClientBatch, ClientWorker, RoundPlan  # noqa: E402
from raysim.strategies import Aggregate, make_strategy  # noqa: E402


def scenario(workers: int, rounds: int, out: str) -> dict:
    return {
        "name": "bench-overhead", "seed": 0, "num_clients": 1000, "rounds": rounds,
        "data": {"source": "synthetic", "num_samples": 75_000, "num_features": 32, "num_classes": 10, "test_fraction": 0.2},
        "partition": {"kind": "dirichlet", "alpha": 0.5, "min_size": 10},
        "sampling": {"clients_per_round": 50},
        "model": {"kind": "mlp", "hidden": [240]},
        "training": {"epochs": 1, "batch_size": 32, "lr": 0.05},
        "evaluation": {"every": rounds},
        "executor": {"num_workers": workers, "num_cpus": 1},
        "tracking": {"progress": False}, "output": {"dir": out, "overwrite": True},
    }


def loop_seconds_per_round(raw: dict, warmup: int) -> tuple[float, int]:
    """The same rounds, trained one client after another in this process."""
    config = parse_scenario(raw)
    data = load_data(config)
    part = partition_data(config, data)
    worker = ClientWorker.local(config, data.x_train, data.y_train, part.indices, part.offsets, data.feature_shape, data.num_classes)
    strategy = make_strategy(config.strategy)
    global_vec = initial_global(config, data.feature_shape, data.num_classes)
    times = []
    for r in range(config.rounds):
        tick = time.perf_counter()
        ids = sample_clients(config.sampling, config.num_clients, config.seed, r)
        chunk = worker.train(global_vec, None, r, RoundPlan(), 0, ClientBatch(ids, local_epochs(config, ids, r)))
        global_vec = strategy.apply(global_vec, Aggregate((chunk.delta_sum / chunk.weight_sum).astype(np.float32), chunk.weight_sum, len(ids)))
        times.append(time.perf_counter() - tick)
    return float(np.mean(times[warmup:])), worker.runtime.flat.size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        raw = scenario(args.workers, args.rounds, out)
        loop, params = loop_seconds_per_round(raw, args.warmup)
        start_local(num_cpus=args.workers, log_to_driver=False)
        result = raysim.run(raw)
        ray.shutdown()
    engine = float(np.mean(result.round_seconds[args.warmup:]))
    ideal = loop / args.workers
    print(f"model_parameters: {params}")
    print(f"loop_seconds_per_round: {loop:.4f}")
    print(f"loop_ms_per_client: {1000 * loop / 50:.3f}")
    print(f"raysim_seconds_per_round: {engine:.4f}  (workers: {args.workers})")
    print(f"overhead_ratio: {engine / ideal:.3f}")


if __name__ == "__main__":
    main()
