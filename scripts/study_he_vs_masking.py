"""HE against masking: the same secure rounds summed by pairwise masking and by homomorphic encryption (issue 19).

Every cell runs the same scenario with the same seed through the engine, once per backend: FedAvg on
``synthetic`` (32 features, 10 classes) with an MLP whose hidden width makes the update m words, n clients
per round out of 4n (at least 200), one local epoch, and a fraction of the clients dropping in
``masked_input`` (after masking's key setup, before their masked input arrives: the phase that makes
masking recover pairwise masks, and that HE simply skips). Backends:

* ``masking``: Bonawitz et al.'s protocol over the complete graph (``neighbours: null``), t = 0.5n;
* ``masking-secagg+``: the SecAgg+ graph with k and t derived from the dropout (``neighbours: auto``);
* ``he-bfv``: TenSEAL BFV over the same quantized words, t = 0.5n (the decryptor's floor).

Per cell it reports the wall seconds of the last round (the first round pays the run's warm-up), what
that is above the same round without secure aggregation (``plain``, run once per (n, m): the protocol's
own cost, training being the same), bytes per client up and down (mean over the cohort, the protocol's
messages only) and the server actor's CPU seconds in that round. The accuracy part then trains a longer run per backend (and plain
FedAvg, and CKKS) at one (n, m) and compares final accuracy. It writes ``<out>/he_vs_masking.md`` (a
hand-written reading below the marker line is kept), ``<out>/he_vs_masking.json`` and
``<out>/he_vs_masking.png`` (seconds and bytes per round against n). The last line printed is
``he_vs_masking: ...``, HE's seconds per round over masking's at the largest cell.

Usage: OMP_NUM_THREADS=1 python scripts/study_he_vs_masking.py [--clients 10 100 500] [--words 10000 100000]
       [--dropouts 0 0.1 0.3] [--rounds 2] [--accuracy-rounds 20] [--out docs/studies] [--replot]
"""

from __future__ import annotations

import json
import math
from typing import Any

from studylib import command_line, local_ray, provenance, pyplot, run_once, saved_results, study_parser, write_report

BACKENDS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "masking": {"backend": "masking", "neighbours": None, "threshold": 0.5},
    "masking-secagg+": {"backend": "masking", "neighbours": "auto"},
    "he-bfv": {"backend": "he", "he": {"scheme": "bfv"}, "threshold": 0.5},
}
FEATURES, CLASSES = 32, 10


def hidden_for(words: int) -> int:
    """The MLP width h whose 32-h-10 model has about ``words`` parameters (43h + 10)."""
    return max(1, round((words - CLASSES) / (FEATURES + 1 + CLASSES)))


def scenario(clients: int, words: int, dropout: float, rounds: int, secure: dict[str, Any] | None) -> dict[str, Any]:
    population = max(4 * clients, 200)
    raw: dict[str, Any] = {
        "name": "study-he", "seed": 0, "num_clients": population, "rounds": rounds,
        "data": {"source": "synthetic", "num_samples": population * 80, "num_features": FEATURES, "num_classes": CLASSES},
        "partition": {"kind": "dirichlet", "alpha": 0.5, "min_size": 5},
        "sampling": {"kind": "uniform", "clients_per_round": clients},
        "model": {"kind": "mlp", "hidden": [hidden_for(words)]},
        "training": {"epochs": 1, "batch_size": 32, "lr": 0.1},
        "executor": {"num_workers": 2, "num_cpus": 1, "clients_per_call": max(1, math.ceil(clients / 10))},
        "evaluation": {"every": rounds},
        "tracking": {"wandb": "disabled"},
    }
    if secure is not None:
        raw["secure_aggregation"] = {**secure, "expected_dropout": max(dropout, 0.05),
                                     "dropout": {"masked_input": dropout} if dropout else {}}
    return raw


def cost_cell(clients: int, words: int, dropout: float, rounds: int, backend: str) -> dict[str, Any] | None:
    """One backend's costs in one cell; None (and why, printed) where its parameters cannot be derived."""
    from raysim.errors import ScenarioError

    try:
        result, _ = run_once(scenario(clients, words, dropout, rounds, BACKENDS[backend]))
    except ScenarioError as err:
        print(f"skipped {backend} n={clients} m={words} dropout={dropout}: {err}", flush=True)
        return None
    last = result.history[-1]
    row = {"backend": backend, "clients": clients, "words": result.summary["num_parameters"], "dropout": dropout,
           "seconds": last["seconds"], "bytes_up": last.get("secagg_client_bytes_sent_mean", 0.0),
           "bytes_down": last.get("secagg_client_bytes_received_mean", 0.0),
           "server_cpu_seconds": last["server_cpu_seconds"], "survivors": last.get("secagg_survivors", clients),
           "aborted": last.get("secagg_aborted", 0)}
    print(json.dumps(row), flush=True)
    return row


