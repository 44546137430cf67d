"""Robustness study: FedAvg against Byzantine-robust rules under five attacks (issue 10).

FedAvg (the sample-weighted mean), the coordinate-wise median and the trimmed mean (Yin et al. 2018)
and Krum (Blanchard et al. 2017) aggregate the updates of 30 clients per round on the built-in
``synthetic`` set under a Dirichlet(0.5) label split, while a seeded 0%, 10% or 30% of the population
is malicious (``raysim.adversary``) and runs one attack:

* ``sign_flip``: Δ ← −s·Δ (reversed gradient, Fang et al. 2020), s = ``--sign-scale``;
* ``scaling``: Δ ← 10·Δ (boosting, Bhagoji et al. 2019);
* ``noise``: Δ replaced by N(0, 1) noise (Blanchard et al. 2017, §5);
* ``label_flip``: y ← C − 1 − y before local training (Tolpegin et al. 2020);
* ``backdoor``: half of a malicious client's samples get a trigger and the target label 0
  (Bagdasaryan et al. 2020); backdoor accuracy is the share of triggered test samples classified 0.

The trimmed mean drops β = the attacker fraction at each end (0.1 with no attackers); Krum's f is the
expected number of attackers per round, round(fraction × clients per round). The 0% column is one run
per rule, with an adversary block of fraction 0 so the backdoor test set is still measured (no
client is malicious, so training is that of a run with no adversary block). A run whose every update
turns NaN/Inf stops with the engine's ScenarioError and is shown as "diverged".

The study prints one Markdown table per attack (rows: rules; columns: attacker fraction), writes
them to ``<out>/robustness.md`` (a hand-written reading below the reading marker line is kept),
and ends with ``robustness_study_runs: N``.

Usage: OMP_NUM_THREADS=1 python scripts/study_robustness.py [--rounds 25] [--seed 0] [--sign-scale 10]
       [--out docs/studies]
"""

from __future__ import annotations

import time
from typing import Any

from studylib import command_line, local_ray, provenance, run_once, study_parser, write_report

CLIENTS_PER_ROUND = 30
FRACTIONS = (0.0, 0.1, 0.3)
RULES = ("mean", "median", "trimmed_mean", "krum")
RULE_NAMES = {"mean": "FedAvg (mean)", "median": "median", "trimmed_mean": "trimmed mean (β = fraction)",
              "krum": "Krum (f = expected attackers)"}
ATTACKS = ("sign_flip", "scaling", "noise", "label_flip", "backdoor")

Cell = dict[str, Any]  # accuracy, backdoor accuracy, malicious clients per round (mean, max), or error


def aggregation(rule: str, fraction: float) -> dict[str, Any]:
    """The aggregation block: β and f follow the attacker fraction."""
    if rule == "trimmed_mean":
        return {"rule": rule, "trim_fraction": fraction or 0.1}
    if rule == "krum":
        return {"rule": rule, "byzantine": round(fraction * CLIENTS_PER_ROUND)}
    return {"rule": rule}


def scenario(rounds: int, seed: int, rule: str, fraction: float, attack: str, sign_scale: float) -> dict[str, Any]:
    """The study's scenario as a plain mapping."""
    adversary: dict[str, Any] = {"fraction": fraction, "attack": attack}
    if attack == "sign_flip":
        adversary["scale"] = sign_scale
    elif attack == "scaling":
        adversary["scale"] = 10.0
    elif attack == "noise":
        adversary["noise_std"] = 1.0
    return {
        "name": "study-robustness", "seed": seed, "num_clients": 200, "rounds": rounds,
        "data": {"source": "synthetic", "num_samples": 20_000, "num_features": 32, "num_classes": 10},
        "partition": {"kind": "dirichlet", "alpha": 0.5},
        "sampling": {"kind": "uniform", "clients_per_round": CLIENTS_PER_ROUND},
        "model": {"kind": "mlp", "hidden": [64]},
        "training": {"epochs": 1, "batch_size": 32, "lr": 0.1},
        "strategy": {"name": "fedavg"},
        "aggregation": aggregation(rule, fraction),
        "adversary": adversary,
        "executor": {"num_workers": 2, "num_cpus": 1, "clients_per_call": 15},
        "tracking": {"wandb": "disabled", "progress": False},
    }


