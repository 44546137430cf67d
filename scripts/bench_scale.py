"""Population scale: FedAvg seconds per round and peak memory at 10,000, 100,000 and 1,000,000 clients.

Every client holds the same number of samples (an IID split of a synthetic set sized to the
population), and 100 clients train per round, so the work per round is the same at every size; only
the population grows. Each size runs in a fresh process with its own local Ray so memory is measured
cleanly. Peak RSS is the driver's peak plus the largest summed RSS, sampled every 0.5 s during the run,
of the processes this run's raylet started (workers, server, Ray's own agents).

Prints one line per size, then ``peak_rss_gb_1m: Y`` and, last, ``scale_ratio: X`` (seconds per round
at 1,000,000 / at 10,000). Targets: scale_ratio <= 1.2 and peak_rss_gb_1m < 4.
Usage: python scripts/bench_scale.py [--sizes 10000 100000 1000000] [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from rss import MemorySampler, driver_peak_rss, measure, raylet

SAMPLES_PER_CLIENT = 8


def one_size(population: int, rounds: int, warmup: int) -> dict:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("WANDB_MODE", "disabled")
    import numpy as np
    import ray

    import raysim

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as out:
        raw = {
            "name": f"scale-{population}", "seed": 0, "num_clients": population, "rounds": rounds,
            "data": {"source": "synthetic", "num_samples": int(population * SAMPLES_PER_CLIENT / 0.8),
                     "num_features": 16, "num_classes": 10, "test_fraction": 0.2},
            "partition": {"kind": "iid"},
            "sampling": {"clients_per_round": 100},
            "model": {"kind": "mlp", "hidden": [64]},
            "training": {"epochs": 1, "batch_size": 8, "lr": 0.05},
            "evaluation": {"every": rounds},
            "executor": {"num_workers": 2, "clients_per_call": 10},
            "tracking": {"progress": False}, "output": {"dir": out},
        }
        session = raylet()
        with MemorySampler(lambda: measure(session.children(recursive=True))) as sampler:
            result = raysim.run(raw)
    driver_peak = driver_peak_rss()
    ray.shutdown()
    return {
        "population": population,
        "seconds_per_round": float(np.mean(result.round_seconds[warmup:])),
        "driver_peak_rss_gb": driver_peak / 2**30,
        "workers_rss_gb": sampler.peak.rss / 2**30,
        "peak_rss_gb": (driver_peak + sampler.peak.rss) / 2**30,
        "accuracy": result.final_accuracy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_size(args.one, args.rounds, args.warmup)))
        return
    rows = []
    for size in args.sizes:
        proc = subprocess.run([sys.executable, __file__, "--one", str(size), "--rounds", str(args.rounds),
                               "--warmup", str(args.warmup)], capture_output=True, text=True, check=True)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"population {size:>9}: {row['seconds_per_round']:.4f} s/round, peak RSS {row['peak_rss_gb']:.2f} GB "
              f"(driver {row['driver_peak_rss_gb']:.2f} GB, actors {row['workers_rss_gb']:.2f} GB)", flush=True)
    by_size = {r["population"]: r for r in rows}
    largest, smallest = max(by_size), min(by_size)
    print(f"peak_rss_gb_1m: {by_size[largest]['peak_rss_gb']:.3f}")
    print(f"scale_ratio: {by_size[largest]['seconds_per_round'] / by_size[smallest]['seconds_per_round']:.3f}")


if __name__ == "__main__":
    main()
