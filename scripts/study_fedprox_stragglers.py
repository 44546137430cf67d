"""FedProx against FedAvg with 90% stragglers on Synthetic(1,1) (Li et al., MLSys 2020, Sec. 5.2, Fig. 1).

Runs ``scenarios/fedprox_stragglers.yaml`` three ways:
  * FedAvg that drops the stragglers (the paper's baseline: only full-E clients are aggregated);
  * FedProx mu = 0, which keeps the stragglers' partial work but has no proximal term;
  * FedProx mu = 1, which keeps the partial work and pulls each local model towards the global one.
Stragglers are a seeded 90% of each round's clients that run a uniform 1..E-1 epochs instead of E.

Two curves are recorded per round: ``loss``, the sample-weighted mean of the aggregated clients' local
minibatch losses during their local training, and ``test_loss``, the global model's cross-entropy on the
pooled held-out 20% of every device's samples, which estimates the global objective f(w) = sum_k p_k F_k(w)
the paper plots. It writes ``<out>/fedprox_stragglers.md`` (both losses and the accuracy every 10
rounds, averaged over seeds), ``<out>/fedprox_stragglers.json`` (every curve) and
``<out>/fedprox_stragglers.png``; ``--replot`` rebuilds them from the JSON without training. A
hand-written reading below the reading marker of an existing ``.md`` is kept. The last line printed
is ``fedprox_stragglers_runs: N``.

Usage: python scripts/study_fedprox_stragglers.py [--rounds 100] [--seeds 0] [--out docs/studies] [--replot]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from studylib import local_ray, pyplot, run_once, study_parser, write_report

SCENARIO = Path(__file__).resolve().parent.parent / "scenarios" / "fedprox_stragglers.yaml"
METHODS: dict[str, list[str]] = {
    "FedAvg, drops stragglers": ["strategy.name=fedavg", "strategy.mu=0", "training.drop_stragglers=true"],
    "FedProx mu=0, keeps stragglers": ["strategy.name=fedprox", "strategy.mu=0", "training.drop_stragglers=false"],
    "FedProx mu=1, keeps stragglers": ["strategy.name=fedprox", "strategy.mu=1", "training.drop_stragglers=false"],
}
CURVES = ("loss", "test_loss", "accuracy")


def run_all(rounds: int, seeds: list[int]) -> dict[str, dict[str, list[list[float]]]]:
    """``curves[method][metric][seed_index]``: one value per round (NaN where a round kept no client)."""
    curves: dict[str, dict[str, list[list[float]]]] = {}
    for method, overrides in METHODS.items():
        for seed in seeds:
            result, seconds = run_once(SCENARIO, [*overrides, f"seed={seed}", f"rounds={rounds}"])
            for metric in CURVES:
                values = [float(h.get(metric, float("nan"))) for h in result.history]
                curves.setdefault(method, {}).setdefault(metric, []).append(values)
            last = result.history[-1]
            print(f"{method:<31} seed={seed} loss={last.get('loss', float('nan')):.4f} "
                  f"test_loss={last['test_loss']:.4f} accuracy={last['accuracy']:.4f} "
                  f"({seconds:.1f} s)", flush=True)
    return curves


def _mean(runs: list[list[float]], r: int) -> float:
    return float(np.nanmean([run[r] for run in runs]))


def table(curves: dict[str, dict[str, list[list[float]]]], rounds: int) -> str:
    """Markdown: for every 10th round, each method's loss / test loss / accuracy (mean over seeds)."""
    checkpoints = sorted({1, *range(10, rounds + 1, 10), rounds})
    head = "| round | " + " | ".join(curves) + " |"
    lines = ["Each cell: training loss / test loss / test accuracy (mean over seeds).", "", head,
             "|---:|" + "---:|" * len(curves)]
    for r in checkpoints:
        cells = [" / ".join(f"{_mean(by[m], r - 1):.3f}" for m in CURVES) for by in curves.values()]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    tail = min(50, rounds)
    lines += ["", f"Stability of the global model's test loss over the last {tail} rounds, computed on each seed's "
              "own curve and averaged over seeds, and the final test loss of each seed:", "",
              "| method | mean | std | largest round-to-round rise | rounds with a rise > 0.1 | final, per seed |",
              "|---|---:|---:|---:|---:|---|"]
    for method, by in curves.items():
        runs = np.asarray(by["test_loss"])[:, -tail:]
        rises = np.diff(runs, axis=1)
        finals = ", ".join(f"{v:.3f}" for v in runs[:, -1])
        lines.append(f"| {method} | {runs.mean():.3f} | {runs.std(axis=1).mean():.3f} | {rises.max(axis=1).mean():.3f} "
                     f"| {(rises > 0.1).sum(axis=1).mean():.1f} | {finals} |")
    return "\n".join(lines)


