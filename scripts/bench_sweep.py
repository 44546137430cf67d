"""A 24-run sweep: one `raysim sweep` process (one warm session) against 24 fresh `raysim run` processes.

The study is 4 seeds x 6 learning rates over a small scenario (200 Dirichlet clients, 20 a round, an MLP,
3 rounds), the kind of grid a researcher runs before a long one. Both sides run the same 24 scenarios,
each as written by ``raysim sweep --dry-run``'s planner; one untimed ``raysim run`` warms the disk cache
first. ``sweep_speedup`` = the 24 fresh processes' total wall time / the sweep process's wall time.
Target: >= 2. Usage: python scripts/bench_sweep.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from raysim.config import scenario_to_yaml
from raysim.sweep import load_study, plan

BASE = {
    "name": "sweep", "num_clients": 200, "rounds": 3,
    "data": {"source": "synthetic", "num_samples": 12000, "num_features": 16, "num_classes": 5},
    "partition": {"kind": "dirichlet", "alpha": 0.5, "min_size": 5},
    "sampling": {"clients_per_round": 20},
    "model": {"kind": "mlp", "hidden": [32]},
    "training": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "executor": {"num_workers": 2},
    "tracking": {"wandb": "disabled", "progress": False},
}
GRID = {"seed": [1, 2, 3, 4], "training.lr": [0.02, 0.05, 0.1, 0.2, 0.3, 0.5]}
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "disabled"}


def timed(args: list[str]) -> float:
    tick = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "raysim.cli", *args], env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return time.perf_counter() - tick


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        study_path = root / "study.yaml"
        study_path.write_text(yaml.safe_dump({"name": "bench-sweep", "base": BASE, "grid": GRID,
                                              "output": str(root / "sweep")}))
        runs = plan(load_study(study_path))
        paths = []
        for planned in runs:
            path = root / f"{planned.scenario.name}.yaml"
            path.write_text(scenario_to_yaml(planned.scenario))
            paths.append(path)
        timed(["run", str(paths[0]), "--set", f"output.dir={root / 'warm-up'}"])  # untimed
        fresh = sum(timed(["run", str(path), "--set", f"output.dir={root / 'fresh'}"]) for path in paths)
        sweep = timed(["sweep", str(study_path)])
    print(f"{len(runs)} fresh `raysim run` processes: {fresh:.1f} s in all ({fresh / len(runs):.2f} s a run)")
    print(f"one `raysim sweep` process: {sweep:.1f} s ({sweep / len(runs):.2f} s a run); "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"sweep_speedup: {fresh / sweep:.2f}")


if __name__ == "__main__":
    main()