def accuracy_runs(clients: int, words: int, dropout: float, rounds: int) -> dict[str, float]:
    runs = {"plain FedAvg": None, **{k: v for k, v in BACKENDS.items() if v is not None},
            "he-ckks": {"backend": "he", "he": {"scheme": "ckks"}, "threshold": 0.5}}
    out = {}
    for name, secure in runs.items():
        result, _ = run_once(scenario(clients, words, dropout if secure else 0.0, rounds, secure))
        out[name] = result.final_accuracy
        print(f"accuracy {name}: {out[name]:.4f}", flush=True)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    plain = {(r["clients"], r["words"]): r["seconds"] for r in rows if r["backend"] == "plain"}
    lines = ["| n | m | dropout | backend | s / round | above plain (s) | bytes up / client | bytes down / client | "
             "server CPU s | survivors |", "|---|---|---|---|---|---|---|---|---|---|"]
    order = list(BACKENDS)
    for r in sorted((r for r in rows if r["backend"] != "plain"),
                    key=lambda r: (r["words"], r["clients"], r["dropout"], order.index(r["backend"]))):
        base = plain.get((r["clients"], r["words"]))
        above = "" if base is None else f"{r['seconds'] - base:.2f}"
        lines.append(f"| {r['clients']} | {r['words']:,} | {r['dropout']:.0%} | {r['backend']} | {r['seconds']:.2f} | "
                     f"{above} | {r['bytes_up']:,.0f} | {r['bytes_down']:,.0f} | "
                     f"{r['server_cpu_seconds']:.2f} | {r['survivors']:.0f}{' (aborted)' if r['aborted'] else ''} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], dropout: float, path: Any) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for backend in (b for b in BACKENDS if b != "plain"):
        for words in sorted({r["words"] for r in rows}):
            cells = sorted((r for r in rows if r["backend"] == backend and r["words"] == words
                            and r["dropout"] == dropout), key=lambda r: r["clients"])
            if not cells:
                continue
            label = f"{backend}, m={words:,}"
            left.plot([r["clients"] for r in cells], [r["seconds"] for r in cells], marker="o", label=label)
            right.plot([r["clients"] for r in cells], [r["bytes_up"] for r in cells], marker="o", label=label)
    for axis, title in ((left, "wall seconds per round"), (right, "bytes up per client")):
        axis.set_xscale("log"), axis.set_yscale("log"), axis.set_xlabel("clients per round n"), axis.set_title(title)
        axis.grid(alpha=0.3)
    left.legend(fontsize=7)
    fig.suptitle(f"masking against HE, {dropout:.0%} of clients dropping before upload")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = study_parser(__doc__, replot="he_vs_masking.json")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--words", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--accuracy-rounds", type=int, default=20)
    parser.add_argument("--accuracy-cell", type=float, nargs=3, default=[100, 10_000, 0.1], metavar=("N", "M", "DROPOUT"))
    parser.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=list(BACKENDS))
    parser.add_argument("--merge", action="store_true",
                        help="add these cells to <out>/he_vs_masking.json (replacing the same cells), skip the accuracy runs")
    args = parser.parse_args()

    def run() -> dict[str, Any]:
        with local_ray(single_thread=True) as session:
            cells = [cost_cell(n, m, 0.0 if backend == "plain" else d, args.rounds, backend)
                     for m in args.words for n in args.clients for d in args.dropouts for backend in args.backends
                     if backend != "plain" or d == args.dropouts[0]]
            rows = [row for row in cells if row is not None]
            if not args.merge:
                n, m, d = args.accuracy_cell
                accuracy = accuracy_runs(int(n), int(m), d, args.accuracy_rounds)
        if not args.merge:
            return {"rows": rows, "accuracy": accuracy, "accuracy_cell": args.accuracy_cell,
                    "accuracy_rounds": args.accuracy_rounds, "provenance": provenance(command_line(), session)}
        data = json.loads((args.out / args.results_file).read_text())
        key = lambda r: (r["backend"], r["clients"], r["words"], r["dropout"])  # noqa: E731
        new = {key(r) for r in rows}
        data["rows"] = [r for r in data["rows"] if key(r) not in new] + rows
        data["provenance"] += f"\n\nMerged in: `{command_line()}` ({provenance(command_line(), session).split('. ', 1)[1]})"
        return data

    data = saved_results(args, run)
    rows, accuracy = data["rows"], data["accuracy"]
    n, m, d = data["accuracy_cell"]
    accuracy_lines = "\n".join(f"| {name} | {value:.4f} | {100 * (value - accuracy['plain FedAvg']):+.2f} |"
                               for name, value in accuracy.items())
    body = (f"# Homomorphic encryption against pairwise masking\n\n{data['provenance']}\n\n{chr(10).join(__doc__.split(chr(10) * 2)[1:3])}\n\n"
            f"![seconds and bytes per round against n](he_vs_masking.png)\n\n## Costs per round\n\n{table(rows)}\n\n"
            f"## Final accuracy after {data['accuracy_rounds']} rounds (n = {int(n)}, m ≈ {int(m):,}, "
            f"{d:.0%} dropout; plain FedAvg without dropouts)\n\n| run | accuracy | points vs plain |\n|---|---|---|\n"
            f"{accuracy_lines}")
    write_report(args.out / "he_vs_masking.md", body, __file__)
    plot(rows, 0.1 if any(r["dropout"] == 0.1 for r in rows) else rows[0]["dropout"], args.out / "he_vs_masking.png")
    biggest = max(rows, key=lambda r: (r["clients"] * r["words"], r["dropout"]))
    pick = {r["backend"]: r for r in rows if (r["clients"], r["words"], r["dropout"]) ==
            (biggest["clients"], biggest["words"], biggest["dropout"])}
    print(f"he_vs_masking: {pick['he-bfv']['seconds'] / pick['masking']['seconds']:.2f}")


if __name__ == "__main__":
    main()