def plot(curves: dict[str, dict[str, list[list[float]]]], path: Path) -> None:
    """Training loss and test loss against round, the mean over seeds per method."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.5))
    panels = (("loss", "clients' local training loss"), ("test_loss", "global model, test loss"))
    for (metric, title), ax in zip(panels, axes):
        for method, by in curves.items():
            mean = np.nanmean(np.asarray(by[metric]), axis=0)
            ax.plot(np.arange(1, mean.size + 1), mean, label=method, linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("Synthetic(1,1), 90% stragglers, E = 20", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def setup_text(rounds: int, seeds: list[int], minutes: float | None) -> str:
    """One paragraph describing the runs, read from the scenario so it cannot go stale."""
    from raysim.config import load_scenario

    base = load_scenario(SCENARIO)
    data, training = base.data, base.training
    took = f" The runs took {minutes:.1f} min." if minutes is not None else ""
    return (
        f"Generated by `python scripts/study_fedprox_stragglers.py --rounds {rounds} "
        f"--seeds {' '.join(map(str, seeds))}` from `scenarios/fedprox_stragglers.yaml`: {base.num_clients} devices "
        f"of Synthetic({data.alpha:g},{data.beta:g}) "
        f"(natural partition, one client per device), {base.sampling.clients_per_round} per round, multinomial "
        f"logistic regression ({data.num_features} features, {data.num_classes} classes), E = {training.epochs}, "
        f"batch {training.batch_size}, SGD lr {training.lr:g}; {training.straggler_fraction:.0%} of each round's "
        f"clients straggle and run a uniform 1..{training.epochs - 1} epochs. Clients are sampled uniformly and "
        "aggregated weighted by their sample counts. Training loss is the aggregated clients' mean local "
        "minibatch loss during the round; test loss is the global model's cross-entropy on the pooled held-out "
        f"{data.test_fraction:.0%} of every device.{took}"
    )


def main() -> None:
    parser = study_parser(__doc__, replot="fedprox_stragglers.json")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "fedprox_stragglers.json"

    if args.replot:
        record = json.loads(saved.read_text(encoding="utf-8"))
        curves, seeds, minutes = record["curves"], record["seeds"], record.get("minutes")
    else:
        with local_ray() as session:
            curves = run_all(args.rounds, args.seeds)
        seeds, minutes = args.seeds, session.minutes
        rounded = {m: {k: [[round(v, 5) for v in run] for run in runs] for k, runs in by.items()}
                   for m, by in curves.items()}
        record = {"seeds": seeds, "minutes": round(minutes, 2), "curves": rounded}
        saved.write_text(json.dumps(record) + "\n", encoding="utf-8")
    rounds = len(next(iter(curves.values()))["loss"][0])
    results_table = table(curves, rounds)
    write_report(args.out / "fedprox_stragglers.md", "# FedProx with 90% stragglers on Synthetic(1,1)\n\n"
                 f"{setup_text(rounds, seeds, minutes)}\n\n![loss curves](fedprox_stragglers.png)\n\n{results_table}",
                 __file__)
    plot(curves, args.out / "fedprox_stragglers.png")
    print(results_table)
    print(f"fedprox_stragglers_runs: {sum(len(by['loss']) for by in curves.values())}")


if __name__ == "__main__":
    main()
