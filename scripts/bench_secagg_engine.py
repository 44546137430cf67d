"""Secure rounds through the engine: client secrets in the worker actors, the server actor relaying every
phase, against a plain round of the same scenario in the same run.

``bench_secagg.py`` runs the protocol in one process and leaves the relay unmeasured; here each row is a
whole ``raysim.run`` (2 workers) of an MLP of about 100,000 parameters (64-1350-10: 101,260) where every
one of the n clients of the population trains each round, once with ``secure_aggregation`` and once
without. Rows (``--rows``, default all):

    full    n = 100, the complete graph, no dropout      target <= 3 s a secure round, training included
    drop    n = 500, the complete graph, 10% dropout      target <= 62 s
    plus    n = 1,000, SecAgg+ (neighbours: auto), 10%    target <= 30 s

Each run's first round (the warm-up: torch's first step, the first key agreements) is left out of its
mean; the rounds are timed as the driver sees them (``Result.round_seconds``). The last line is the
first row's ``secagg_engine_ratio`` = secure s/round / plain s/round.
Usage: python scripts/bench_secagg_engine.py [--rows full,drop,plus] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np  # noqa: E402

import raysim  # noqa: E402

ROWS = {
    "full": (100, {"threshold": 0.6}, 3.0),
    "drop": (500, {"threshold": 0.6, "dropout": {"masked_input": 0.1}}, 62.0),
    "plus": (1000, {"neighbours": "auto", "expected_dropout": 0.1, "dropout": {"masked_input": 0.1}}, 30.0),
}


def scenario(n: int, rounds: int, out: str, secure: dict | None) -> dict:
    return {
        "name": "bench-secagg-engine", "seed": 0, "num_clients": n, "rounds": rounds,
        "data": {"source": "synthetic", "num_samples": 25 * n, "num_features": 64, "num_classes": 10},
        "partition": {"kind": "iid"},
        "sampling": {"clients_per_round": n},
        "model": {"kind": "mlp", "hidden": [1350]},
        "training": {"epochs": 1, "batch_size": 16, "lr": 0.05},
        "evaluation": {"every": rounds},
        "executor": {"num_workers": 2, "num_cpus": 1, "clients_per_call": max(5, n // 20)},
        "secure_aggregation": secure,
        "tracking": {"progress": False, "wandb": "disabled"}, "output": {"dir": out, "overwrite": True},
    }


def seconds_per_round(raw: dict) -> float:
    result = raysim.run(raw)
    return float(np.mean(result.round_seconds[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="full,drop,plus")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    first_ratio = None
    with tempfile.TemporaryDirectory() as out, raysim.Session():
        for row in args.rows.split(","):
            n, secure, target = ROWS[row]
            plain = seconds_per_round(scenario(n, args.rounds, out, None))
            masked = seconds_per_round(scenario(n, args.rounds, out, secure))
            ratio = masked / plain
            first_ratio = ratio if first_ratio is None else first_ratio
            verdict = "met" if masked <= target else "NOT MET"
            print(f"{row}: n = {n}: secure {masked:.2f} s/round, plain {plain:.2f} s/round ({ratio:.1f}x); "
                  f"target <= {target:g} s: {verdict}; load average {os.getloadavg()[0]:.2f}")
    print(f"secagg_engine_ratio: {first_ratio:.2f}")


if __name__ == "__main__":
    main()
