"""Compression study: test accuracy against uploaded bytes for top-k, quantization and sign (issue 10).

FedAvg on the built-in ``synthetic`` set under a Dirichlet(0.5) label split, with each client's
update compressed before upload (``raysim.compression``, exact encoded sizes):

* no compression (dense float32, 5 + 4d bytes);
* top-k at 1% and 10%, each without and with error feedback (Stich et al. 2018; EF as in Seide et
  al. 2014 and Karimireddy et al. 2019): k indices plus k float32 values;
* stochastic uniform quantization at 8 and 4 bits (QSGD-style, Alistarh et al. 2017);
* scaled sign with error feedback (Karimireddy et al. 2019, EF-signSGD): one bit per coordinate.

The download (the dense global model) is the same for every method and is not compressed.
For every method the study reports the final test accuracy (mean ± std over seeds), the total upload,
the compression ratio, the accuracy once a fixed upload budget is spent (``--budget`` of FedAvg's
total) and the upload needed to reach ``--target`` × FedAvg's final accuracy (per seed). It prints
a Markdown table, writes it to ``<out>/compression.md`` (a hand-written reading below the
reading marker line is kept) and draws ``<out>/compression.png``: accuracy against cumulative
uploaded bytes, log x. The last line printed is ``compression_study: ...``, the best method by
bytes to the target.

Usage: OMP_NUM_THREADS=1 python scripts/study_compression.py [--rounds 40] [--seeds 0 1] [--target 0.9]
       [--budget 0.1] [--out docs/studies]
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from studylib import command_line, local_ray, mean_std, provenance, pyplot, run_once, study_parser, write_report

BASELINE = "none (FedAvg)"
METHODS: dict[str, dict[str, Any] | None] = {
    BASELINE: None,
    "top-k 10%": {"kind": "topk", "fraction": 0.1},
    "top-k 10% + EF": {"kind": "topk", "fraction": 0.1, "error_feedback": True},
    "top-k 1%": {"kind": "topk", "fraction": 0.01},
    "top-k 1% + EF": {"kind": "topk", "fraction": 0.01, "error_feedback": True},
    "quantize 8-bit": {"kind": "quantize", "bits": 8},
    "quantize 4-bit": {"kind": "quantize", "bits": 4},
    "sign + EF": {"kind": "sign", "error_feedback": True},
}

Curve = list[tuple[int, float]]  # (cumulative uploaded bytes, test accuracy) after each round


def scenario(rounds: int, seed: int, compression: dict[str, Any] | None) -> dict[str, Any]:
    """The study's scenario as a plain mapping; ``compression`` None is uncompressed FedAvg."""
    raw: dict[str, Any] = {
        "name": "study-compression", "seed": seed, "num_clients": 200, "rounds": rounds,
        "data": {"source": "synthetic", "num_samples": 20_000, "num_features": 32, "num_classes": 10},
        "partition": {"kind": "dirichlet", "alpha": 0.5},
        "sampling": {"kind": "uniform", "clients_per_round": 20},
        "model": {"kind": "mlp", "hidden": [64]},
        "training": {"epochs": 1, "batch_size": 32, "lr": 0.1},
        "strategy": {"name": "fedavg"},
        "executor": {"num_workers": 2, "num_cpus": 1, "clients_per_call": 10},
        "tracking": {"wandb": "disabled", "progress": False},
    }
    if compression is not None:
        raw["compression"] = compression
    return raw


def run_grid(rounds: int, seeds: list[int]) -> tuple[dict[str, list[Curve]], dict[str, list[float]]]:
    """Per method, one (bytes, accuracy) curve per seed, and the last round's compression ratio per seed."""
    curves: dict[str, list[Curve]] = {}
    ratios: dict[str, list[float]] = {}
    for seed in seeds:
        for method, compression in METHODS.items():
            result, seconds = run_once(scenario(rounds, seed, compression))
            curve = [(int(h["bytes_up_total"]), float(h["accuracy"])) for h in result.history]
            curves.setdefault(method, []).append(curve)
            ratios.setdefault(method, []).append(float(result.summary["final"]["compression_ratio"]))
            print(f"seed={seed} {method:<16} final={curve[-1][1]:.4f} upload={curve[-1][0] / 1e6:.3f} MB "
                  f"ratio={ratios[method][-1]:.1f} ({seconds:.1f} s)", flush=True)
    return curves, ratios


def accuracy_within(curve: Curve, budget: float) -> float | None:
    """The accuracy after the last round whose cumulative upload is within ``budget`` bytes (None if none is)."""
    within = [acc for sent, acc in curve if sent <= budget]
    return within[-1] if within else None


def bytes_to(curve: Curve, target: float) -> int | None:
    """The cumulative upload when accuracy first reaches ``target`` (None if it never does)."""
    return next((sent for sent, acc in curve if acc >= target), None)