def run_one(rounds: int, seed: int, rule: str, fraction: float, attack: str, sign_scale: float) -> Cell:
    """One run's final metrics, or the engine's error message."""
    from raysim.errors import ScenarioError

    try:
        result, _ = run_once(scenario(rounds, seed, rule, fraction, attack, sign_scale))
    except ScenarioError as err:
        return {"error": str(err)}
    final = result.summary["final"]
    malicious = [int(h.get("malicious", 0)) for h in result.history]
    return {"accuracy": float(final["accuracy"]), "backdoor": final.get("backdoor_accuracy"),
            "malicious_mean": sum(malicious) / len(malicious), "malicious_max": max(malicious)}


def run_grid(rounds: int, seed: int, sign_scale: float) -> dict[str, dict[str, dict[float, Cell]]]:
    """``cells[attack][rule][fraction]``; the 0% runs are shared by every attack."""
    cells: dict[str, dict[str, dict[float, Cell]]] = {a: {r: {} for r in RULES} for a in ATTACKS}
    for rule in RULES:
        for attack in (None, *ATTACKS):  # None: the 0% run
            for fraction in ((0.0,) if attack is None else FRACTIONS[1:]):
                tick = time.perf_counter()
                cell = run_one(rounds, seed, rule, fraction, attack or "backdoor", sign_scale)
                for target in ATTACKS if attack is None else (attack,):
                    cells[target][rule][fraction] = cell
                print(f"{rule:<13} {attack or 'none':<10} {fraction:.0%}: {progress_text(cell)} "
                      f"({time.perf_counter() - tick:.1f} s)", flush=True)
    return cells


def progress_text(cell: Cell) -> str:
    if "error" in cell:
        return cell["error"]
    backdoor = "" if cell["backdoor"] is None else f" backdoor={cell['backdoor']:.4f}"
    return (f"acc={cell['accuracy']:.4f}{backdoor} "
            f"malicious/round mean={cell['malicious_mean']:.1f} max={cell['malicious_max']}")


def cell_text(cell: Cell, backdoor: bool) -> str:
    if "error" in cell:
        return "diverged"
    text = f"{100 * cell['accuracy']:.1f}"
    if backdoor and cell["backdoor"] is not None:
        text += f" / {100 * cell['backdoor']:.1f}"
    return text


def tables(cells: dict[str, dict[str, dict[float, Cell]]], sign_scale: float) -> str:
    """One Markdown table per attack: rows are rules, columns attacker fractions."""
    titles = {"sign_flip": f"sign_flip (Δ ← −{sign_scale:g}·Δ)", "scaling": "scaling (Δ ← 10·Δ)",
              "noise": "noise (Δ ← N(0, 1))", "label_flip": "label_flip (y ← 9 − y)",
              "backdoor": "backdoor (trigger on the last 3 features = 3.0, target 0, half the samples)"}
    blocks = []
    for attack in ATTACKS:
        backdoor = attack == "backdoor"
        what = "test accuracy % / backdoor accuracy %" if backdoor else "test accuracy %"
        header = [f"**{titles[attack]}**: final {what}", "",
                  "| rule | " + " | ".join(f"{f:.0%} attackers" for f in FRACTIONS) + " |",
                  "|---|" + "---:|" * len(FRACTIONS)]
        rows = [f"| {RULE_NAMES[rule]} | " + " | ".join(cell_text(cells[attack][rule][f], backdoor) for f in FRACTIONS)
                + " |" for rule in RULES]
        blocks.append("\n".join(header + rows))
    return "\n\n".join(blocks)


