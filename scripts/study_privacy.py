"""Privacy study: accuracy against ε for central DP-FedAvg (fixed and adaptive clip) and local DP-SGD (issue 6).

The setting of issue 6: the built-in ``synthetic`` set split over a population of 10,000 clients by a
Dirichlet(0.5) label partition (Hsu et al. 2019), Poisson client sampling at q = 0.01 (about 100
clients a round), an MLP, one local epoch of batch 16. It sweeps the noise multiplier z of

* central user-level DP-FedAvg (McMahan et al., ICLR 2018) with a fixed clip S;
* the same with adaptive clipping (Andrew et al., NeurIPS 2021), started from an untuned C = 1 and
  tracking the median update norm;
* local sample-level DP-SGD (Abadi et al., CCS 2016) through Opacus inside every client.

The two fixed clips (S = 0.3 for a client's delta, 5 for an example's gradient) were picked from a few
probe runs on this same data, a tuning step whose own privacy cost is not accounted. It adds two
references: FedAvg without privacy (sample-weighted, as usual) and "clipping only":
DP-FedAvg's estimator with z = 0 (equal user weights, fixed denominator qW, clip S), which separates
what the clip costs from what the noise costs. ε is what raysim reports at δ = 1e-5 with Opacus's RDP
accountant; for the central rows the PRV accountant's ε for the same (z, q, rounds) is added, since
RDP's figure bottoms out near 0.1 over its default orders. Central ε is user-level; local ε is
sample-level, per client (the worst client's), and the two are not comparable guarantees.

It prints a Markdown table, writes it to ``<out>/privacy.md`` with the results in
``<out>/privacy.json``, and draws ``<out>/privacy.png`` (accuracy against ε, one line per mechanism).
``--replot`` rebuilds the table and plot from the saved results without training. A hand-written
reading below the reading marker line of an existing ``privacy.md`` is kept. The last line printed
is ``privacy_study_runs: N``.

Usage: python scripts/study_privacy.py [--rounds 50] [--z 0.5 1 2 4 8] [--z-local 0.5 1 2 4]
       [--clip 0.3] [--local-clip 5] [--out docs/studies] [--replot]
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from studylib import local_ray, pyplot, run_once, saved_results, study_parser, write_report

DELTA = 1e-5
SAMPLE_RATE = 0.01
SETTING: dict[str, Any] = {
    "name": "privacy_study", "seed": 0, "num_clients": 10_000,
    "data": {"source": "synthetic", "num_samples": 200_000, "num_features": 32, "num_classes": 10},
    "partition": {"kind": "dirichlet", "alpha": 0.5, "min_size": 0},
    "sampling": {"kind": "poisson", "rate": SAMPLE_RATE},
    "model": {"kind": "mlp", "hidden": [64]},
    "training": {"epochs": 1, "batch_size": 16, "optimizer": "sgd", "lr": 0.1},
    "strategy": {"name": "fedavg"},
    "executor": {"num_workers": 2, "num_cpus": 1, "clients_per_call": 10},
    "tracking": {"progress": False, "wandb": "disabled"},
}
FEDAVG, CLIP_ONLY = "FedAvg (no privacy)", "central, clipping only (z = 0)"
FIXED, ADAPTIVE, LOCAL = "central, fixed clip", "central, adaptive clip", "local DP-SGD"


def grid(z_central: list[float], z_local: list[float], clip: float,
         local_clip: float) -> list[tuple[str, float | None, list[str]]]:
    """(mechanism, z, overrides) for every run of the study, references first."""
    central = ["privacy.mechanism=central", f"privacy.delta={DELTA}"]
    runs: list[tuple[str, float | None, list[str]]] = [
        (FEDAVG, None, []),
        (CLIP_ONLY, 0.0, [*central, "privacy.noise_multiplier=0", f"privacy.clip_norm={clip}"]),
    ]
    runs += [(FIXED, z, [*central, f"privacy.noise_multiplier={z}", f"privacy.clip_norm={clip}"]) for z in z_central]
    runs += [(ADAPTIVE, z, [*central, f"privacy.noise_multiplier={z}", "privacy.clip_norm=1.0",
                            "privacy.adaptive.target_quantile=0.5", "privacy.adaptive.learning_rate=0.2"])
             for z in z_central]
    runs += [(LOCAL, z, ["privacy.mechanism=local", f"privacy.delta={DELTA}", f"privacy.noise_multiplier={z}",
                         f"privacy.clip_norm={local_clip}"]) for z in z_local]
    return runs


def prv_epsilon(z: float, rounds: int) -> float:
    """ε at δ of ``rounds`` Poisson-subsampled Gaussian steps (z, q) under Opacus's PRV accountant."""
    from raysim.privacy.dp.accountant import PrivacyAccountant

    if z == 0:
        return math.inf
    accountant = PrivacyAccountant("prv", DELTA)
    accountant.step(z, SAMPLE_RATE, rounds)
    return accountant.epsilon()


