"""Async against sync FL by virtual time to a target accuracy (FedBuff, Nguyen et al. 2022, §6).

A population of 1,000 clients on the built-in ``synthetic`` set, Dirichlet α = 0.5, with heavy-tailed
lognormal compute speeds (σ = 1, mean 100 samples/s). Three methods train the same number of
clients with the same number training at once (``--concurrency``):

* sync FedAvg: rounds of ``concurrency`` clients; the slowest one sets each round's virtual seconds;
* sync FedAvg with over-selection 1.3: ⌈1.3·concurrency⌉ sampled, the first ``concurrency`` kept
  (Bonawitz et al. 2019; FedScale), the stronger synchronous baseline;
* FedAsync (Xie et al. 2019): each update mixed in on arrival, α = 0.6, s = (1 + d)^−0.5;
* FedBuff: a server step per K = 10 updates weighted by 1/√(1 + d).

Each method's accuracy is evaluated after every ``concurrency`` client updates. The study prints, per
method, the virtual seconds to ``--target`` accuracy, draws accuracy against virtual time to
``docs/studies/async.png`` (the curves in ``async.json`` beside it), and ends with the speed-ups over sync FedAvg (the FedBuff paper reports
about 3×), FedBuff's last.

Usage: python scripts/study_async.py [--clients 3000] [--concurrency 50] [--target 0.85] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from studylib import local_ray, pyplot, run_once


def base(workers: int) -> dict:
    return {
        "name": "study-async", "seed": 0, "num_clients": 1000,
        "data": {"source": "synthetic", "num_samples": 60_000, "num_features": 32, "num_classes": 10},
        "partition": {"kind": "dirichlet", "alpha": 0.5, "min_size": 10},
        "model": {"kind": "mlp", "hidden": [64]},
        "training": {"epochs": 2, "batch_size": 32, "lr": 0.1},
        "system": {"speed": {"kind": "lognormal", "mean": 100, "sigma": 1}},
        "executor": {"num_workers": workers, "num_cpus": 1},
        "tracking": {"progress": False},
    }


def methods(clients: int, concurrency: int, buffer: int) -> dict[str, list[str]]:
    """Overrides per method; each trains ``clients`` clients and is evaluated every ``concurrency`` updates."""
    steps_buff = clients // buffer
    return {
        "sync FedAvg": [f"sampling.clients_per_round={concurrency}", f"rounds={clients // concurrency}"],
        "sync FedAvg, over-selection 1.3": [f"sampling.clients_per_round={concurrency}", "system.over_selection=1.3",
                                            f"rounds={clients // concurrency}"],
        "FedAsync": ["asynchronous.mode=fedasync", f"asynchronous.concurrency={concurrency}", "asynchronous.alpha=0.6",
                     "asynchronous.staleness.kind=polynomial", f"rounds={clients}", f"evaluation.every={concurrency}"],
        f"FedBuff K={buffer}": ["asynchronous.mode=fedbuff", f"asynchronous.concurrency={concurrency}",
                                f"asynchronous.buffer_size={buffer}", f"rounds={steps_buff}",
                                f"evaluation.every={max(1, concurrency // buffer)}"],
    }


def time_to(target: float, curve: list[tuple[float, float]]) -> float:
    """The first virtual time at which accuracy reaches ``target`` (inf if never)."""
    return next((t for t, acc in curve if acc >= target), math.inf)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3000, help="client updates per method")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--buffer", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.85)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="docs/studies/async.png")
    args = parser.parse_args()
    curves: dict[str, list[tuple[float, float]]] = {}
    with local_ray(args.workers):
        for name, overrides in methods(args.clients, args.concurrency, args.buffer).items():
            result, seconds = run_once(base(args.workers), [*overrides, "name=study-async"])
            curves[name] = [(m["virtual_time"], m["accuracy"]) for m in result.history if "accuracy" in m]
            reached = time_to(args.target, curves[name])
            print(f"{name}: final_accuracy {curves[name][-1][1]:.4f}, virtual_seconds_to_{args.target:g} {reached:.1f}, "
                  f"virtual_seconds_total {curves[name][-1][0]:.1f}, wall_seconds {seconds:.1f}")
    figure, axes = pyplot().subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        axes.plot([t for t, _ in curve], [a for _, a in curve], label=name)
    axes.axhline(args.target, color="grey", linestyle=":", linewidth=1, label=f"target {args.target:g}")
    axes.set_xscale("log")
    axes.set(xlabel="virtual time (s, log scale)", ylabel="test accuracy",
             title=f"1,000 clients, lognormal speeds σ=1, Dirichlet α=0.5, {args.concurrency} in flight")
    axes.legend(loc="lower right")
    axes.grid(alpha=0.3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=120, bbox_inches="tight")
    Path(args.out).with_suffix(".json").write_text(json.dumps({"target": args.target, "curves": curves}, indent=1) + "\n")
    reached = {name: time_to(args.target, curve) for name, curve in curves.items()}
    sync, oversel, fedasync, fedbuff = reached.values()
    print(f"plot: {args.out}")
    print(f"fedbuff_speedup_vs_sync_over_selection: {oversel / fedbuff:.2f}")
    print(f"fedasync_speedup_vs_sync: {sync / fedasync:.2f}")
    print(f"fedbuff_speedup_vs_sync: {sync / fedbuff:.2f}")


if __name__ == "__main__":
    main()
