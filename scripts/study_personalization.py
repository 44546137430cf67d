"""Personalization study: per-client accuracy of FedAvg, FedAvg + FT, FedPer, Ditto and APFL under label skew (issue 21).

Each cell trains one method on one dataset and Dirichlet(α) label split with one seed, through the engine, and
evaluates every client on its own held-out samples (20% of them) after the last round:

* ``synthetic`` (32 features, 10 classes, 20,000 samples) over 50 clients, 10 a round, an MLP 32-64-10;
* ``digits`` (scikit-learn's 8×8 digits, 1,797 samples) over 20 clients, 5 a round, an MLP 64-64-10;

the split is NIID-Bench's balanced Dirichlet (``balance: true``, at least 5 samples a client), since the
plain draw leaves some client nearly empty at α = 0.05 on these sizes;
30 rounds of 2 local epochs (batch 32, lr 0.1). Methods: FedAvg (``finetune`` with 0 epochs: the global
model evaluated per client), FedAvg + FT (1 epoch of fine-tuning), FedPer (the head personal), Ditto
(λ = 0.1) and APFL (α = 0.5). It reports the mean and the p10 of per-client accuracy, as mean ± std over
the seeds, writes ``<out>/personalization.md`` (a hand-written reading below the marker line is kept),
``<out>/personalization.json`` and ``<out>/personalization.png``, and prints last
``personalization: ...``, the best method's mean per-client accuracy over FedAvg's at the strongest skew
on synthetic.

Usage: OMP_NUM_THREADS=1 python scripts/study_personalization.py [--alphas 0.05 0.5 100] [--seeds 0 1 2]
       [--datasets synthetic digits] [--rounds 30] [--out docs/studies] [--replot]
"""

from __future__ import annotations

import json
from typing import Any

from studylib import (command_line, local_ray, mean_std, provenance, pyplot, run_once, saved_results, study_parser,
                      write_report)

METHODS: dict[str, dict[str, Any]] = {
    "FedAvg": {"method": "finetune", "finetune_epochs": 0},
    "FedAvg + FT": {"method": "finetune", "finetune_epochs": 1},
    "FedPer": {"method": "fedper"},
    "Ditto": {"method": "ditto", "lam": 0.1},
    "APFL": {"method": "apfl", "alpha": 0.5},
}
DATASETS: dict[str, dict[str, Any]] = {
    "synthetic": {"data": {"source": "synthetic", "num_samples": 20_000, "num_features": 32, "num_classes": 10},
                  "num_clients": 50, "clients_per_round": 10, "min_size": 5},
    "digits": {"data": {"source": "digits"}, "num_clients": 20, "clients_per_round": 5, "min_size": 5},
}


def scenario(dataset: str, alpha: float, seed: int, rounds: int, method: dict[str, Any]) -> dict[str, Any]:
    spec = DATASETS[dataset]
    return {
        "name": "study-personalization", "seed": seed, "num_clients": spec["num_clients"], "rounds": rounds,
        "data": spec["data"], "partition": {"kind": "dirichlet", "alpha": alpha, "min_size": spec["min_size"], "balance": True},
        "sampling": {"kind": "uniform", "clients_per_round": spec["clients_per_round"]},
        "model": {"kind": "mlp", "hidden": [64]},
        "training": {"epochs": 2, "batch_size": 32, "lr": 0.1},
        "evaluation": {"every": rounds, "federated": True, "federated_clients": spec["num_clients"],
                       "holdout_fraction": 0.2},
        "executor": {"num_workers": 2, "num_cpus": 1, "clients_per_call": 5},
        "personalization": method,
        "tracking": {"wandb": "disabled"},
    }


def run_grid(datasets: list[str], alphas: list[float], seeds: list[int], rounds: int) -> list[dict[str, Any]]:
    from raysim.engine.session import Session

    rows = []
    with Session():  # one warm pool of workers for every run
        for dataset in datasets:
            for alpha in alphas:
                for seed in seeds:
                    for name, method in METHODS.items():
                        result, seconds = run_once(scenario(dataset, alpha, seed, rounds, method))
                        last = result.history[-1]
                        row = {"dataset": dataset, "alpha": alpha, "seed": seed, "method": name,
                               "mean": last["personal_accuracy_mean"], "p10": last["personal_accuracy_p10"],
                               "p50": last["personal_accuracy_p50"], "beats_global": last["personal_beats_global"],
                               "global_mean": last["personal_global_accuracy_mean"], "seconds": seconds,
                               "accuracies": last["personal_accuracies"]}
                        print(json.dumps({k: v for k, v in row.items() if k != "accuracies"}), flush=True)
                        rows.append(row)
    return rows


def summary(rows: list[dict[str, Any]]) -> str:
    lines = ["| dataset | α | method | mean per-client accuracy | p10 | beats its global model |",
             "|---|---|---|---|---|---|"]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        for alpha in sorted({r["alpha"] for r in rows if r["dataset"] == dataset}):
            for method in METHODS:
                cell = [r for r in rows if (r["dataset"], r["alpha"], r["method"]) == (dataset, alpha, method)]
                if not cell:
                    continue
                mean, mean_sd = mean_std([r["mean"] for r in cell])
                p10, p10_sd = mean_std([r["p10"] for r in cell])
                beats = sum(r["beats_global"] for r in cell) / len(cell)
                lines.append(f"| {dataset} | {alpha:g} | {method} | {mean:.3f} ± {mean_sd:.3f} | {p10:.3f} ± {p10_sd:.3f} "
                             f"| {beats:.0%} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Any) -> None:
    plt = pyplot()
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(2, len(datasets), figsize=(5.5 * len(datasets), 7), squeeze=False)
    for column, dataset in enumerate(datasets):
        alphas = sorted({r["alpha"] for r in rows if r["dataset"] == dataset})
        for row, key in enumerate(("mean", "p10")):
            axis = axes[row][column]
            for method in METHODS:
                values = [mean_std([r[key] for r in rows if (r["dataset"], r["alpha"], r["method"]) == (dataset, a, method)]
                                   or [float("nan")])[0] for a in alphas]
                axis.plot(alphas, values, marker="o", label=method)
            axis.set_xscale("log"), axis.set_xlabel("Dirichlet α"), axis.grid(alpha=0.3)
            axis.set_title(f"{dataset}: {'mean' if key == 'mean' else 'p10'} per-client accuracy")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = study_parser(__doc__, replot="personalization.json")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.05, 0.5, 100.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()

    def run() -> dict[str, Any]:
        with local_ray(single_thread=True) as session:
            rows = run_grid(args.datasets, args.alphas, args.seeds, args.rounds)
        return {"rows": rows, "provenance": provenance(command_line(), session)}

    data = saved_results(args, run)
    rows = data["rows"]
    write_report(args.out / "personalization.md",
                 f"# Personalization: per-client accuracy under label skew\n\n{data['provenance']}\n\n"
                 f"{chr(10).join(__doc__.split(chr(10) * 2)[1:4])}\n\n![mean and p10 per-client accuracy against α](personalization.png)"
                 f"\n\n{summary(rows)}", __file__)
    plot(rows, args.out / "personalization.png")
    strongest = min(r["alpha"] for r in rows)
    first = rows[0]["dataset"]
    means = {m: mean_std([r["mean"] for r in rows if (r["dataset"], r["alpha"], r["method"]) == (first, strongest, m)])[0]
             for m in METHODS if any(r["method"] == m for r in rows)}
    best = max((m for m in means if m != "FedAvg"), key=means.get)
    print(f"personalization: {means[best] / means['FedAvg']:.2f}")


if __name__ == "__main__":
    main()
