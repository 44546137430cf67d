"""Population scale: FedAvg seconds per round and peak memory at 10,000, 100,000 and 1,000,000 clients.

Every client holds the same number of samples (an IID split of a synthetic set sized to the
population), and 100 clients train per round, so the work per round is the same at every size; only
the population grows. The mean seconds per round leave out the warm-up rounds and every round that
evaluates (its test set grows with the population). Each size runs in a fresh process with its own
local Ray so memory is measured cleanly: every 0.5 s the PSS (shared pages, such as the object store's,
counted once) of the driver, the raylet, the GCS and every process the raylet started (workers, the
server actor, Ray's agents) is summed at the same instant, and the peak of those sums is reported.

Prints one line per size, then ``peak_pss_gb_1m: Y`` and, last, ``scale_ratio: X`` (seconds per round
at 1,000,000 / at 10,000). Targets: scale_ratio <= 1.2 and peak_pss_gb_1m < 3.0.
Usage: python scripts/bench_scale.py [--sizes 10000 100000 1000000] [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from rss import MemorySampler, measure, session_processes

SAMPLES_PER_CLIENT = 8


def one_size(population: int, rounds: int, warmup: int) -> dict:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("WANDB_MODE", "disabled")
    import numpy as np
    import ray
    from raysim.engine.cluster import start_local

    import raysim

    start_local(num_cpus=2, log_to_driver=False)
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
        driver_peak = [0]

        def sample():
            processes = session_processes()
            driver_peak[0] = max(driver_peak[0], measure(processes[:1], pss=True).pss)
            return measure(processes, pss=True)

        with MemorySampler(sample) as sampler:
            result = raysim.run(raw)
    ray.shutdown()
    training = [s for s, m in list(zip(result.round_seconds, result.history))[warmup:] if "accuracy" not in m]
    return {
        "population": population,
        "seconds_per_round": float(np.mean(training)),
        "driver_peak_pss_gb": driver_peak[0] / 2**30,
        "peak_pss_gb": sampler.peak.pss / 2**30,
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
        print(f"population {size:>9}: {row['seconds_per_round']:.4f} s/round, peak PSS {row['peak_pss_gb']:.2f} GB "
              f"(the driver's own peak {row['driver_peak_pss_gb']:.2f} GB)", flush=True)
    by_size = {r["population"]: r for r in rows}
    largest, smallest = max(by_size), min(by_size)
    print(f"peak_pss_gb_1m: {by_size[largest]['peak_pss_gb']:.3f}")
    print(f"scale_ratio: {by_size[largest]['seconds_per_round'] / by_size[smallest]['seconds_per_round']:.3f}")


if __name__ == "__main__":
    main()