def errors_text(cells: dict[str, dict[str, dict[float, Cell]]]) -> str:
    """The engine's message for every run that stopped, so a "diverged" cell can be checked."""
    lines = [f"- {attack}, {rule}, {f:.0%}: {cell['error']}" for attack, by_rule in cells.items()
             for rule, by_fraction in by_rule.items() for f, cell in by_fraction.items()
             if "error" in cell and (f > 0 or attack == ATTACKS[0])]
    return ("Runs that stopped:\n\n" + "\n".join(lines)) if lines else ""


def attackers_text(cells: dict[str, dict[str, dict[float, Cell]]]) -> str:
    """The malicious clients actually sampled per round, over every run that finished."""
    parts = []
    for fraction in FRACTIONS[1:]:
        done = [by[fraction] for by_rule in cells.values() for by in by_rule.values() if "error" not in by[fraction]]
        if done:
            mean = sum(c["malicious_mean"] for c in done) / len(done)
            parts.append(f"{fraction:.0%}: {mean:.1f} on average (expected {fraction * CLIENTS_PER_ROUND:g}), "
                         f"at most {max(c['malicious_max'] for c in done)}")
    return "Malicious clients among the 30 of a round, " + "; ".join(parts) + "." if parts else ""


def setup_text(rounds: int, seed: int, sign_scale: float) -> str:
    """The settings paragraph, read from the scenario itself."""
    from raysim.config import parse_scenario

    base = parse_scenario(scenario(rounds, seed, "mean", 0.1, "sign_flip", sign_scale))
    data, training = base.data, base.training
    return (
        f"Settings: {base.num_clients} clients of the built-in `{data.source}` set ({data.num_samples:,} samples, "
        f"{data.num_features} features, {data.num_classes} classes), Dirichlet α = {base.partition.alpha:g} label "
        f"split, {CLIENTS_PER_ROUND} clients per round (uniform), MLP {base.model.hidden}, {rounds} rounds of "
        f"{training.epochs} local epoch, batch {training.batch_size}, SGD lr {training.lr:g}, server lr "
        f"{base.strategy.server_lr:g}, seed {seed}, one run per cell. The attacker fraction is of the population "
        f"(a seeded set of round(fraction × {base.num_clients}) clients), so the number sampled per round varies. "
        f"FedAvg's mean is sample-weighted; the robust rules are unweighted. Trimmed mean: β = 0.1 at 0% and 10%, "
        f"0.3 at 30% (⌊β·30⌋ dropped at each end). Krum (m = 1): f = 0, 3, 9. Attacks: sign_flip scale "
        f"{sign_scale:g}, scaling 10, noise std 1, label_flip, backdoor (trigger_size 3, trigger_value 3.0, "
        f"target_label 0, poison_fraction 0.5). The 0% column is one run per rule, shared by all five tables; it "
        f"carries an adversary block of fraction 0 so that the backdoor table has a baseline (the share of "
        f"triggered non-0 test samples the clean model already calls 0). Cells are the final round's central "
        f"test accuracy."
    )


def main() -> None:
    parser = study_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sign-scale", type=float, default=10.0, help="s in the sign_flip attack Δ ← −s·Δ")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with local_ray(single_thread=True) as session:
        cells = run_grid(args.rounds, args.seed, args.sign_scale)
    body = "\n\n".join(part for part in (tables(cells, args.sign_scale), attackers_text(cells), errors_text(cells))
                       if part)
    setup = f"{provenance(command_line(), session)}\n\n{setup_text(args.rounds, args.seed, args.sign_scale)}"
    write_report(args.out / "robustness.md", f"# Robustness study: aggregation rules under attack\n\n{setup}\n\n{body}",
                 __file__)
    print(body)
    print(f"grid_minutes: {session.minutes:.1f}")
    print(f"robustness_study_runs: {len(RULES) * (1 + len(ATTACKS) * (len(FRACTIONS) - 1))}")


if __name__ == "__main__":
    main()