def run_study(rounds: int, z_central: list[float], z_local: list[float], clip: float,
              local_clip: float) -> list[dict[str, Any]]:
    """One row per run: the mechanism, z, the clip, ε and the final central test accuracy."""
    rows = []
    for mechanism, z, overrides in grid(z_central, z_local, clip, local_clip):
        result, seconds = run_once(SETTING, [*overrides, f"rounds={rounds}", f"evaluation.every={max(rounds // 5, 1)}"])
        last = result.history[-1]
        tail = [m["dp_unclipped_fraction"] for m in result.history[-10:] if "dp_unclipped_fraction" in m]
        row = {
            "mechanism": mechanism, "z": z, "rounds": len(result.history), "accuracy": result.final_accuracy,
            "epsilon": last.get("epsilon"), "epsilon_mean": last.get("epsilon_mean"),
            "clip": local_clip if mechanism == LOCAL else last.get("dp_clip_norm"),
            "unclipped": sum(tail) / len(tail) if tail else None,
            "clients_per_round": sum(m["clients"] for m in result.history) / len(result.history),
            "seconds": seconds,
        }
        if mechanism in (FIXED, ADAPTIVE, CLIP_ONLY):
            row["epsilon_prv"] = prv_epsilon(z, row["rounds"])
        rows.append(row)
        print(f"{mechanism:<24} z={z!s:<5} eps={_eps(row['epsilon'])} acc={row['accuracy']:.4f} "
              f"({row['seconds']:.1f} s)", flush=True)
    return rows


