"""What the study scripts (``scripts/study_*.py``) share: their command line and saved results (``--replot``),
a local Ray session, one run in a throw-away output folder, the provenance header of a report, and the
Markdown report whose hand-written reading (everything below the reading marker) survives a rerun.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raysim.engine.runner import Result

DEFAULT_OUT = Path("docs/studies")


def study_parser(doc: str, *, replot: str | None = None) -> argparse.ArgumentParser:
    """The study's parser: the first line of its docstring ``doc`` as the description and ``--out`` (the
    report folder, default docs/studies); with ``replot`` (the results file it saves in that folder),
    ``--replot`` too, to rebuild the report from that file without training."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report folder (default: {DEFAULT_OUT})")
    if replot is not None:
        parser.add_argument("--replot", action="store_true",
                            help=f"rebuild the report and plot from <out>/{replot} without training")
        parser.set_defaults(results_file=replot)
    return parser


def saved_results(args: argparse.Namespace, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The study's results: with ``--replot`` read from <out>/<its results file> (``study_parser``'s
    ``replot``), else ``run()``'s, written there first."""
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / args.results_file
    if args.replot:
        return json.loads(saved.read_text(encoding="utf-8"))
    data = run()
    saved.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return data


@dataclass
class Session:
    """A study's Ray session: the load average when it started and, once closed, the minutes it ran."""

    load: tuple[float, float, float]
    minutes: float = 0.0


@contextmanager
def local_ray(num_cpus: int = 2, *, single_thread: bool = False) -> Iterator[Session]:
    """A fresh local Ray of ``num_cpus`` CPUs for the study's runs, shut down on leaving.

    Authentication and the dashboard are off, and W&B too unless WANDB_MODE says otherwise;
    ``single_thread`` defaults OMP_NUM_THREADS to 1 (set before Ray or torch load).
    """
    if single_thread:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("WANDB_MODE", "disabled")
    import ray
    from raysim.engine.cluster import start_local

    session = Session(os.getloadavg())
    start_local(num_cpus=num_cpus, log_to_driver=False)
    started = time.perf_counter()
    try:
        yield session
    finally:
        ray.shutdown()
        session.minutes = (time.perf_counter() - started) / 60


def run_once(scenario: str | Path | dict[str, Any], overrides: Sequence[str] = ()) -> tuple[Result, float]:
    """Run ``scenario`` (a YAML path or a mapping) with ``overrides``, without a progress bar, in an output
    folder removed afterwards; returns the result and the wall-clock seconds the run took."""
    import raysim

    tick = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = raysim.run(scenario, overrides=[*overrides, f"output.dir={out}", "tracking.progress=false"])
    return result, time.perf_counter() - tick


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def command_line() -> str:
    """The command that reran this study: ``OMP_NUM_THREADS=1 python scripts/<script> <its arguments>``."""
    return shlex.join(["OMP_NUM_THREADS=1", "python", f"scripts/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def provenance(command: str, session: Session) -> str:
    """The report's first paragraphs: the command, the date, the machine and how long the grid took."""
    load = session.load
    return (
        f"Command: `{command}`\n\n"
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: a 2-core container "
        f"shared with other sessions (load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the start); "
        f"Ray with 2 CPUs, 2 worker actors. The grid took {session.minutes:.1f} min."
    )


def reading_marker(script: str) -> str:
    """The line of a report below which ``script`` keeps what was written by hand."""
    return f"<!-- reading: written by hand; {Path(script).name} keeps everything below this line -->"


def write_report(path: Path, body: str, script: str) -> None:
    """Write ``body``, a blank line and ``script``'s reading marker to ``path``, followed by the hand-written
    reading below the marker of the existing file (a newline when there is none yet)."""
    marker = reading_marker(script)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    reading = old.split(marker, 1)[1] if marker in old else "\n"
    path.write_text(f"{body}\n\n{marker}{reading}", encoding="utf-8")
