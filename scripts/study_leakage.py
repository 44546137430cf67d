"""Leakage study: gradient inversion and membership inference against each defence, on what the server saw (issue 20).

Inversion: digits (8×8, in [0, 1]) with the MLP 64-32-10 and the CNN (4 channels), every client holding
exactly ``B`` training samples, one round, 10 clients a round (100 for the larger secure sum), local training
of ``steps`` epochs of one full batch (lr 0.1), and iDLG (labels from the bias gradient, then L-BFGS) run on
the round's recorded server view (``raysim attack``'s ``attack_round``) against one victim; on the CNN,
Geiping et al.'s cosine attack with a total-variation prior too, on the same view. Cells: B ∈ {1, 4,
16} × steps ∈ {1, 5} × defences: none (the victim's own update, ``clients_per_call: 1``); secure aggregation
over 10 and over 100 clients (the survivors' sum); central DP at ε ∈ {1, 8} (the noised aggregate of 10;
z solved for ε over the one round); local DP-SGD at ε ∈ {1, 8} (the victim's own noised update; z solved
for every client's worst case, ``privacy.target_epsilon``). Reported per cell: PSNR of the matched
reconstruction and label accuracy; a picture grid of true samples above reconstructions, one row pair per
defence (MLP, B = 4, one step).

Membership inference, on two models trained to remember their members: synthetic data (64 features, 800
training samples over 5 clients, all of them every round, 10 rounds of 20 epochs, MLP 64-256-10) and
digits (180 training samples over 5 clients, 10 rounds of 50 epochs, MLP 64-512-10; digits generalizes
well, so its members are harder to tell), each under no defence, secure aggregation, central DP at ε ∈
{1, 8} and local DP-SGD at ε = 8; Yeom et al.'s loss-threshold attack, members against held-out samples: AUC, TPR at 1%
FPR, and the largest excess over the (ε, δ) bound, raw and beyond Clopper-Pearson error, with the ROC curves
drawn against their bounds; and the offline LiRA-style attack (Carlini et al. 2022) with 4 shadow models
trained by the simulator on held-out samples that are never targets, on the same members and non-members. Writes ``<out>/leakage.md`` (a hand-written reading below the marker line is
kept), ``leakage.json``, ``leakage_grid.png`` and ``leakage_membership.png``; prints last
``leakage_psnr_gap_db: ...``, the undefended MLP's mean PSNR at B = 1 less the secure sum of 10's.

Usage: OMP_NUM_THREADS=1 python scripts/study_leakage.py [--batches 1 4 16] [--steps 1 5] [--models mlp cnn]
       [--iterations 300] [--out docs/studies] [--replot]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from studylib import command_line, local_ray, provenance, pyplot, saved_results, study_parser, write_report

MODELS = {"mlp": {"kind": "mlp", "hidden": [32]}, "cnn": {"kind": "cnn", "channels": [4]}}
DEFENCES: dict[str, dict[str, Any]] = {
    "none": {},
    "secure sum of 10": {"secure_aggregation": {"threshold": 0.5}},
    "secure sum of 100": {"secure_aggregation": {"threshold": 0.5}, "cohort": 100},
    "central DP, ε = 8": {"privacy": {"mechanism": "central", "target_epsilon": 8.0, "clip_norm": 1.0}},
    "central DP, ε = 1": {"privacy": {"mechanism": "central", "target_epsilon": 1.0, "clip_norm": 1.0}},
    "local DP-SGD, ε = 8": {"privacy": {"mechanism": "local", "target_epsilon": 8.0, "clip_norm": 1.0}},
    "local DP-SGD, ε = 1": {"privacy": {"mechanism": "local", "target_epsilon": 1.0, "clip_norm": 1.0}},
}
ATTACKS = {"mlp": ("idlg",), "cnn": ("idlg", "geiping")}  # Geiping's prior is for image-shaped samples
MEMBERSHIP_DEFENCES = ("none", "secure aggregation", "central DP, ε = 8", "central DP, ε = 1", "local DP-SGD, ε = 8")
MEMBERSHIP_DATA = {  # two models made to remember their members
    "synthetic": {"data": {"source": "synthetic", "num_samples": 1000, "num_features": 64, "num_classes": 10,
                           "test_fraction": 0.8}, "hidden": [256], "epochs": 20, "batch_size": 8},
    "digits": {"data": {"source": "digits", "test_fraction": 0.9}, "hidden": [512], "epochs": 50, "batch_size": 4},
}


def inversion_scenario(model: str, batch: int, steps: int, defence: dict[str, Any], out: str) -> dict[str, Any]:
    cohort = defence.get("cohort", 10)
    raw = {"name": "leak", "seed": 1, "num_clients": 1400 // batch, "rounds": 1,
           "data": {"source": "digits"}, "partition": {"kind": "iid"}, "sampling": {"clients_per_round": cohort},
           "model": MODELS[model], "training": {"epochs": steps, "batch_size": batch, "lr": 0.1},
           "executor": {"num_workers": 2, "num_cpus": 1, "clients_per_call": 1}, "leakage": {"rounds": [1]},
           "tracking": {"wandb": "disabled", "progress": False}, "output": {"dir": out}}
    raw.update({k: v for k, v in defence.items() if k != "cohort"})
    return raw


def inversion_cell(model: str, batch: int, steps: int, defence: str, iterations: int) -> list[dict[str, Any]]:
    """One cell's rows, one per attack; none (and why, printed) where digits has too few samples for it
    (100 clients of 16)."""
    import raysim
    from raysim.engine.attack import attack_round
    from raysim.errors import ScenarioError

    with tempfile.TemporaryDirectory() as out:
        try:
            result = raysim.run(inversion_scenario(model, batch, steps, DEFENCES[defence], out))
        except ScenarioError as err:
            print(f"skipped {model} B={batch} steps={steps} {defence}: {err}", flush=True)
            return []
        rows = []
        for attack in ATTACKS[model]:
            found = attack_round(result.run_dir, 1, attack, iterations=iterations)
            if model == "mlp" and batch == 4 and steps == 1:
                found["grid"] = _grid_row(result.run_dir, defence)
            rows.append({"model": model, "batch": batch, "steps": steps, "defence": defence, "attack": attack,
                         "view": found["view"], "psnr": found["psnr"], "label_accuracy": found["label_accuracy"],
                         "epsilon": (result.summary.get("privacy") or {}).get("epsilon"),
                         **({"grid": found["grid"]} if "grid" in found else {})})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "grid"}), flush=True)
    return rows


def _grid_row(run_dir: Path, defence: str) -> dict[str, Any]:
    """The victim's true samples and their reconstruction, kept for the picture grid."""
    from raysim.adversary.lab import LeakageView, PublicModel, victim_of, reconstruct
    from raysim.data.load import load_data, partition_data
    from raysim.engine.validation import load_and_validate

    scenario = load_and_validate(run_dir / "config.yaml")
    view = LeakageView.load(run_dir, 1)
    index, victim = victim_of(view, None)
    dataset = load_data(scenario)
    part = partition_data(scenario, dataset)
    own = part.indices[part.offsets[victim] : part.offsets[victim + 1]]
    public = PublicModel(scenario.model, tuple(dataset.feature_shape), dataset.num_classes, scenario.training.lr)
    found = reconstruct(view, public, index, len(own), "idlg", 300, scenario.seed, (0.0, 1.0))
    return {"label": defence, "true": dataset.x_train[own].tolist(), "reconstructed": found.x.tolist()}


