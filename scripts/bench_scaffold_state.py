"""SCAFFOLD's per-client state at population scale: disk-store size and peak memory (issue 3).

SCAFFOLD (Karimireddy et al., ICML 2020, Alg. 1, option II) keeps one control variate c_i, as large as
the model, per client: 37 GiB for 100,000 clients of a 100k-parameter model if held densely. The
disk-backed ``ClientStateStore`` holds a row only for clients ever sampled and memory-maps the file one
batch at a time. This benchmark runs SCAFFOLD with ``strategy.state_store: disk``, a population of
100,000, 100 clients per round, 20 rounds, an MLP 64 -> [512, 128] -> 10 (100,234 parameters), and an
IID split of a synthetic set with a few samples per client so that the data stays small. The baseline
is the same scenario under FedAvg, which keeps no per-client state; each runs in a fresh process with
its own local Ray, so that the driver's peak belongs to one run.

It reports:
  * the bytes in the run folder's ``client_state/`` (the sum of file sizes, and the blocks actually
    allocated) against (clients ever sampled) x parameters x 4 bytes, where the clients ever sampled
    are counted by replaying ``raysim.engine.sampling.sample_clients`` for every round;
  * peak RSS: the driver's ``ru_maxrss`` plus the largest sum, over samples taken every 0.5 s by a
    background thread, of the RSS of this run's ``ray::WorkerActor`` and ``ray::ServerHost``
    processes (descendants of this driver only, so other Ray sessions on the machine do not count).
    RSS counts shared pages (torch's libraries, the object store) once in every process that maps
    them, so the same thread also records the peak sum of PSS (proportional set size: shared pages
    split between the processes that share them) over the driver, the raylet, the GCS and every
    process the raylet started, all sampled at the same instant.
The last line is ``scaffold_peak_pss_gb: X`` (GiB, SCAFFOLD run). Target: < 2.0.

Usage: python scripts/bench_scaffold_state.py [--population 100000] [--rounds 20] [--samples-per-client 5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil

from rss import MemorySampler, Usage, driver_peak_rss, measure, session_processes

if TYPE_CHECKING:
    from raysim.config import Scenario

FEATURES, CLASSES, HIDDEN = 64, 10, [512, 128]
ACTOR_NAMES = ("ray::WorkerActor", "ray::ServerHost")
GIB = 2**30


def mlp_parameters(features: int, hidden: list[int], classes: int) -> int:
    """Weights and biases of the MLP ``features -> hidden... -> classes``."""
    widths = [features, *hidden, classes]
    return sum(a * b + b for a, b in zip(widths, widths[1:]))


def run_actors(driver: psutil.Process) -> list[psutil.Process]:
    """The ``ray::WorkerActor`` and ``ray::ServerHost`` (server actor) processes descended from ``driver``."""
    found = []
    for proc in driver.children(recursive=True):
        try:
            if any(name in " ".join(proc.cmdline()) for name in ACTOR_NAMES):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def sample_memory() -> Usage:
    """The actors' summed RSS, and the PSS summed at the same instant over the driver, the raylet, the GCS
    and every process the raylet started (as ``bench_scale.py`` measures it)."""
    return Usage(measure(run_actors(psutil.Process())).rss, measure(session_processes(), pss=True).pss)


def bench_scenario(strategy: str, population: int, rounds: int, clients_per_round: int, samples_per_client: int,
                   out: str) -> dict[str, Any]:
    """The benchmark scenario as a mapping; ``strategy`` is ``scaffold`` (disk store) or ``fedavg``."""
    return {
        "name": f"bench-{strategy}-state", "seed": 0, "num_clients": population, "rounds": rounds,
        "data": {"source": "synthetic", "num_features": FEATURES, "num_classes": CLASSES, "test_fraction": 0.2,
                 "num_samples": math.ceil(population * samples_per_client / 0.8)},
        "partition": {"kind": "iid", "min_size": 1},
        "sampling": {"kind": "uniform", "clients_per_round": clients_per_round},
        "model": {"kind": "mlp", "hidden": HIDDEN},
        "training": {"epochs": 1, "batch_size": 8, "optimizer": "sgd", "lr": 0.05},
        "strategy": {"name": strategy, **({"state_store": "disk"} if strategy == "scaffold" else {})},
        "evaluation": {"every": rounds},
        "executor": {"num_workers": 2, "clients_per_call": 10},
        "tracking": {"progress": False}, "output": {"dir": out},
    }


def clients_ever_sampled(scenario: Scenario) -> int:
    """Distinct client ids over all rounds, replaying the engine's seeded sampler."""
    from raysim.engine.sampling import sample_clients

    seen = [sample_clients(scenario.sampling, scenario.num_clients, scenario.seed, r) for r in range(scenario.rounds)]
    return int(np.unique(np.concatenate(seen)).size)


