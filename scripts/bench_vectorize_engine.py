"""The start-up benchmark's 30-round scenario through the engine, vectorized against sequential, on 2 workers.

The scenario is ``bench_startup.SCENARIO`` (1,000 Dirichlet(0.5) clients, 50 a round, an MLP 64-128-10
over 60,000 x 64 synthetic samples, 30 rounds). Both sides run in one warm ``raysim.Session`` on a local
Ray of ``--cpus`` CPUs, with two workers of one CPU each: each side once to warm the workers up, then
``--repeats`` times alternating. A side's time is the sum of its 30 rounds' seconds (each round as the
driver times it, from the previous round's metrics to this one's: sampling, training, reduction, the model
step, the round's evaluation and the driver's logging), so start-up is left out; the medians are compared. ``--no-eval`` evaluates only after the last round, to
show training alone.

    engine_vectorize_speedup = sequential 30-round seconds / vectorized 30-round seconds

Target for the vectorized side: <= 0.5 s on 2 cores. Usage:
python scripts/bench_vectorize_engine.py [--repeats 3] [--cpus 2] [--no-eval]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "disabled")

import ray  # noqa: E402
from raysim.engine.cluster import start_local  # noqa: E402

import raysim  # noqa: E402
from bench_startup import SCENARIO  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--no-eval", action="store_true", help="evaluate only after the last round")
    args = parser.parse_args()
    times: dict[str, list[float]] = {"sequential": [], "vectorized": []}
    start_local(num_cpus=args.cpus, log_to_driver=False)
    with tempfile.TemporaryDirectory() as out, raysim.Session():
        for attempt in range(args.repeats + 1):
            for side in times:
                raw = {**SCENARIO, "name": f"{side}-{attempt}", "output": {"dir": out},
                       "executor": {"num_workers": 2, "num_cpus": 1},
                       "training": {**SCENARIO["training"], "vectorize": side == "vectorized"}}
                if args.no_eval:
                    raw["evaluation"] = {"every": SCENARIO["rounds"]}
                result = raysim.run(raw)
                if attempt:  # the first pass warms both sides' workers up
                    times[side].append(sum(result.round_seconds))
    ray.shutdown()
    seq, vec = (statistics.median(times[side]) for side in times)
    print(f"sequential_30_rounds_s: {seq:.3f}  (each: {', '.join(f'{t:.3f}' for t in times['sequential'])})")
    print(f"vectorized_30_rounds_s: {vec:.3f}  (each: {', '.join(f'{t:.3f}' for t in times['vectorized'])})")
    print(f"engine_vectorize_speedup: {seq / vec:.2f}")


if __name__ == "__main__":
    main()