def membership_cell(data: str, defence: str) -> dict[str, Any]:
    import raysim
    from raysim.engine.attack import membership

    privacy = {"none": None, "secure aggregation": None,
               "central DP, ε = 8": {"mechanism": "central", "target_epsilon": 8.0, "clip_norm": 0.5},
               "central DP, ε = 1": {"mechanism": "central", "target_epsilon": 1.0, "clip_norm": 0.5},
               "local DP-SGD, ε = 8": {"mechanism": "local", "target_epsilon": 8.0, "clip_norm": 1.0}}[defence]
    setup = MEMBERSHIP_DATA[data]
    raw = {"name": "mi", "seed": 0, "num_clients": 5, "rounds": 10, "data": setup["data"],
           "partition": {"kind": "iid"}, "sampling": {"clients_per_round": 5},
           "model": {"kind": "mlp", "hidden": setup["hidden"]},
           "training": {"epochs": setup["epochs"], "batch_size": setup["batch_size"], "lr": 0.1},
           "executor": {"num_workers": 2, "num_cpus": 1, "clients_per_call": 5},
           "tracking": {"wandb": "disabled", "progress": False}}
    if privacy is not None:
        raw["privacy"] = privacy
    if defence == "secure aggregation":
        raw["secure_aggregation"] = {"threshold": 0.5}
    with tempfile.TemporaryDirectory() as out:
        result = raysim.run({**raw, "output": {"dir": out}})
        found = membership(result.run_dir, shadows=4)
    row = {"data": data, "defence": defence, **found, "accuracy": result.final_accuracy}
    print(json.dumps({k: v for k, v in row.items() if not k.startswith("roc")}), flush=True)
    return row


