"""Plots of finished (or interrupted) runs: ``raysim report RUN_DIR [RUN_DIR ...]``.

From each run folder it reads metrics.jsonl, partition.json and summary.json, and draws:

* accuracy and loss against round, and against virtual time when the run logged ``virtual_time``;
* ε against round when the run logged ``epsilon`` (differential privacy);
* bytes per client per round for every per-client ``*bytes*`` metric (secure aggregation);
* a clients x labels heatmap of label shares from partition.json (the sampled clients it lists);
* personalization: the ECDF of per-client accuracy at the last evaluation, personalized (solid) and global
  model (dashed), one colour per run, so methods compare by their whole distribution.

Several runs overlay on the same axes, one colour per run, with a legend. A folder with pieces
missing plots what is there and names each missing piece in one line. Figures are drawn with
matplotlib's object API on the Agg canvas (no display, no global pyplot state).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from raysim.errors import ScenarioError
from raysim.atomic import write_atomic

COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
_RUN_FILES = ("metrics.jsonl", "partition.json", "summary.json")


@dataclass
class RunData:
    """What one run folder holds; ``missing`` names each piece that could not be read."""

    path: Path
    label: str
    history: list[dict[str, Any]] = field(default_factory=list)
    partition: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    missing: list[str] = field(default_factory=list)

    def series(self, x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) over the rounds that logged both keys as numbers."""
        pairs = [(m[x_key], m[y_key]) for m in self.history if _number(m.get(x_key)) and _number(m.get(y_key))]
        return np.array([p[0] for p in pairs], dtype=float), np.array([p[1] for p in pairs], dtype=float)

    def has(self, key: str) -> bool:
        return any(_number(m.get(key)) for m in self.history)

    def last_list(self, key: str) -> list[float]:
        """The last round's list under ``key`` (e.g. per-client accuracies), or [] when no round logged one."""
        return next((m[key] for m in reversed(self.history) if isinstance(m.get(key), list) and m[key]), [])


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_run(path: Path, label: str | None = None) -> RunData:
    """Read a run folder, noting what is missing; a folder with none of the run files is an error."""
    if not path.is_dir() or not any((path / name).exists() for name in _RUN_FILES):
        raise ScenarioError(f"report: {path} is not a run folder (no metrics.jsonl, partition.json or summary.json); pass results/<run>")
    run = RunData(path=path, label=label or path.name)
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        run.history = _read_history(metrics, run.missing)
    else:
        run.missing.append("metrics.jsonl is missing: no per-round plots")
    run.partition = _read_json(path / "partition.json", run.missing, "no partition heatmap")
    run.summary = _read_json(path / "summary.json", run.missing, "the run did not finish")
    return run


def _read_history(path: Path, missing: list[str]) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    history = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            history.append(record)
        elif number == len(lines):
            missing.append(f"metrics.jsonl: the last line is cut off (the run was interrupted); plotted {len(history)} complete rounds")
        else:
            missing.append(f"metrics.jsonl: line {number} is not a JSON record; skipped it")
    return history


def _read_json(path: Path, missing: list[str], consequence: str) -> dict[str, Any] | None:
    if not path.is_file():
        missing.append(f"{path.name} is missing: {consequence}")
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        missing.append(f"{path.name} is not valid JSON: {consequence}")
        return None
    return value if isinstance(value, dict) else None


def _labels(paths: list[Path]) -> list[str]:
    """Folder names, with the parent folder added where two runs share a name, and the prefix that
    all of them share (a study's name) removed."""
    names = [p.name for p in paths]
    labels = [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]
    if len(labels) > 1:
        prefix = os.path.commonprefix(labels)
        cut = prefix.rfind("-") + 1
        if cut and all(len(label) > cut for label in labels):
            labels = [label[cut:] for label in labels]
    return labels


def write_report(run_dirs: list[Path], out: Path, note: Callable[[str], None] = print) -> list[Path]:
    """Draw every plot the runs have data for into ``out``; ``note`` receives one line per missing piece."""
    runs = [load_run(path, label) for path, label in zip(run_dirs, _labels(run_dirs))]
    for run in runs:
        for piece in run.missing:
            note(f"raysim: {run.label}: {piece}")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for x_key, x_label, suffix in (("round", "round", "round"), ("virtual_time", "virtual time (s)", "virtual_time")):
        if any(run.has(x_key) and (run.has("accuracy") or run.has("loss")) for run in runs):
            written.append(_save(_accuracy_and_loss(runs, x_key, x_label), out / f"accuracy_loss_vs_{suffix}.png"))
    if any(run.has("epsilon") for run in runs):
        written.append(_save(_one_panel(runs, ["epsilon"], "ε (privacy loss at the run's δ)"), out / "epsilon_vs_round.png"))
    byte_keys = sorted({k for run in runs for m in run.history for k in m if "bytes" in k and "server" not in k and _number(m[k])})
    if byte_keys:
        written.append(_save(_one_panel(runs, byte_keys, "bytes per client"), out / "bytes_per_client.png"))
    if any(run.last_list("personal_accuracies") for run in runs):
        written.append(_save(_per_client_ecdf(runs), out / "per_client_accuracy.png"))
    for run in runs:
        listed = (run.partition or {}).get("listed_clients")
        if listed and listed.get("label_histograms"):
            name = "partition.png" if len(runs) == 1 else f"partition_{run.label.replace('/', '_')}.png"
            written.append(_save(_heatmap(run, listed), out / name))
    return written


