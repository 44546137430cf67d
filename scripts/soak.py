"""Soak test: a long run under injected faults, against the same run without them.

A population of 100,000 clients trains for 200 rounds while a worker process exits at every 50th
train call of its life, 1% of clients return NaN updates and a checkpoint is written every 10
rounds. Meanwhile the summed resident memory of this Ray session (the driver, the server actor and
the workers, found under this session's raylet) is sampled twice a second and binned by round.
The same scenario then runs as the reference with the same NaN clients but no worker kills
(``faults.nan_fraction`` kept, ``kill_worker_every`` left out): a worker death must not change the
result, so the two final models are compared bit for bit.

It prints peak RSS per 20-round window, the failures survived, both final accuracies, the seconds
each worker death cost, and last ``soak_ok: true|false`` with the reasons. The run passes when:
  * every round finished and the faults were survived (workers restarted, NaN updates rejected);
  * memory does not grow: the peak of the last 50 rounds is within 10% of rounds 26–75's;
  * the final model is bit-identical (``np.array_equal``) to the reference run's, which rejected
    the same NaN updates;
  * the run folder holds ``checkpoint.keep`` complete checkpoints, the newest after round 190.

    python scripts/soak.py                 # the full soak (100k clients, 200 rounds)
    python scripts/soak.py --rounds 40     # a shorter one
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import psutil

from rss import MemorySampler, Usage, driver_peak_rss, measure, raylet


def scenario(population: int, rounds: int, out: str, kills: bool) -> dict:
    """The soak scenario; ``kills`` adds worker deaths. Both variants have the same 1% NaN clients."""
    raw = {
        "name": "soak-faults" if kills else "soak-nokill", "seed": 0, "num_clients": population, "rounds": rounds,
        "data": {"source": "synthetic", "num_samples": population * 6, "num_features": 16, "num_classes": 10},
        "partition": {"kind": "iid"},
        "sampling": {"clients_per_round": 50},
        "model": {"kind": "mlp", "hidden": [64]},
        "training": {"epochs": 1, "batch_size": 8, "lr": 0.05},
        "evaluation": {"every": 10},
        "executor": {"num_workers": 2, "clients_per_call": 5, "max_worker_failures": 1000},
        "checkpoint": {"every": 10, "keep": 2},
        "tracking": {"progress": False, "wandb": "disabled"}, "output": {"dir": out},
        "faults": {"nan_fraction": 0.01},
    }
    if kills:
        raw["faults"]["kill_worker_every"] = 50
    return raw


def run_sampled(raw: dict, root: psutil.Process) -> tuple[object, list[tuple[int, float]]]:
    """Run ``raw``; returns the result and (rounds finished, session RSS in GB) samples: the driver plus
    every process under ``root``, the session's raylet."""
    import raysim

    samples: list[tuple[int, float]] = []
    metrics = Path(raw["output"]["dir"]) / raw["name"] / "metrics.jsonl"
    driver = psutil.Process()

    def record(usage: Usage) -> None:
        rounds = len(metrics.read_bytes().splitlines()) if metrics.exists() else 0
        samples.append((rounds, usage.rss / 2**30))

    with MemorySampler(lambda: measure([driver, *root.children(recursive=True)]), on_sample=record):
        result = raysim.run(raw)
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
    import numpy as np
    import ray
    from raysim.engine.cluster import start_local

    from raysim.engine import checkpoint

    start_local(num_cpus=2, log_to_driver=False)
    root = raylet()
    reasons: list[str] = []
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        faulty, samples = run_sampled(scenario(args.population, args.rounds, out, kills=True), root)
        faulty_seconds = time.perf_counter() - started
        saved = checkpoint.latest(faulty.run_dir)
        kept = sorted(p.name for p in (faulty.run_dir / checkpoint.CHECKPOINTS).glob("round-*"))
        started = time.perf_counter()
        clean, _ = run_sampled(scenario(args.population, args.rounds, out, kills=False), root)
        clean_seconds = time.perf_counter() - started
    final = faulty.summary["final"]
    print(f"soak: {args.population} clients, {args.rounds} rounds: {faulty_seconds:.0f}s with worker kills and NaN clients, "
          f"{clean_seconds:.0f}s with the same NaN clients and no kills")
    print("peak session RSS (GB) per window of rounds:")
    for window, gb in window_peaks(samples, args.rounds):
        print(f"  rounds {window:>9}: {gb:.3f}")
    failures, rejected = final.get("worker_failures_total", 0), final.get("rejected_total", 0)
    reference_rejected = clean.summary["final"].get("rejected_total", 0)
    print(f"failures survived: {failures} worker deaths, {rejected} NaN updates rejected "
          f"(reference: {clean.summary['final'].get('worker_failures_total', 0)} deaths, {reference_rejected} rejected)")
    accuracy, reference = faulty.final_accuracy, clean.final_accuracy
    print(f"final accuracy: {accuracy:.4f} with kills, {reference:.4f} without")
    identical = faulty.global_vector is not None and clean.global_vector is not None and \
        np.array_equal(faulty.global_vector, clean.global_vector)
    difference = (float(np.max(np.abs(faulty.global_vector.astype(np.float64) - clean.global_vector)))
                  if faulty.global_vector is not None and clean.global_vector is not None
                  and faulty.global_vector.shape == clean.global_vector.shape else float("nan"))
    print(f"final model bit-identical to the reference: {identical} (max |difference| {difference:.3g})")
    if failures:
        print(f"seconds_per_worker_death: {(faulty_seconds - clean_seconds) / failures:.1f}")
    print(f"checkpoints kept: {kept}; newest after round {saved.rounds_done if saved else None}")
    print(json.dumps({"driver_peak_rss_gb": driver_peak_rss() / 2**30,
                      "peak_session_rss_gb": max(gb for _, gb in samples)}))

    if len(faulty.history) != args.rounds:
        reasons.append(f"only {len(faulty.history)} of {args.rounds} rounds finished")
    if failures < 1 or rejected < 1:
        reasons.append(f"the faults did not happen ({failures} worker deaths, {rejected} NaN updates)")
    early = [gb for r, gb in samples if args.rounds // 8 <= r < 3 * args.rounds // 8]
    late = [gb for r, gb in samples if r >= args.rounds - args.rounds // 4]
    if early and late:
        print(f"memory: peak {max(early):.3f} GB in rounds {args.rounds // 8 + 1}–{3 * args.rounds // 8}, "
              f"{max(late):.3f} GB in the last {args.rounds // 4} ({max(late) / max(early) - 1:+.1%})")
    if early and late and max(late) > 1.10 * max(early):
        reasons.append(f"memory grew from {max(early):.3f} GB to {max(late):.3f} GB")
    if not identical:
        reasons.append(f"the final model differs from the run without kills (max |difference| {difference:.3g}; "
                       f"accuracy {accuracy} against {reference})")
    if rejected != reference_rejected:
        reasons.append(f"{rejected} NaN updates rejected, the run without kills rejected {reference_rejected}")
    newest = (args.rounds - 1) // 10 * 10
    if saved is None or saved.rounds_done != newest or len(kept) != 2:
        reasons.append(f"expected 2 checkpoints, the newest after round {newest}; found {kept}")
    ray.shutdown()
    print(f"soak_ok: {'true' if not reasons else 'false'}" + (f" ({'; '.join(reasons)})" if reasons else
          f" (memory flat, {failures} worker deaths and {rejected} NaN updates survived, final model bit-identical "
          "to the run without kills)"))


if __name__ == "__main__":
    main()