def draw_roc(members: list[dict[str, Any]], path: Path) -> None:
    from raysim.adversary.lab import dp_bound

    plt = pyplot()
    datasets = list(dict.fromkeys(r["data"] for r in members))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 5), squeeze=False)
    grid = np.linspace(0, 1, 201)
    for ax, data in zip(axes[0], datasets):
        for r in (r for r in members if r["data"] == data):
            line, = ax.plot(r["roc_fpr"], r["roc_tpr"], label=f"{r['defence']} (AUC {r['auc']:.2f})")
            if r["epsilon"] is not None:
                ax.plot(grid, dp_bound(grid, r["epsilon"], r["delta"]), linestyle="--", color=line.get_color(), linewidth=1)
        ax.plot(grid, grid, color="grey", linestyle=":")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1),
               title=f"membership inference on {data} (dashed: the (ε, δ) bound)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def draw_grid(rows: list[dict[str, Any]], path: Path) -> None:
    from raysim.adversary.inversion import matched_order
    from raysim.adversary.lab import picture_grid

    picked = [r["grid"] for r in rows if "grid" in r]
    picture_grid([(g["label"], np.asarray(g["true"]), matched_order(np.asarray(g["reconstructed"]), np.asarray(g["true"])))
                  for g in picked], path, columns=4)


def tables(inversion: list[dict[str, Any]], members: list[dict[str, Any]]) -> str:
    lines = ["| model | B | steps | defence | attack | server's view | PSNR (dB) | labels | ε |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in inversion:
        eps = "" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        lines.append(f"| {r['model']} | {r['batch']} | {r['steps']} | {r['defence']} | {r['attack']} | {r['view']} | "
                     f"{r['psnr']:.1f} | {r['label_accuracy']:.2f} | {eps} |")
    lines += ["", "| data | defence | test accuracy | AUC | TPR @ 1% FPR | LiRA AUC | LiRA TPR @ 1% FPR | ε | "
              "max TPR − bound | beyond sampling error (threshold, LiRA) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in members:
        eps = "" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        excess = "" if r["worst_excess"] is None else f"{r['worst_excess']:+.3f}"
        lira = r["lira"]
        significant = "" if r["significant_excess"] is None else \
            f"{r['significant_excess']:+.3f}, {lira['significant_excess']:+.3f}"
        lines.append(f"| {r['data']} | {r['defence']} | {r['accuracy']:.3f} | {r['auc']:.3f} | {r['tpr_at_1pct_fpr']:.3f} | "
                     f"{lira['auc']:.3f} | {lira['tpr_at_1pct_fpr']:.3f} | {eps} | {excess} | {significant} |")
    return "\n".join(lines)


def main() -> None:
    parser = study_parser(__doc__, replot="leakage.json")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--iterations", type=int, default=300)
    args = parser.parse_args()

    def run() -> dict[str, Any]:
        from raysim.engine.session import Session

        with local_ray(single_thread=True) as session, Session():
            inversion = [row for m in args.models for b in args.batches for s in args.steps for d in DEFENCES
                         for row in inversion_cell(m, b, s, d, args.iterations)]
            members = [membership_cell(data, d) for data in MEMBERSHIP_DATA for d in MEMBERSHIP_DEFENCES]
        return {"inversion": inversion, "membership": members, "provenance": provenance(command_line(), session)}

    data = saved_results(args, run)
    draw_grid(data["inversion"], args.out / "leakage_grid.png")
    draw_roc(data["membership"], args.out / "leakage_membership.png")
    write_report(args.out / "leakage.md", f"# Leakage: what the server can reconstruct and infer\n\n{data['provenance']}\n\n"
                 f"{chr(10).join(__doc__.split(chr(10) * 2)[1:3])}\n\n![true samples above iDLG's reconstructions, by "
                 f"defence](leakage_grid.png)\n\n![membership-inference ROC against the DP bound](leakage_membership.png)\n\n"
                 f"{tables(data['inversion'], data['membership'])}", __file__)
    first = data["inversion"][0]
    cells: dict[str, list[float]] = {}
    for r in data["inversion"]:
        if r["model"] == first["model"] and r["batch"] == first["batch"] and r["attack"] == "idlg":
            cells.setdefault(r["defence"], []).append(r["psnr"])
    print(f"leakage_psnr_gap_db: {np.mean(cells['none']) - np.mean(cells['secure sum of 10']):.1f}")


if __name__ == "__main__":
    main()