def _save(fig: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    write_atomic(path, buffer.getvalue())
    return path


def _accuracy_and_loss(runs: list[RunData], x_key: str, x_label: str) -> Figure:
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    acc_ax, loss_ax = fig.subplots(1, 2)
    for index, run in enumerate(runs):
        colour = COLOURS[index % len(COLOURS)]
        acc_ax.plot(*run.series(x_key, "accuracy"), color=colour, label=run.label)
        loss_ax.plot(*run.series(x_key, "loss"), color=colour, label=f"{run.label} (train)")
        if run.has("test_loss"):
            loss_ax.plot(*run.series(x_key, "test_loss"), color=colour, linestyle="--", label=f"{run.label} (test)")
    acc_ax.set(xlabel=x_label, ylabel="test accuracy", title=f"accuracy vs {x_label}")
    loss_ax.set(xlabel=x_label, ylabel="loss", title=f"loss vs {x_label}")
    if x_key == "round":
        for ax in (acc_ax, loss_ax):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legends(fig, runs, {loss_ax: {"train": "-", "test": "--"}})
    return fig


def _one_panel(runs: list[RunData], keys: list[str], y_label: str) -> Figure:
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    styles = dict(zip(keys, ["-", "--", ":", "-."] * len(keys)))
    for index, run in enumerate(runs):
        for key in keys:
            x, y = run.series("round", key)
            if len(x):
                ax.plot(x, y, color=COLOURS[index % len(COLOURS)], linestyle=styles[key], label=f"{run.label} {key}")
    ax.set(xlabel="round", ylabel=y_label, title=f"{y_label} vs round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legends(fig, runs, {ax: styles} if len(keys) > 1 else {})
    return fig


def _legends(fig: Figure, runs: list[RunData], styles: dict[Any, dict[str, str]]) -> None:
    """One legend of runs (colours) under the figure, and a legend of line styles inside each axes."""
    for ax in fig.axes:
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=COLOURS[i % len(COLOURS)]) for i in range(len(runs))]
    fig.legend(handles, [run.label for run in runs], loc="outside lower center", ncol=min(3, len(runs)),
               fontsize="small", frameon=False)
    for ax, mapping in styles.items():
        ax.legend([Line2D([], [], color="black", linestyle=style) for style in mapping.values()], list(mapping),
                  fontsize="small", loc="best")


def _per_client_ecdf(runs: list[RunData]) -> Figure:
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    styles = {"personalized": "-", "global model": "--"}
    for index, run in enumerate(runs):
        for (name, style), key in zip(styles.items(), ("personal_accuracies", "personal_global_accuracies")):
            values = np.sort(np.asarray(run.last_list(key), dtype=float))
            if values.size:
                ax.step(values, np.arange(1, values.size + 1) / values.size, where="post",
                        color=COLOURS[index % len(COLOURS)], linestyle=style)
    ax.set(xlabel="accuracy on the client's own held-out samples", ylabel="share of clients at or below",
           title="per-client accuracy (last evaluation)", xlim=(0, 1), ylim=(0, 1))
    _legends(fig, runs, {ax: styles})
    return fig


def _heatmap(run: RunData, listed: dict[str, Any]) -> Figure:
    counts = np.asarray(listed["label_histograms"], dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    ids = listed.get("ids", list(range(len(counts))))
    total = (run.partition or {}).get("num_clients", len(ids))
    fig = Figure(figsize=(min(16.0, max(5.0, 0.35 * shares.shape[1] + 3)), max(4.0, min(12.0, 0.12 * len(ids) + 2))))
    ax = fig.subplots()
    image = ax.imshow(shares, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of the client's samples")
    sampled = f"{len(ids)} sampled of {total} clients" if listed.get("sampled") else f"all {total} clients"
    ax.set(xlabel="label", ylabel="client id", title=f"{run.label}: label shares, {sampled}")
    if len(ids) <= 40:
        ax.set_yticks(range(len(ids)), [str(i) for i in ids], fontsize="small")
    else:
        ticks = np.linspace(0, len(ids) - 1, 10).astype(int)
        ax.set_yticks(ticks, [str(ids[t]) for t in ticks], fontsize="small")
    if shares.shape[1] <= 30:
        ax.set_xticks(range(shares.shape[1]))
    return fig