def _eps(value: float | None) -> str:
    if value is None:
        return "—"
    return "∞" if math.isinf(value) else f"{value:.3g}"


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown results table, one row per run."""
    lines = [
        f"| mechanism | z | clip (final C) | unclipped | ε RDP (δ = {DELTA:g}) | ε PRV | accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        z = "—" if r["z"] is None else f"{r['z']:g}"
        clip = "—" if r["clip"] is None else ("∞" if math.isinf(r["clip"]) else f"{r['clip']:.3g}")
        if r["mechanism"] == LOCAL:
            clip += " per example"
            eps = f"{_eps(r['epsilon'])} max, {_eps(r['epsilon_mean'])} mean (sample-level)"
        else:
            eps = _eps(r["epsilon"])
        unclipped = "—" if r["unclipped"] is None else f"{r['unclipped']:.0%}"
        lines.append(f"| {r['mechanism']} | {z} | {clip} | {unclipped} | {eps} | {_eps(r.get('epsilon_prv'))} "
                     f"| {100 * r['accuracy']:.2f}% |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against final ε (log scale): one line per DP mechanism, the references as horizontal lines."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    styles = {FIXED: ("o-", "C0"), ADAPTIVE: ("s-", "C1"), LOCAL: ("^--", "C3")}
    for mechanism, (style, color) in styles.items():
        points = sorted((r["epsilon"], r["accuracy"], r["z"]) for r in rows if r["mechanism"] == mechanism)
        if not points:
            continue
        label = f"{mechanism} (sample-level ε, worst client)" if mechanism == LOCAL else f"{mechanism} (user-level ε)"
        ax.plot([p[0] for p in points], [p[1] for p in points], style, color=color, label=label, linewidth=1.3)
        for eps, acc, z in points:
            ax.annotate(f"z={z:g}", (eps, acc), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    for mechanism, style in ((FEDAVG, ":"), (CLIP_ONLY, "-.")):
        for r in rows:
            if r["mechanism"] == mechanism:
                ax.axhline(r["accuracy"], color="grey", linestyle=style, linewidth=1.0, label=f"{mechanism}, ε = ∞")
    ax.set_xscale("log")
    ax.set_xlabel(f"final ε at δ = {DELTA:g} (RDP accountant)")
    ax.set_ylabel("central test accuracy")
    ax.set_title("synthetic, 10,000 clients, Dirichlet α = 0.5, Poisson q = 0.01", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def setup_text(rounds: int, clip: float, local_clip: float, minutes: float | None, rows: list[dict[str, Any]]) -> str:
    """One paragraph describing the study, read from SETTING so it cannot go stale."""
    data, training = SETTING["data"], SETTING["training"]
    low, high = (f"{f(r['clients_per_round'] for r in rows):.0f}" for f in (min, max))
    cohort = f"about {low}" if low == high else f"{low}–{high}"
    took = f" The {len(rows)} runs took {minutes:.1f} min in all." if minutes is not None else ""
    return (
        f"Generated by `python scripts/study_privacy.py`: {SETTING['num_clients']:,} clients of the built-in "
        f"`{data['source']}` set ({data['num_samples']:,} samples, about {data['num_samples'] * 0.8 / SETTING['num_clients']:.0f} "
        f"training examples per client, {data['num_features']} features, {data['num_classes']} classes), Dirichlet "
        f"α = {SETTING['partition']['alpha']} label skew, Poisson client sampling at q = {SAMPLE_RATE} "
        f"({cohort} clients per round on average over a run), MLP {SETTING['model']['hidden']}, "
        f"{rounds} rounds of {training['epochs']} local epoch, batch {training['batch_size']}, SGD lr {training['lr']:g}, "
        f"seed {SETTING['seed']}. Fixed clip S = {clip:g}; adaptive clipping starts at C = 1 with γ = 0.5, "
        f"η = 0.2 and σ_b = expected cohort / 20; local DP-SGD clips each example's gradient to {local_clip:g}. "
        f"δ = {DELTA:g} everywhere. Accuracy is the final global model's central test accuracy, from one seed: "
        f"differences of a point or less are within what another seed could change (not measured here).{took}"
    )


def main() -> None:
    parser = study_parser(__doc__, replot="privacy.json")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--z", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 8.0], help="central noise multipliers")
    parser.add_argument("--z-local", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0], help="DP-SGD noise multipliers")
    parser.add_argument("--clip", type=float, default=0.3, help="the fixed clip S of central DP-FedAvg")
    parser.add_argument("--local-clip", type=float, default=5.0, help="DP-SGD's per-example clip (max_grad_norm)")
    args = parser.parse_args()

    def run() -> dict[str, Any]:
        with local_ray() as session:
            rows = run_study(args.rounds, args.z, args.z_local, args.clip, args.local_clip)
        return {"rounds": args.rounds, "clip": args.clip, "local_clip": args.local_clip, "minutes": session.minutes,
                "rows": rows}

    stored = saved_results(args, run)
    rows, rounds, minutes = stored["rows"], stored["rounds"], stored.get("minutes")
    clip, local_clip = stored["clip"], stored["local_clip"]
    results_table = table(rows)
    print(results_table)
    setup = setup_text(rounds, clip, local_clip, minutes, rows)
    write_report(args.out / "privacy.md", "# Privacy study: accuracy against ε for central DP-FedAvg and local DP-SGD\n\n"
                 f"{setup}\n\n![accuracy against epsilon](privacy.png)\n\n{results_table}", __file__)
    plot(rows, args.out / "privacy.png")
    print(f"privacy_study_runs: {len(rows)}")


if __name__ == "__main__":
    main()
