"""Sweeps: a base scenario and a grid of key paths to value lists, run as one study on one Ray cluster.

A study file reads::

    name: alpha_algorithm
    base: ../quickstart.yaml          # a scenario file, relative to the study file, or a mapping
    set:                              # optional: values changed in the base for every run
      rounds: 20
    grid:
      partition.alpha: [0.1, 1.0]
      strategy.name,strategy.server_lr: [[fedavg, 1.0], [fedadam, 0.03]]   # keys that vary together
    output: results/studies           # the study writes <output>/<name>/ (relative to the working dir)

The Cartesian product of the grid becomes one run per combination, named
``<study>-<key>_<value>-...``; keys joined by a comma are zipped (each value is a list with one
entry per key), for settings that only make sense together. Every run is validated before the first
one starts, the runs share one Ray connection and one W&B group (the study name), and ``study.csv``
and ``study.md`` are rewritten atomically after each run, so a crash leaves the finished rows.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import re
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from raysim.config import Scenario, apply_overrides, check_known_path, safe_yaml
from raysim.engine.validation import parse_and_validate
from raysim.errors import ScenarioError
from raysim.atomic import write_atomic

MAX_RUNS = 1_000  # a grid larger than this is a typo, not a study one machine can run
_STUDY_KEYS = {"name", "base", "set", "grid", "output"}
_RESERVED = {"name": "the study names its runs", "output.dir": "set the study's output instead",
             "tracking.group": "a study's runs share the group named after the study"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

Axis = tuple[tuple[str, ...], list[tuple[Any, ...]]]


@dataclass(frozen=True)
class Study:
    """A validated study: its name, the base scenario as a plain mapping, the grid axes and the output."""

    name: str
    base: dict[str, Any]
    axes: list[Axis]
    output: Path

    @property
    def folder(self) -> Path:
        return self.output / self.name


@dataclass(frozen=True)
class PlannedRun:
    """One point of the grid: its values and the scenario that runs it."""

    values: dict[str, Any]
    scenario: Scenario


def read_mapping(path: Path) -> dict[str, Any]:
    """A YAML file's top-level mapping, read with the scenario loader's safety limits."""
    raw = safe_yaml(path.read_text(encoding="utf-8"), str(path))
    if not isinstance(raw, dict):
        raise ScenarioError(f"{path}: must hold a YAML mapping of keys to values")
    return raw


def is_study_file(path: str | Path) -> bool:
    """True for a readable YAML mapping with ``base`` and ``grid``: a study rather than a scenario."""
    try:
        raw = read_mapping(Path(path))
    except (ScenarioError, OSError, UnicodeDecodeError):
        return False
    return "base" in raw and "grid" in raw


def load_study(path: str | Path, overrides: list[str] | None = None) -> Study:
    """Read a study file; ``overrides`` (``key.path=value``) apply to the base of every run."""
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"study: file not found: {path}; pass the path to a study .yaml")
    raw = read_mapping(path)
    unknown = sorted(set(raw) - _STUDY_KEYS)
    if unknown:
        raise ScenarioError(f"{unknown[0]}: unknown study key; a study has {', '.join(sorted(_STUDY_KEYS))}")
    name = str(raw.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,80}", name):
        raise ScenarioError(f"name: '{name}' must be 1-80 letters, digits, '.', '_' or '-'")
    settings = raw.get("set") or {}
    if not isinstance(settings, dict):
        raise ScenarioError("set: must map key paths to values, e.g. rounds: 20")
    for key in settings:
        check_known_path([k for k in str(key).split(".") if k], f"set.{key}")
    changes = [f"{key}={_json(value, f'set.{key}')}" for key, value in settings.items()]
    base = apply_overrides(_base_mapping(raw.get("base"), path.parent), changes + list(overrides or []))
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict):
        raise ScenarioError("grid: must map key paths to lists of values, e.g. partition.alpha: [0.1, 1.0]")
    axes = [_axis(str(key), values) for key, values in grid.items()]
    output = Path(str(raw.get("output") or "results"))
    return Study(name=name, base=base, axes=axes, output=output)


def _axis(key: str, values: Any) -> Axis:
    paths = tuple(part.strip() for part in key.split(","))
    for path in paths:
        check_known_path([k for k in path.split(".") if k], f"grid.{path}")
        if path in _RESERVED:
            raise ScenarioError(f"grid.{path}: cannot be swept; {_RESERVED[path]}")
    if not isinstance(values, list) or not values:
        raise ScenarioError(f"grid.{key}: must be a non-empty list of values, e.g. [0.1, 1.0]")
    for value in values:
        _json(value, f"grid.{key}")
    if len(paths) == 1:
        return paths, [(value,) for value in values]
    if not all(isinstance(v, list) and len(v) == len(paths) for v in values):
        raise ScenarioError(f"grid.{key}: each value must be a list of {len(paths)} entries, one per key, e.g. {[['a'] * len(paths)]}")
    return paths, [tuple(v) for v in values]


def _base_mapping(base: Any, here: Path) -> dict[str, Any]:
    if isinstance(base, dict):
        return base
    if isinstance(base, str):
        file = (here / base).resolve()
        if not file.is_file():
            raise ScenarioError(f"base: scenario file not found: {file}; give a path relative to the study file")
        return read_mapping(file)
    raise ScenarioError("base: give a scenario file (relative to the study) or an inline scenario mapping")


def run_name(study: str, values: dict[str, Any]) -> str:
    """``<study>-<key>_<value>-...``, reduced to the characters a scenario name allows."""
    parts = [study, *(f"{key}_{_UNSAFE.sub('_', _text(value)).strip('_')}" for key, value in values.items())]
    name = _UNSAFE.sub("_", "-".join(parts))
    return name if len(name) <= 120 else f"{name[:111]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def _json(value: Any, where: str) -> str:
    """A grid or set value as JSON, the form ``--set`` takes; YAML dates, binary and sets have none."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        raise ScenarioError(f"{where}: a {type(value).__name__} cannot be a setting; "
                            "use numbers, strings, booleans, lists or mappings") from None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def plan(study: Study) -> list[PlannedRun]:
    """Every run of the grid, each validated; the first invalid one raises a one-line ScenarioError."""
    total = math.prod(len(points) for _, points in study.axes)
    if total > MAX_RUNS:
        raise ScenarioError(f"grid: {total} combinations is more than {MAX_RUNS} runs; "
                            "split the study or zip keys that vary together (a,b: [[..], [..]])")
    runs, names = [], set()
    for combo in itertools.product(*(points for _, points in study.axes)):
        values = {path: value for (paths, _), point in zip(study.axes, combo) for path, value in zip(paths, point)}
        name = run_name(study.name, values)
        if name in names:
            raise ScenarioError(f"grid: two runs would both be named {name}; make the grid values distinct")
        names.add(name)
        settings = [f"{k}={json.dumps(v)}" for k, v in values.items()]
        settings += [f"name={json.dumps(name)}", f"output.dir={json.dumps(str(study.folder))}",
                     f"tracking.group={json.dumps(study.name)}"]
        try:
            scenario = parse_and_validate(apply_overrides(study.base, settings))
        except ScenarioError as err:
            raise ScenarioError(f"{name}: {err}") from None
        runs.append(PlannedRun(values=values, scenario=scenario))
    return runs