def summarize(curves: dict[str, list[Curve]], ratios: dict[str, list[float]], target: float,
              budget: float) -> tuple[str, str]:
    """The Markdown table and the closing ``compression_study:`` line."""
    base_runs = curves[BASELINE]
    targets = [target * run[-1][1] for run in base_runs]  # per seed: target × FedAvg's final accuracy
    budgets = [budget * run[-1][0] for run in base_runs]
    base_bytes = [bytes_to(run, t) for run, t in zip(base_runs, targets)]
    budget_mb = statistics.fmean(budgets) / 1e6
    lines = [
        f"| method | final accuracy % (mean ± std) | total upload MB | compression ratio "
        f"| accuracy % at ≤ {budget_mb:.2f} MB uploaded | upload MB to {target:.0%} of FedAvg's final (reached) "
        "| fewer bytes to that target than FedAvg |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    best: tuple[float, str, float, float] | None = None
    for method, runs in curves.items():
        final_mean, final_std = mean_std([run[-1][1] for run in runs])
        total_mb = statistics.fmean(run[-1][0] for run in runs) / 1e6
        fits = [a for a in (accuracy_within(run, b) for run, b in zip(runs, budgets)) if a is not None]
        budget_cell = f"{100 * statistics.fmean(fits):.2f}" if fits else "— (no round fits)"
        if fits and len(fits) < len(runs):
            budget_cell += " (some seeds: no round fits)"
        reached = [(sent, base) for sent, base in ((bytes_to(run, t), b) for run, t, b in zip(runs, targets, base_bytes))
                   if sent is not None]
        if reached:
            reach_cell = f"{statistics.fmean(s for s, _ in reached) / 1e6:.3f} ({len(reached)}/{len(runs)})"
            savings = statistics.fmean(b / s for s, b in reached if b is not None)
            saving_cell = f"{savings:.1f}×"
            if len(reached) == len(runs) and method != BASELINE and (best is None or savings > best[0]):
                best = (savings, method, final_mean, statistics.fmean(targets))
        else:
            reach_cell, saving_cell = f"— (0/{len(runs)})", "—"
        lines.append(f"| {method} | {100 * final_mean:.2f} ± {100 * final_std:.2f} | {total_mb:.3f} "
                     f"| {statistics.fmean(ratios[method]):.1f} | {budget_cell} | {reach_cell} | {saving_cell} |")
    base_final = statistics.fmean(run[-1][1] for run in base_runs)
    if best is None:
        closing = (f"compression_study: no compressed method reached {target:.0%} of FedAvg's final accuracy "
                   "on every seed")
    else:
        savings, method, final, goal = best
        closing = (f"compression_study: {method} reaches {100 * goal:.1f}% ({target:.0%} of FedAvg's final) with "
                   f"{savings:.1f}× fewer upload bytes than FedAvg; "
                   f"final {100 * final:.1f}% vs {100 * base_final:.1f}%")
    return "\n".join(lines), closing


def plot(curves: dict[str, list[Curve]], target: float, path: Path) -> None:
    """Accuracy against cumulative uploaded bytes (log x), seed 0's curve per method."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for method, runs in curves.items():
        sent, acc = np.asarray(runs[0]).T
        ax.plot(sent, acc, label=method, linewidth=1.3,
                linestyle="--" if "EF" not in method and method != BASELINE else "-")
    goal = target * curves[BASELINE][0][-1][1]
    ax.axhline(goal, color="grey", linestyle=":", linewidth=0.8, label=f"{target:.0%} of FedAvg's final")
    ax.set_xscale("log")
    ax.set(xlabel="cumulative uploaded bytes, all clients (log scale)", ylabel="test accuracy",
           title="FedAvg with compressed uploads: synthetic, Dirichlet α = 0.5, 20 of 200 clients per round")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def setup_text(rounds: int, seeds: list[int], target: float, budget: float) -> str:
    """The settings paragraph, read from the scenario itself."""
    from raysim.config import parse_scenario

    base = parse_scenario(scenario(rounds, seeds[0], None))
    data, training = base.data, base.training
    dim = data.num_features * base.model.hidden[0] + base.model.hidden[0] + base.model.hidden[0] * data.num_classes \
        + data.num_classes
    return (
        f"Settings: {base.num_clients} clients of the built-in `{data.source}` set ({data.num_samples:,} samples, "
        f"{data.num_features} features, {data.num_classes} classes), Dirichlet α = {base.partition.alpha:g} label "
        f"split, {base.sampling.clients_per_round} clients per round (uniform), MLP {base.model.hidden} "
        f"(d = {dim:,} parameters, {5 + 4 * dim:,} bytes per dense update), {rounds} rounds of {training.epochs} "
        f"local epoch, batch {training.batch_size}, SGD lr {training.lr:g}, FedAvg (sample-weighted mean, server "
        f"lr {base.strategy.server_lr:g}). Seeds {', '.join(map(str, seeds))}; a seed redraws the data, the "
        f"partition, the initial model, the sampling and the stochastic rounding. Bytes are the exact encoded "
        f"upload sizes summed over all clients (the dense download is the same for every method and not "
        f"counted). The budget column is the accuracy after the last round whose cumulative upload fits in "
        f"{budget:.0%} of FedAvg's total; the target is {target:.0%} of FedAvg's final accuracy on the same seed. "
        f"Top-k sends raw (unscaled) values; the plot shows seed {seeds[0]}, dashed lines are compressors "
        f"without error feedback."
    )


def main() -> None:
    parser = study_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--target", type=float, default=0.9, help="target as a share of FedAvg's final accuracy")
    parser.add_argument("--budget", type=float, default=0.1, help="upload budget as a share of FedAvg's total")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with local_ray(single_thread=True) as session:
        curves, ratios = run_grid(args.rounds, args.seeds)
    results_table, closing = summarize(curves, ratios, args.target, args.budget)
    setup = f"{provenance(command_line(), session)}\n\n{setup_text(args.rounds, args.seeds, args.target, args.budget)}"
    write_report(args.out / "compression.md", "# Compression study: accuracy against uploaded bytes\n\n"
                 f"{setup}\n\n![accuracy against cumulative uploaded bytes](compression.png)\n\n{results_table}",
                 __file__)
    plot(curves, args.target, args.out / "compression.png")
    print(results_table)
    print(f"grid_minutes: {session.minutes:.1f}")
    print(closing)


if __name__ == "__main__":
    main()
