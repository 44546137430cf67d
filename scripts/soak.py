"""Soak test: a long run under injected faults, against the same run without them.

A population of 100,000 clients trains for 200 rounds while a worker process exits at every 50th
train call of its life, 1% of clients return NaN updates and a checkpoint is written every 10
rounds. Meanwhile the summed resident memory of this Ray session (the driver, the server actor and
the workers, found under this session's raylet) is sampled twice a second and binned by round.
The same scenario then runs without the ``faults`` block.

It prints peak RSS per 20-round window, the failures survived, both final accuracies, and last
``soak_ok: true|false`` with the reasons. The run passes when:
  * every round finished and the faults were survived (workers restarted, NaN updates rejected);
  * memory does not grow: the peak of the last 50 rounds is within 10% of rounds 26–75's;
  * the final accuracy is within 2 points of the fault-free run's;
  * the run folder holds ``checkpoint.keep`` complete checkpoints, the newest after round 190.

    python scripts/soak.py                 # the full soak (100k clients, 200 rounds)
    python scripts/soak.py --rounds 40     # a shorter one
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import threading
import time
from pathlib import Path


def scenario(population: int, rounds: int, out: str, faults: bool) -> dict:
    raw = {
        "name": "soak-faults" if faults else "soak-clean", "seed": 0, "num_clients": population, "rounds": rounds,
        "data": {"source": "synthetic", "num_samples": population * 6, "num_features": 16, "num_classes": 10},
        "partition": {"kind": "iid"},
        "sampling": {"clients_per_round": 50},
        "model": {"kind": "mlp", "hidden": [64]},
        "training": {"epochs": 1, "batch_size": 8, "lr": 0.05},
        "evaluation": {"every": 10},
        "executor": {"num_workers": 2, "clients_per_call": 5, "max_worker_failures": 1000},
        "checkpoint": {"every": 10, "keep": 2},
        "tracking": {"progress": False, "wandb": "disabled"}, "output": {"dir": out},
    }
    if faults:
        raw["faults"] = {"kill_worker_every": 50, "nan_fraction": 0.01}
    return raw


def run_sampled(raw: dict, raylet) -> tuple[object, list[tuple[int, float]]]:
    """Run ``raw``; returns the result and (rounds finished, session RSS in GB) samples."""
    import psutil

    import raysim

    samples: list[tuple[int, float]] = []
    done = threading.Event()
    metrics = Path(raw["output"]["dir"]) / raw["name"] / "metrics.jsonl"

    def sample() -> None:
        driver = psutil.Process()
        while not done.wait(0.5):
            total = driver.memory_info().rss
            for child in raylet.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            rounds = len(metrics.read_bytes().splitlines()) if metrics.exists() else 0
            samples.append((rounds, total / 2**30))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = raysim.run(raw)
    finally:
        done.set()
        sampler.join()
    return result, samples


def window_peaks(samples: list[tuple[int, float]], rounds: int, width: int = 20) -> list[tuple[str, float]]:
    peaks = []
    for start in range(0, rounds, width):
        inside = [gb for r, gb in samples if start <= r < start + width]
        if inside:
            peaks.append((f"{start + 1}-{min(start + width, rounds)}", max(inside)))
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import psutil
    import ray

    from raysim.engine import checkpoint

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    raylet = psutil.Process(ray._private.worker._global_node.all_processes["raylet"][0].process.pid)
    reasons: list[str] = []
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        faulty, samples = run_sampled(scenario(args.population, args.rounds, out, faults=True), raylet)
        faulty_seconds = time.perf_counter() - started
        saved = checkpoint.latest(faulty.run_dir)
        kept = sorted(p.name for p in (faulty.run_dir / checkpoint.CHECKPOINTS).glob("round-*"))
        started = time.perf_counter()
        clean, _ = run_sampled(scenario(args.population, args.rounds, out, faults=False), raylet)
        clean_seconds = time.perf_counter() - started
    final = faulty.summary["final"]
    print(f"soak: {args.population} clients, {args.rounds} rounds: {faulty_seconds:.0f}s with faults, "
          f"{clean_seconds:.0f}s without")
    print("peak session RSS (GB) per window of rounds:")
    for window, gb in window_peaks(samples, args.rounds):
        print(f"  rounds {window:>9}: {gb:.3f}")
    failures, rejected = final.get("worker_failures_total", 0), final.get("rejected_total", 0)
    print(f"failures survived: {failures} worker deaths, {rejected} NaN updates rejected")
    accuracy, reference = faulty.final_accuracy, clean.final_accuracy
    print(f"final accuracy: {accuracy:.4f} with faults, {reference:.4f} without")
    print(f"checkpoints kept: {kept}; newest after round {saved.rounds_done if saved else None}")
    print(json.dumps({"driver_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "peak_session_rss_gb": max(gb for _, gb in samples)}))

    if len(faulty.history) != args.rounds:
        reasons.append(f"only {len(faulty.history)} of {args.rounds} rounds finished")
    if failures < 1 or rejected < 1:
        reasons.append(f"the faults did not happen ({failures} worker deaths, {rejected} NaN updates)")
    early = [gb for r, gb in samples if args.rounds // 8 <= r < 3 * args.rounds // 8]
    late = [gb for r, gb in samples if r >= args.rounds - args.rounds // 4]
    if early and late and max(late) > 1.10 * max(early):
        reasons.append(f"memory grew from {max(early):.3f} GB to {max(late):.3f} GB")
    if accuracy is None or reference is None or abs(accuracy - reference) > 0.02:
        reasons.append(f"accuracy {accuracy} is not within 2 points of the fault-free {reference}")
    newest = (args.rounds - 1) // 10 * 10
    if saved is None or saved.rounds_done != newest or len(kept) != 2:
        reasons.append(f"expected 2 checkpoints, the newest after round {newest}; found {kept}")
    ray.shutdown()
    print(f"soak_ok: {'true' if not reasons else 'false'}" + (f" ({'; '.join(reasons)})" if reasons else
          f" (memory flat, {failures} worker deaths and {rejected} NaN updates survived, accuracy within 2 points)"))


if __name__ == "__main__":
    main()
