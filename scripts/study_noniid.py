"""Non-IID study: FedAvg, FedProx and SCAFFOLD as label skew grows (issue 3).

Runs FedAvg (McMahan et al. 2017), FedProx with mu in {0.01, 0.1, 1} (Li et al., MLSys 2020) and
SCAFFOLD option II (Karimireddy et al., ICML 2020) on the base scenario ``scenarios/noniid_study.yaml``
(100 clients of the built-in synthetic set, 10 per round) under a Dirichlet(alpha) label split
(Hsu et al. 2019) with alpha in {0.05, 0.5, 100}, for three seeds each. The seed changes the data, the
partition, the initial model and the client sampling together.

For every (alpha, method) it reports the final central test accuracy (mean and sample standard
deviation over seeds) and the first round at which accuracy reaches ``--target`` (mean over the seeds
that reach it, with how many did). It prints a Markdown table, writes it to ``<out>/noniid.md`` with
the accuracy curves in ``<out>/noniid.json``, and draws ``<out>/noniid.png`` (accuracy against round,
one panel per alpha, mean over seeds). ``--replot`` rebuilds the table and plot from the saved curves
without training. A hand-written reading below the reading marker line of an existing
``noniid.md`` is kept. The last line printed is ``noniid_study_runs: N``.

Usage: python scripts/study_noniid.py [--rounds 50] [--seeds 0 1 2] [--target 0.9] [--out docs/studies] [--replot]
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from studylib import local_ray, mean_std, pyplot, run_once, study_parser, write_report

BASE = Path(__file__).resolve().parent.parent / "scenarios" / "noniid_study.yaml"
ALPHAS = (0.05, 0.5, 100.0)
METHODS: dict[str, list[str]] = {
    "FedAvg": ["strategy.name=fedavg"],
    "FedProx mu=0.01": ["strategy.name=fedprox", "strategy.mu=0.01"],
    "FedProx mu=0.1": ["strategy.name=fedprox", "strategy.mu=0.1"],
    "FedProx mu=1": ["strategy.name=fedprox", "strategy.mu=1"],
    "SCAFFOLD": ["strategy.name=scaffold"],
}


def run_grid(rounds: int, seeds: list[int]) -> dict[str, dict[str, list[list[float]]]]:
    """Accuracy curves ``curves[alpha][method][seed_index]``, one run per cell of the grid."""
    curves: dict[str, dict[str, list[list[float]]]] = {}
    for alpha in ALPHAS:
        for method, overrides in METHODS.items():
            for seed in seeds:
                result, seconds = run_once(BASE, [*overrides, f"partition.alpha={alpha}", f"seed={seed}",
                                                  f"rounds={rounds}"])
                accuracy = [float(h["accuracy"]) for h in result.history]
                curves.setdefault(f"{alpha:g}", {}).setdefault(method, []).append(accuracy)
                print(f"alpha={alpha:g} {method:<16} seed={seed} final={accuracy[-1]:.4f} "
                      f"({seconds:.1f} s)", flush=True)
    return curves


def rounds_to_target(curve: list[float], target: float) -> int | None:
    """The first round (1-based) whose accuracy is at least ``target``, or None if none is."""
    return next((r + 1 for r, acc in enumerate(curve) if acc >= target), None)


def table(curves: dict[str, dict[str, list[list[float]]]], target: float) -> str:
    """The Markdown results table: one row per (alpha, method)."""
    lines = [
        f"| alpha | method | final accuracy (mean ± std) | rounds to {target:.0%} (mean, reached) |",
        "|---:|---|---:|---:|",
    ]
    for alpha, by_method in curves.items():
        for method, runs in by_method.items():
            mean, std = mean_std([run[-1] for run in runs])
            hits = [r for r in (rounds_to_target(run, target) for run in runs) if r is not None]
            reach = f"{statistics.fmean(hits):.1f} ({len(hits)}/{len(runs)})" if hits else f"— (0/{len(runs)})"
            lines.append(f"| {alpha} | {method} | {100 * mean:.2f} ± {100 * std:.2f} | {reach} |")
    return "\n".join(lines)


def plot(curves: dict[str, dict[str, list[list[float]]]], target: float, path: Path) -> None:
    """Accuracy against round, one panel per alpha, the mean over seeds per method."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), sharey=True)
    for ax, (alpha, by_method) in zip(np.atleast_1d(axes), curves.items()):
        for method, runs in by_method.items():
            mean = np.mean(np.asarray(runs), axis=0)
            ax.plot(np.arange(1, mean.size + 1), mean, label=method, linewidth=1.3)
        ax.axhline(target, color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(f"Dirichlet alpha = {alpha}")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("test accuracy (mean of seeds)")
    np.atleast_1d(axes)[0].set_ylim(0.2, 1.0)
    np.atleast_1d(axes)[-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def setup_text(rounds: int, seeds: list[int], target: float, minutes: float | None) -> str:
    """One paragraph describing the grid, read from the base scenario so it cannot go stale."""
    from raysim.config import load_scenario

    base = load_scenario(BASE)
    data, training = base.data, base.training
    took = f" The grid took {minutes:.1f} min." if minutes is not None else ""
    return (
        f"Generated by `python scripts/study_noniid.py` from `scenarios/noniid_study.yaml`: {base.num_clients} "
        f"clients of the built-in `{data.source}` set ({data.num_samples:,} samples, {data.num_features} features, "
        f"{data.num_classes} classes), {base.sampling.clients_per_round} clients per round, "
        f"{base.model.kind.upper()} {base.model.hidden}, {rounds} rounds of {training.epochs} local epochs, batch "
        f"{training.batch_size}, SGD lr {training.lr:g}, server lr {base.strategy.server_lr:g}, "
        f"aggregation weighted by `client_weighting: {base.strategy.client_weighting}`, "
        f"Dirichlet min_size {base.partition.min_size}. "
        f"Seeds {', '.join(map(str, seeds))}; each seed redraws the data, the partition, the initial model and "
        f"the client sampling. Accuracy is the global model's central test accuracy after each round; the target "
        f"is a fixed {target:.0%}.{took}"
    )


def main() -> None:
    parser = study_parser(__doc__, replot="noniid.json")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", type=float, default=0.9, help="accuracy target for rounds-to-target")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "noniid.json"

    if args.replot:
        record = json.loads(saved.read_text(encoding="utf-8"))
        curves, seeds, minutes = record["accuracy"], record["seeds"], record.get("minutes")
    else:
        with local_ray() as session:
            curves = run_grid(args.rounds, args.seeds)
        seeds, minutes = args.seeds, session.minutes
        rounded = {a: {m: [[round(v, 4) for v in run] for run in runs] for m, runs in by.items()}
                   for a, by in curves.items()}
        record = {"seeds": seeds, "minutes": round(minutes, 2), "accuracy": rounded}
        saved.write_text(json.dumps(record) + "\n", encoding="utf-8")
    rounds = len(next(iter(next(iter(curves.values())).values()))[0])
    results_table = table(curves, args.target)
    setup = setup_text(rounds, seeds, args.target, minutes)
    write_report(args.out / "noniid.md", f"# Non-IID study: FedAvg, FedProx and SCAFFOLD under Dirichlet label skew\n\n"
                 f"{setup}\n\n![accuracy against round](noniid.png)\n\n{results_table}", __file__)
    plot(curves, args.target, args.out / "noniid.png")
    print(results_table)
    if minutes is not None:
        print(f"grid_minutes: {minutes:.1f}")
    print(f"noniid_study_runs: {sum(len(runs) for by in curves.values() for runs in by.values())}")


if __name__ == "__main__":
    main()
