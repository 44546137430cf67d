"""Start-up: the whole-process wall time of a small `raysim run`, against a bare `ray.init(); ray.shutdown()`.

The scenario is the one a new user tries first: 1,000 Dirichlet(0.5) clients, 50 a round, an MLP
64-128-10 over 60,000 x 64 synthetic samples, 30 rounds. Each side runs as its own process, once
untimed (the disk cache), then ``--repeats`` times alternating, and the medians are reported:

    startup_overhead_s = raysim's time to its first round - the bare process's time to ray.init returning
    whole_process_s    = raysim's whole process

Both times to an event count from the process's start (/proc). Targets: startup_overhead_s <= 1.0 and
whole_process_s <= 6.0 on 2 cores. raysim's own start-up table (``raysim run --profile-startup``) of
the last timed run is printed first. Usage: python scripts/bench_startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SCENARIO = {
    "name": "startup", "seed": 1, "num_clients": 1000, "rounds": 30,
    "data": {"source": "synthetic", "num_samples": 60000, "num_features": 64, "num_classes": 10},
    "partition": {"kind": "dirichlet", "alpha": 0.5},
    "sampling": {"clients_per_round": 50},
    "model": {"kind": "mlp", "hidden": [128]},
    "training": {"epochs": 1, "batch_size": 32, "lr": 0.05},
    "tracking": {"wandb": "disabled", "progress": False},
}

BARE = """
import time
from raysim.engine.startup import process_start  # a few milliseconds: no ray, no torch
import ray
ray.init(include_dashboard=False, log_to_driver=False)
print(time.time() - process_start())
ray.shutdown()
"""

ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "disabled"}


def bare() -> tuple[float, float]:
    """(the process's time to ray.init returning, its whole wall time)."""
    tick = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", BARE], env=ENV, check=True,
                         capture_output=True, text=True).stdout
    return float(out.split()[-1]), time.perf_counter() - tick


def raysim_run(path: Path, out: Path) -> tuple[float, float, str]:
    """(raysim's time to its first round, its whole wall time, its start-up table)."""
    tick = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "raysim.cli", "run", str(path), "--profile-startup",
                           "--set", f"output.dir={out}"], env=ENV, capture_output=True, text=True)
    whole = time.perf_counter() - tick
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    run_dir = Path(proc.stdout.rsplit("results in ", 1)[1].strip())
    startup = json.loads((run_dir / "summary.json").read_text())["startup"]
    table = proc.stderr[proc.stderr.index("start-up phase"):]
    return startup["first round"]["start"], whole, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "startup.yaml"
        path.write_text(yaml.safe_dump(SCENARIO))
        bare(), raysim_run(path, Path(tmp) / "results")  # untimed: the disk cache
        init, bare_whole, first, whole = [], [], [], []
        for _ in range(args.repeats):
            a, b = bare()
            init.append(a), bare_whole.append(b)
            c, d, table = raysim_run(path, Path(tmp) / "results")
            first.append(c), whole.append(d)
    med = statistics.median
    print(table.rstrip())
    print(f"bare ray.init process: ray.init returned at {med(init):.2f} s, whole process {med(bare_whole):.2f} s")
    print(f"raysim run: first round at {med(first):.2f} s, whole process {med(whole):.2f} s "
          f"(medians of {args.repeats}; load average {os.getloadavg()[0]:.2f})")
    print(f"startup_overhead_s: {med(first) - med(init):.2f}")
    print(f"whole_process_s: {med(whole):.2f}")


if __name__ == "__main__":
    main()