def directory_bytes(path: Path) -> tuple[int, int, list[str]]:
    """(sum of file sizes, bytes of blocks allocated, file names) under ``path``."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return (sum(p.stat().st_size for p in files), sum(p.stat().st_blocks * 512 for p in files),
            [p.name for p in files])


def one_run(strategy: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one strategy in this process and measure it."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("WANDB_MODE", "disabled")
    import ray
    from raysim.engine.cluster import start_local

    import raysim
    from raysim.config import parse_scenario

    with tempfile.TemporaryDirectory() as out:
        scenario = parse_scenario(bench_scenario(strategy, args.population, args.rounds, args.clients_per_round,
                                                 args.samples_per_client, out))
        start_local(num_cpus=2, log_to_driver=False)
        try:
            tick = time.perf_counter()
            with MemorySampler(sample_memory) as sampler:
                result = raysim.run(scenario)
            wall = time.perf_counter() - tick
        finally:
            ray.shutdown()
        size, allocated, files = directory_bytes(result.run_dir / "client_state")
    driver_peak = driver_peak_rss()
    return {
        "strategy": strategy, "num_parameters": result.summary["num_parameters"],
        "clients_ever_sampled": clients_ever_sampled(scenario), "store_bytes": size,
        "store_allocated_bytes": allocated, "store_files": files, "accuracy": result.final_accuracy,
        "seconds_per_round": float(np.mean(result.round_seconds)), "wall_seconds": wall,
        "driver_peak_rss": driver_peak, "actors_peak_rss": sampler.peak.rss, "peak_pss": sampler.peak.pss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients-per-round", type=int, default=100)
    parser.add_argument("--samples-per-client", type=int, default=5)
    parser.add_argument("--one", choices=["scaffold", "fedavg"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one, args)))
        return

    params = mlp_parameters(FEATURES, HIDDEN, CLASSES)
    print(f"model: MLP {FEATURES} -> {HIDDEN} -> {CLASSES}, parameters: {params:,}")
    print(f"population: {args.population:,}, clients per round: {args.clients_per_round}, "
          f"rounds: {args.rounds}, samples per client: {args.samples_per_client}")
    rows = {}
    for strategy in ("fedavg", "scaffold"):
        proc = subprocess.run([sys.executable, __file__, "--one", strategy, "--population", str(args.population),
                               "--rounds", str(args.rounds), "--clients-per-round", str(args.clients_per_round),
                               "--samples-per-client", str(args.samples_per_client)],
                              capture_output=True, text=True, check=True)
        row = rows[strategy] = json.loads(proc.stdout.strip().splitlines()[-1])
        assert row["num_parameters"] == params, row["num_parameters"]
        row["peak_rss"] = row["driver_peak_rss"] + row["actors_peak_rss"]
        print(f"{strategy:>8}: peak RSS {row['peak_rss'] / GIB:.3f} GiB (driver {row['driver_peak_rss'] / GIB:.3f}, "
              f"actors {row['actors_peak_rss'] / GIB:.3f}), peak PSS {row['peak_pss'] / GIB:.3f} GiB, "
              f"{row['seconds_per_round']:.2f} s/round, accuracy {row['accuracy']:.4f}", flush=True)
    scaffold, fedavg = rows["scaffold"], rows["fedavg"]
    expected = scaffold["clients_ever_sampled"] * params * 4
    size, allocated = scaffold["store_bytes"], scaffold["store_allocated_bytes"]
    print(f"clients ever sampled: {scaffold['clients_ever_sampled']:,}")
    print(f"client_state files: {', '.join(scaffold['store_files'])}")
    print(f"client_state bytes: {size:,} ({size / 2**20:.1f} MiB; {allocated / 2**20:.1f} MiB allocated)")
    print(f"expected (sampled x params x 4): {expected:,} ({expected / 2**20:.1f} MiB); ratio {size / expected:.4f}")
    print(f"a dense store for the whole population would be {args.population * params * 4 / GIB:.1f} GiB")
    print(f"scaffold minus fedavg: peak RSS {(scaffold['peak_rss'] - fedavg['peak_rss']) / GIB:+.3f} GiB, "
          f"peak PSS {(scaffold['peak_pss'] - fedavg['peak_pss']) / GIB:+.3f} GiB")
    print(f"scaffold_peak_rss_gb: {scaffold['peak_rss'] / GIB:.3f}")
    print(f"scaffold_peak_pss_gb: {scaffold['peak_pss'] / GIB:.3f}")


if __name__ == "__main__":
    main()
