"""A FedBuff step under secure aggregation against the same step in the clear, through the engine.

FedBuff with K = 100 updates a step (concurrency 200) over 1,000 Dirichlet(0.5) clients, an MLP
16-3700-10 (m = 99,910 parameters), on ``--workers`` 1-CPU workers in one warm ``raysim.Session``.
The secure side runs one masking session per buffer (the full graph, no dropouts; ``--neighbours`` for
SecAgg+): each client applies its staleness weight, encodes and masks on the worker that trained it,
and the server actor drives the protocol's phases and unmasks the sum. Both sides run ``--steps``
server steps, once to warm up and then measured; a side's figure is the median of its steps' seconds
(as the server times them), leaving out the first step of each run.

    async_secagg_step_ratio = secure step seconds / plain step seconds

Usage: python scripts/bench_async_secagg.py [--steps 6] [--workers 2] [--neighbours N]
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

SCENARIO = {
    "name": "async-secagg", "seed": 0, "num_clients": 1000,
    "data": {"source": "synthetic", "num_samples": 60000, "num_features": 16, "num_classes": 10},
    "partition": {"kind": "dirichlet", "alpha": 0.5},
    "model": {"kind": "mlp", "hidden": [3700]},
    "training": {"epochs": 1, "batch_size": 32, "lr": 0.05},
    "system": {"speed": {"kind": "lognormal", "mean": 100, "sigma": 1.0}},
    "asynchronous": {"mode": "fedbuff", "concurrency": 200, "buffer_size": 100},
    "tracking": {"wandb": "disabled", "progress": False},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--neighbours", type=int, default=None, help="SecAgg+ degree (default: the full graph)")
    args = parser.parse_args()
    secure = {} if args.neighbours is None else {"neighbours": args.neighbours}
    steps: dict[str, list[float]] = {"plain": [], "secure": []}
    start_local(num_cpus=args.workers, log_to_driver=False)
    with tempfile.TemporaryDirectory() as out, raysim.Session():
        for attempt in range(2):
            for side in steps:
                raw = {**SCENARIO, "name": f"{side}-{attempt}", "rounds": args.steps, "output": {"dir": out},
                       "evaluation": {"every": args.steps},
                       "executor": {"num_workers": args.workers, "num_cpus": 1}}
                if side == "secure":
                    raw["secure_aggregation"] = secure
                result = raysim.run(raw)
                if attempt:  # the first pass warms the workers up
                    steps[side] += [m["seconds"] for m in result.history[1:-1]]  # the last step also evaluates
                    params = result.global_vector.size
    ray.shutdown()
    plain, safe = (statistics.median(steps[side]) for side in steps)
    print(f"model_parameters: {params}")
    print(f"plain_step_s: {plain:.3f}  (steps: {', '.join(f'{t:.3f}' for t in steps['plain'])})")
    print(f"secure_step_s: {safe:.3f}  (steps: {', '.join(f'{t:.3f}' for t in steps['secure'])})")
    print(f"async_secagg_step_ratio: {safe / plain:.2f}")


if __name__ == "__main__":
    main()