class PeakMemory:
    """Samples the resident memory of this process and its child processes (a local Ray's raylet,
    workers and object store) and keeps the peak. On a remote cluster only the driver is seen."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_gb(self) -> float:
        return self.peak / 2**30

    def _sample(self) -> None:
        me = psutil.Process()
        while True:
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)
            if self._stop.wait(self.interval):
                return


def run_study(study: Study, runs: list[PlannedRun], address: str | None = None) -> list[dict[str, Any]]:
    """Run ``runs`` one after another in one session (one Ray connection, one warm worker pool for runs of
    one resource shape); returns the study's rows."""
    from raysim.engine.cluster import available_workers
    from raysim.engine.session import session_for

    rows: list[dict[str, Any]] = []
    with session_for(address) as session:
        for planned in runs:  # resources too are checked for every run before the first one starts
            try:
                available_workers(planned.scenario.executor)
            except ScenarioError as err:
                raise ScenarioError(f"{planned.scenario.name}: {err}") from None
        study.folder.mkdir(parents=True, exist_ok=True)
        for index, planned in enumerate(runs, 1):
            print(f"raysim: study {study.name}: run {index}/{len(runs)} {planned.scenario.name}", file=sys.stderr)
            started = time.perf_counter()
            with PeakMemory() as memory:
                try:
                    result = session.run(planned.scenario)
                except ScenarioError as err:
                    result, status = None, f"failed: {err}"
                else:
                    status = "ok"
            rows.append(_row(planned, result, status, time.perf_counter() - started, memory.peak_gb))
            write_tables(study, rows)
    return rows


_COLUMNS = ["status", "num_clients", "clients_per_round", "rounds", "accuracy", "loss", "test_loss", "epsilon",
            "wall_seconds", "seconds_per_round", "peak_rss_gb", "run_dir"]


def _row(planned: PlannedRun, result: Any, status: str, wall: float, peak_gb: float) -> dict[str, Any]:
    scenario = planned.scenario
    row: dict[str, Any] = {"run": scenario.name, **planned.values, **dict.fromkeys(_COLUMNS)}
    row.update(status=status, num_clients=scenario.num_clients, rounds=scenario.rounds, wall_seconds=wall, peak_rss_gb=peak_gb)
    if result is None:
        return row
    final = result.summary.get("final", {})
    sampled = [m["clients"] for m in result.history if "clients" in m]
    row.update(
        clients_per_round=statistics.fmean(sampled) if sampled else None,
        accuracy=final.get("accuracy"), loss=final.get("loss"), test_loss=final.get("test_loss"),
        epsilon=final.get("epsilon"),
        seconds_per_round=training_seconds_per_round(result.round_seconds, result.history), run_dir=str(result.run_dir),
    )
    return row


def training_seconds_per_round(round_seconds: list[float], history: list[dict[str, Any]]) -> float | None:
    """Mean seconds of rounds 2.. that ran no central evaluation (of all rounds 2.. if every round did).

    Round 1 also warms the workers up, and the test set, hence evaluation time, may grow with the data.
    """
    later = list(zip(round_seconds, history))[1:] or list(zip(round_seconds, history))
    training = [seconds for seconds, metrics in later if "accuracy" not in metrics]
    chosen = training or [seconds for seconds, _ in later]
    return statistics.fmean(chosen) if chosen else None


def write_tables(study: Study, rows: list[dict[str, Any]]) -> None:
    """Rewrite ``study.csv`` (every column) and ``study.md`` (grid values and results) atomically."""
    columns = list(rows[0]) if rows else []
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(study.folder / "study.csv", buffer.getvalue())
    shown = [c for c in columns if c not in ("run", "run_dir")]
    lines = [f"# Study {study.name}", "",
             "Wall seconds include loading data and starting the workers. Seconds per round average the rounds",
             "after the first that ran no central evaluation (all rounds after the first when each one evaluated).",
             "Peak memory is the largest summed resident set of the driver and its local Ray processes.", "",
             "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in shown) + " |" for row in rows]
    write_atomic(study.folder / "study.md", "\n".join(lines) + "\n")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")
