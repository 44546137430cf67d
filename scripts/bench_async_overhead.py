"""Wall-clock cost of the async machinery against sync rounds that train the same number of clients.

The same population, data, model and local training as ``bench_overhead.py``; async runs add
lognormal client speeds (σ = 1). Every variant trains exactly ``rounds × 50`` clients:

* sync FedAvg: ``rounds`` rounds of 50 clients;
* FedBuff, K = 50, 100 clients in flight: ``rounds`` server steps, as many as sync has rounds, so the
  difference is the async machinery alone (virtual-time planning, the version cache, batches grouped
  by start version and step of use, packed calls);
* FedBuff, K = 10, 50 in flight (the paper's setting): 5× as many server steps;
* FedAsync, 50 in flight: one server step per client.

Each figure is wall seconds of the round loop (driver → server → workers, metrics written every
step, one evaluation at the end) per trained client, after the first ``--warmup`` clients (actor
start-up). The headline is

    async_overhead_ratio = FedBuff (K = 50) seconds per client / sync seconds per client

Target: <= 1.3. The K = 10 and FedAsync ratios add the cost of 5× and 50× as many sequential server
steps (each needs the updates trained from the model version just before it) and are printed too.
Usage: python scripts/bench_async_overhead.py [--workers 2] [--rounds 30] [--warmup 100]
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "disabled")

import ray  # noqa: E402
from raysim.engine.cluster import start_local  # noqa: E402

import raysim  # noqa: E402

PER_ROUND, BUFFER = 50, 10


def scenario(workers: int, out: str) -> dict:
    return {
        "name": "bench-async", "seed": 0, "num_clients": 1000,
        "data": {"source": "synthetic", "num_samples": 75_000, "num_features": 32, "num_classes": 10, "test_fraction": 0.2},
        "partition": {"kind": "dirichlet", "alpha": 0.5, "min_size": 10},
        "sampling": {"clients_per_round": PER_ROUND},
        "model": {"kind": "mlp", "hidden": [240]},
        "training": {"epochs": 1, "batch_size": 32, "lr": 0.05},
        "executor": {"num_workers": workers, "num_cpus": 1},
        "tracking": {"progress": False}, "output": {"dir": out, "overwrite": True},
    }


def variants(rounds: int) -> dict[str, list[str]]:
    system = "system.speed={kind: lognormal, mean: 100, sigma: 1}"
    steps = {"sync": rounds, "fedbuff_k50": rounds, "fedbuff_k10": rounds * PER_ROUND // BUFFER, "fedasync": rounds * PER_ROUND}
    run = {
        "sync": [],
        "fedbuff_k50": [system, "asynchronous.mode=fedbuff", f"asynchronous.concurrency={2 * PER_ROUND}",
                        f"asynchronous.buffer_size={PER_ROUND}"],
        "fedbuff_k10": [system, "asynchronous.mode=fedbuff", f"asynchronous.concurrency={PER_ROUND}",
                        f"asynchronous.buffer_size={BUFFER}"],
        "fedasync": [system, "asynchronous.mode=fedasync", f"asynchronous.concurrency={PER_ROUND}"],
    }
    return {name: [*extra, f"rounds={steps[name]}", f"evaluation.every={steps[name]}"] for name, extra in run.items()}


def seconds_per_client(history: list[dict], round_seconds: list[float], warmup: int) -> tuple[float, int]:
    """Loop seconds per trained client over the steps after the first ``warmup`` clients."""
    trained, seconds, counted = 0, 0.0, 0
    for metrics, tick in zip(history, round_seconds):
        if trained >= warmup:
            seconds, counted = seconds + tick, counted + metrics.get("kept", 0)
        trained += metrics.get("kept", 0)
    return seconds / counted, counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=100, help="clients trained before timing starts")
    args = parser.parse_args()
    per_client: dict[str, float] = {}
    start_local(num_cpus=args.workers, log_to_driver=False)
    with tempfile.TemporaryDirectory() as out:
        for name, overrides in variants(args.rounds).items():
            result = raysim.run(scenario(args.workers, out), overrides=[*overrides, f"name={name}"])
            per_client[name], counted = seconds_per_client(result.history, result.round_seconds, args.warmup)
            print(f"{name}: steps {len(result.history)}, clients_timed {counted}, "
                  f"ms_per_client {1000 * per_client[name]:.3f}, final_accuracy {result.final_accuracy:.4f}")
    ray.shutdown()
    for name in ("fedbuff_k10", "fedasync"):
        print(f"{name}_overhead_ratio: {per_client[name] / per_client['sync']:.3f}")
    print(f"async_overhead_ratio: {per_client['fedbuff_k50'] / per_client['sync']:.3f}")


if __name__ == "__main__":
    main()
